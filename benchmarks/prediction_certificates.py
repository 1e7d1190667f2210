"""Prediction-wise certification on real data: a few-shot cosine predictor (class prototypes = the mean DINOv2-S/14
feature of `--shots` training images per class) on the digits and the textiles, certified accuracy vs radius at
σ ∈ {0.12, 0.25, 0.5}, with and without a Gaussian Smoothness Booster — all through the public tools:

    hf-fs prototypes --model llava-dinov2-smollm2 --images digits:train --shots 20 --sigma σ --output .../digits.safetensors
    hf-fs certify --model llava-dinov2-smollm2 [--booster B] --images digits:test --limit 40 --prototypes ... --sigma σ

and the bundled `evaluate` metric for the aggregates. The encoder is the DINOv2-S/14 tower of the real-weight LLaVA
(the features its projector reads: all 65 tokens as one vector) and the booster the one shipped for that LLaVA
(`llava-dinov2-smollm2-gsb`); `--model dinov2-s14 --booster DIR` certifies the stand-alone encoder instead. The
prototypes of each (set, booster, σ) are the smoothed features at that σ (`hf-fs prototypes --sigma`): what the
smoothed predictor sees. Every run is resumable (re-running the script continues); the table goes to
`benchmarks/prediction_certificates.md` and the curves to `benchmarks/prediction_certificates.png`.

    python benchmarks/prediction_certificates.py
"""

import argparse
import json
from pathlib import Path

from hf_feature_smoothing import metrics
from hf_feature_smoothing.cli import main as hf_fs
from hf_feature_smoothing.runs import read_run


SIGMAS = (0.12, 0.25, 0.5)
RADII = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
SETS = {"digits": ("digits:train", "digits:test"), "textiles": ("textiles:train", "textiles:test")}


def certify_runs(args) -> list[dict]:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    common = ["--model", args.model, "--image-size", str(args.image_size)]
    for name, (train, test) in SETS.items():
        variants = {"none": None, **({"gsb": args.booster} if args.booster else {})}
        for variant, booster in variants.items():
            with_booster = ["--booster", booster] if booster else []
            for sigma in SIGMAS:
                protos = out / f"{name}-{variant}-sigma{sigma}.safetensors"
                if not protos.exists():  # the smoothed (+ boosted) features at this σ: what the predictor sees
                    assert hf_fs(["prototypes", *common, *with_booster, "--images", train, "--shots",
                                  str(args.shots), "--sigma", str(sigma), "--num-samples", str(args.prototype_samples),
                                  "--output", str(protos)]) == 0
                rows = out / f"{name}-{variant}-sigma{sigma}.jsonl"
                command = ["certify", *common, *with_booster, "--images", test, "--limit", str(args.limit[name]),
                           "--prototypes", str(protos), "--sigma", str(sigma), "--n", str(args.n), "--n0",
                           str(args.n0), "--alpha", str(args.alpha), "--seed", "0", "--dtype", args.dtype,
                           "--output", str(rows)]
                assert hf_fs(command) == 0
                runs.append({"set": name, "booster": variant, "sigma": sigma, "rows": read_run(rows).rows})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="llava-dinov2-smollm2", help="`hf-fs --model` of the encoder")
    parser.add_argument("--booster", default="llava-dinov2-smollm2-gsb",
                        help="GSB adapter for --model (adds the `gsb` rows); '' for none")
    parser.add_argument("--shots", type=int, default=20, help="training images per class for the prototypes")
    parser.add_argument("--prototype-samples", type=int, default=4, help="noisy copies per prototype image")
    parser.add_argument("--digits", type=int, default=40, help="held-out digits certified")
    parser.add_argument("--textiles", type=int, default=30, help="held-out textiles certified (first N of the split)")
    parser.add_argument("--n", type=int, default=128, help="estimation samples per image")
    parser.add_argument("--image-size", type=int, default=112, help="DINOv2 input size (the boosters' training size)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the tower passes (bfloat16 where the CPU/GPU supports it)")
    parser.add_argument("--n0", type=int, default=32, help="selection samples per image")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    parser.add_argument("--output-dir", default="outputs/prediction-certificates", help="prototypes and run files")
    parser.add_argument("--table", default="benchmarks/prediction_certificates.md", help="markdown table")
    parser.add_argument("--plot", default="benchmarks/prediction_certificates.png", help="curves")
    args = parser.parse_args()
    args.limit = {"digits": args.digits, "textiles": args.textiles}
    runs = certify_runs(args)
    metric = metrics.load("certified_robustness", "accuracy")
    header = "| set | booster | σ | images | " + " | ".join(f"r = {r:g}" for r in RADII) + " | abstain |"
    lines = [(f"`{args.model}` (DINOv2-S/14) @{args.image_size} px ({args.dtype}), nearest-class-mean cosine "
              f"predictor ({args.shots} shots per class, prototypes = smoothed features at the certified σ from "
              f"{args.prototype_samples} noisy copies), n = {args.n}, n0 = {args.n0}, α = {args.alpha}, betting bound; "
              "certified accuracy at ℓ2 radius r (pixel [0, 1] units); booster `gsb` = "
              f"`{args.booster or '-'}`."), "",
             header, "|" + "---|" * (5 + len(RADII))]
    results = []
    for run in runs:
        ok = [r for r in run["rows"] if r["status"] == "ok"]
        scores = metric.compute(prediction=[-1 if r["prediction"] is None else r["prediction"] for r in ok],
                                label=[r["label"] for r in ok], radius=[r["radius"] for r in ok], radii=list(RADII))
        results.append({**{k: run[k] for k in ("set", "booster", "sigma")}, "images": len(ok), **scores})
        cells = " | ".join(f"{scores[f'certified_accuracy@{r:g}']:.3f}" for r in RADII)
        lines.append(f"| {run['set']} | {run['booster']} | {run['sigma']} | {len(ok)} | {cells} | "
                     f"{scores['abstain_rate']:.3f} |")
    Path(args.table).write_text("\n".join(lines) + "\n")
    Path(args.table).with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(runs, args.plot)
    print("\n".join(lines))


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(SETS), figsize=(10, 3.8), sharey=True)
    for ax, name in zip(axes, SETS):
        for run in (r for r in runs if r["set"] == name):
            ok = [r for r in run["rows"] if r["status"] == "ok"]
            radii = np.array([r["radius"] if r["correct"] else -1.0 for r in ok])
            grid = np.linspace(0, 1.2, 121)
            style = "-" if run["booster"] == "none" else "--"
            ax.plot(grid, [(radii > g).mean() if g > 0 else (radii >= 0).mean() for g in grid], style,
                    label=f"σ={run['sigma']}, booster={run['booster']}")
        ax.set(title=name, xlabel="ℓ2 radius (pixel [0,1] units)", ylim=(0, 1))
    axes[0].set_ylabel("certified accuracy")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
