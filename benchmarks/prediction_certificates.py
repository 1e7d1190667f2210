"""Certified predictions side by side, on the same held-out images, α and sample budget (n0 selection + n estimation
noisy copies per image), with the public tools only:

    margin-means  FS margin certificate of the nearest-class-mean cosine predictor on the smoothed feature
                  (`hf-fs prototypes` → `hf-fs certify --prototypes`)
    margin-fitted the same certificate with prototypes fitted to the certified margin on the training split
                  (`hf-fs prototypes --fit`)
    vote-cosine   Cohen et al.'s vote certificate of the same predictor on single noisy copies
                  (`hf-fs certify --prototypes --method vote`)
    vote-answers  the vote certificate of the real LLaVA's answers among the class answers ("The digit is k.",
                  the three textile answers), teacher-forced (`hf-fs certify-answer`)

on held-out digits (`--digits`, default 100) and class-balanced held-out textiles (`--textiles`, default 60), at
σ ∈ {0.12, 0.25, 0.5}, without (`none`) and with (`gsb`) the booster shipped for the LLaVA
(`llava-dinov2-smollm2-gsb`). The encoder of the cosine predictor is the LLaVA's DINOv2-S/14 tower followed by its
projector (`--features projected`, the 65 tokens the language model reads, as one vector; `vision`: the tower's
output), centred: f = normalise(g − μ) with μ the mean raw feature of noisy (+ boosted) copies of the training images
at σ, per token position
(`--center position`, `hf-fs prototypes --center`; without it DINOv2's features share a positional component that
puts class means at cosine ≈ 0.9 and leaves the FS margin vacuous beyond r = 0);
prototypes are the smoothed (+ boosted) features of `--shots` training images per class at the certified σ. Certified accuracy at ℓ2 radius r ∈ {0, 0.1, 0.25, 0.5, 1} (pixel [0, 1] units), the
abstain rate, seconds per certificate and noisy copies used per image (n0 + n).

CLS-only features: `--model dinov2-s14 --features vision --variants none` runs the cosine cells on the stand-alone
DINOv2-S/14 (the LLaVA's tower weights), whose feature is its pooled CLS token (no booster: the shipped one is
trained for the LLaVA's feature site); give it its own `--output-dir`, `--table` and `--plot`
(`benchmarks/prediction_runs_cls/`, `benchmarks/prediction_certificates_cls.md`).

Every cell is one resumable, locked run file in `--output-dir`; re-running continues where it stopped, so the
benchmark runs in pieces in the background (`--sets`, `--methods`, `--variants`, `--sigmas` choose cells; the cheap
cosine cells take seconds per image on 2 CPU threads, the LLaVA answers about 0.2 s per noisy copy). The table
(`benchmarks/prediction_certificates.md`, `.json`) and the curves (`.png`) are written from whatever rows exist,
unfinished cells marked as such:

    python benchmarks/prediction_certificates.py --methods vote-answers --sets digits --variants gsb --sigmas 0.5
    python benchmarks/prediction_certificates.py --table-only

`--dtype bfloat16` runs every forward pass under bf16 autocast (2-3× faster on CPUs with AMX, e.g. 2.6× for the
LLaVA's passes on one core of a Xeon with AMX; refused where bf16 is emulated, ~7× slower); the certificates then cover
the models as computed in bf16, and its cells are separate files (`...-bfloat16.jsonl`). A cell is made in one dtype
(starting it in another is refused); the table reads each cell in whichever dtype it was made and names the dtype and
the CPU of every row, since the machines that run the pieces differ.
"""

import argparse
import json
import math
import statistics
from pathlib import Path

from safetensors import safe_open

from hf_feature_smoothing import metrics
from hf_feature_smoothing.cli import main as hf_fs
from hf_feature_smoothing.runs import read_run
from hf_feature_smoothing.statistics.aggregates import wilson_interval
from hf_feature_smoothing.utils.atomic import write_atomically


SIGMAS = (0.12, 0.25, 0.5)
RADII = (0.0, 0.1, 0.25, 0.5, 1.0)
SETS = {"digits": ("digits:train", "digits:test"), "textiles": ("textiles:train", "textiles:test")}
METHODS = ("margin-means", "margin-fitted", "vote-cosine", "vote-answers")
VARIANTS = ("none", "gsb")


DTYPES = ("float32", "bfloat16")


def cell_name(args, name: str, method: str, variant: str, sigma: float, dtype: str | None = None) -> str:
    dtype = dtype or args.dtype
    return (f"{name}-{method}-{variant}-sigma{sigma}" + ("" if dtype == "float32" else f"-{dtype}")
            + ("" if method == "vote-answers" else space_tag(args)))  # the answers do not use the prototypes' space


def cell_file(args, name: str, method: str, variant: str, sigma: float) -> tuple[str, Path] | None:
    """(dtype, run file) of a cell, in whichever compute dtype it was made; None before it starts. A cell holds one
    dtype: files of two are refused (which one would the table show?)."""
    found = [(dtype, path) for dtype in DTYPES
             if (path := Path(args.output_dir) / f"{cell_name(args, name, method, variant, sigma, dtype)}.jsonl").exists()]
    if len(found) > 1:
        raise SystemExit(f"cell {name} {method} {variant} σ={sigma} has run files in two compute dtypes "
                         f"({', '.join(str(path) for _, path in found)}); keep the one to report, move the other away.")
    return found[0] if found else None


def space_tag(args) -> str:
    """The cosine predictor's feature space in file names (none for the tower's plain feature)."""
    return (f"-{args.features}" if args.features != "vision" else "") + (f"-center-{args.center}" if args.center else "")


def prototypes_file(args, name: str, variant: str, sigma: float, fit: bool) -> Path:
    """Prototypes from the smoothed (+ boosted) training features at σ (what the cosine predictor compares with):
    class means, or fitted to the certified margin; made once per (set, variant, σ, recipe)."""
    path = Path(args.output_dir) / f"{name}-{variant}-sigma{sigma}{'-fitted' if fit else ''}{space_tag(args)}.safetensors"
    if path.exists():  # made by an earlier call: it must have been made with these settings
        with safe_open(str(path), "pt") as f:
            made = {key: json.loads(value) for key, value in f.metadata().items()}
        wanted = {"shots": args.shots, "num_samples": args.prototype_samples, "image_size": args.image_size,
                  "booster": args.booster if variant == "gsb" else None, "sigma": sigma,
                  "model": args.model, "center": args.center, "smoothed_features": args.features}
        made = {"center": None, "smoothed_features": "vision", **made}  # files made before these were recorded
        if any(made.get(key) != value for key, value in wanted.items()) or (
                made.get("recipe", "class_means") != ("fit_prototypes" if fit else "class_means")):
            raise SystemExit(f"{path} was made with other settings ({ {k: made.get(k) for k in wanted} }) than "
                             f"this call's ({wanted}); use another --output-dir.")
    else:
        assert hf_fs(["prototypes", "--model", args.model, *booster_args(args, variant), "--image-size",
                      str(args.image_size), "--images", SETS[name][0], "--shots", str(args.shots), "--sigma",
                      str(sigma), "--num-samples", str(args.prototype_samples), "--output", str(path),
                      *(["--fit"] if fit else []), *(["--center", args.center] if args.center else []),
                      "--features", args.features]) == 0
    return path


def booster_args(args, variant: str) -> list[str]:
    return ["--booster", args.booster] if variant == "gsb" else []


def run_cell(args, name: str, method: str, variant: str, sigma: float) -> None:
    made = cell_file(args, name, method, variant, sigma)
    if made and made[0] != args.dtype:
        raise SystemExit(f"cell {name} {method} {variant} σ={sigma} was started in {made[0]} ({made[1]}); finish it "
                         f"with --dtype {made[0]}, or move its file away to make it in {args.dtype}.")
    rows = Path(args.output_dir) / f"{cell_name(args, name, method, variant, sigma)}.jsonl"
    common = ["--dtype", args.dtype, *booster_args(args, variant), "--images", SETS[name][1], "--limit", str(args.limit[name]), "--sigma",
              str(sigma), "--n", str(args.n), "--n0", str(args.n0), "--alpha", str(args.alpha), "--seed", "0",
              "--output", str(rows)]
    if method == "vote-answers":
        command = ["certify-answer", "--model", args.model, "--candidates", name, *common]
    else:
        protos = prototypes_file(args, name, variant, sigma, fit=method == "margin-fitted")
        command = ["certify", "--model", args.model, "--image-size", str(args.image_size), "--prototypes",
                   str(protos), "--method", method.split("-")[0], *common]
    assert hf_fs(command) == 0, command


def cells(args, every: bool = False):
    """The cells the options choose (`every`: all cells, for the table, whichever pieces this call runs)."""
    sigmas = sorted(set(SIGMAS) | set(args.sigmas)) if every else args.sigmas
    for name in SETS if every else args.sets:
        for variant in VARIANTS if every else args.variants:
            for sigma in sigmas:
                for method in METHODS if every else args.methods:
                    yield name, method, variant, sigma


def summarise(args) -> list[dict]:
    """One summary per cell that has rows: certified accuracy per radius (95% Wilson intervals at r = 0.5, 1),
    abstain rate, median seconds per certificate (a job paused or sharing its cores inflates a few), copies used, and
    the compute dtype and CPU of the cell."""
    metric = metrics.load("certified_robustness", "accuracy")
    results, settings = [], set()
    for name, method, variant, sigma in cells(args, every=True):
        made = cell_file(args, name, method, variant, sigma)
        run = read_run(made[1]) if made else None
        ok = [r for r in run.rows if r["status"] == "ok"] if run else []
        if not ok:
            continue
        scores = metric.compute(**metrics.accuracy_inputs(ok), epsilon=list(RADII))
        settings.update((r["n0"], r["n"], r["alpha"]) for r in ok)
        if {r["dtype"] for r in ok} != {made[0]}:
            raise SystemExit(f"{made[1]}: rows in {sorted({r['dtype'] for r in ok})}, its name says {made[0]}.")
        hardware = run.header["info"].get("hardware") or {}
        copies = [r["n0"] + (r.get("n_used") or r["n"]) for r in ok]
        results.append({"set": name, "method": method, "booster": variant, "sigma": sigma, "images": len(ok),
                        "planned": args.limit[name], **scores,
                        **{f"interval@{r:g}": wilson_interval(round(scores[f"certified_accuracy@{r:g}"] * len(ok)),
                                                              len(ok)) for r in (0.5, 1.0)},
                        "seconds_per_certificate": statistics.median(r["elapsed_s"] for r in ok),  # a paused job
                        "copies_per_image": sum(copies) / len(copies), "n0": ok[0]["n0"], "n": ok[0]["n"],
                        "alpha": ok[0]["alpha"], "dtype": made[0],
                        "cpu": " ".join(str(hardware[k]) for k in ("cpu", "cpu_capability") if hardware.get(k))
                        or "not recorded"})
    if len(settings) > 1:  # side by side means the same budget and α in every cell
        raise SystemExit(f"cells in {args.output_dir} were made with different (n0, n, α): {sorted(settings)}; "
                         f"rerun them with one setting or use another --output-dir.")
    return results


def write_table(args, results: list[dict]) -> str:
    n0, n, alpha = (results[0]["n0"], results[0]["n"], results[0]["alpha"]) if results else (args.n0, args.n, args.alpha)
    lines = [(f"`{args.model}`; same held-out images, n0 = {n0} "
              f"selection + n = {n} estimation noisy copies per image, α = {alpha}, seed 0, betting bounds, every "
              f"forward pass of a cell in its dtype (the certificates cover the models as computed in it: bfloat16 "
              f"where the CPU has it natively, float32 elsewhere), seconds on its CPU (2 threads); "
              f"certified accuracy at ℓ2 radius r (pixel [0, 1] units), 95% Wilson intervals over images at r = 0.5 "
              f"and 1; booster `gsb` = `{args.booster}`. margin-means: FS margin of the nearest-class-mean cosine "
              f"predictor ({args.shots} shots per class, prototypes = smoothed features at σ from "
              f"{args.prototype_samples} copies, DINOv2-S/14 @{args.image_size} px; feature: {args.features}, "
              f"centred per {args.center or 'nothing'}); margin-fitted: the same with "
              f"prototypes fitted to the certified margin on the training split (`hf-fs prototypes --fit`); vote-cosine: Cohen's vote of "
              f"the same predictor on single copies; vote-answers: Cohen's vote of the LLaVA's answers among the "
              f"class answers. Cells with fewer images than planned are unfinished (*)."), "",
             "| set | method | booster | σ | images | " + " | ".join(f"r = {r:g}" for r in RADII)
             + " | abstain | s / certificate (median) | copies / image | dtype, CPU |", "|" + "---|" * (9 + len(RADII))]
    for s in results:
        def cell(r):
            value = f"{s[f'certified_accuracy@{r:g}']:.3f}"
            if r in (0.5, 1.0):
                low, high = s[f"interval@{r:g}"]
                value += f" [{low:.2f}, {high:.2f}]"
            return value

        images = f"{s['images']}" + ("" if s["images"] >= s["planned"] else f"/{s['planned']}*")
        lines.append(f"| {s['set']} | {s['method']} | {s['booster']} | {s['sigma']} | {images} | "
                     + " | ".join(cell(r) for r in RADII)
                     + f" | {s['abstain_rate']:.3f} | {s['seconds_per_certificate']:.1f} | "
                       f"{s['copies_per_image']:.0f} | {s['dtype']}, {s['cpu']} |")
    return "\n".join(lines) + "\n"


def splice_table(path: str, table: str) -> str:
    """The text of the results page `path` with its copy of the table (the paragraph that opens `table`, then the
    table's `|` lines) replaced by `table`; a page without that paragraph is an error, not a page left stale."""
    if not Path(path).is_file():
        raise SystemExit(f"--results {path}: no such file; give the results page, or '' to write only the table")
    text = Path(path).read_text(encoding="utf-8")
    opening = table.split(", n0 = ", 1)[0]  # "`<model>`; same held-out images"
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(opening)), None)
    if start is None:
        raise SystemExit(f"--results {path}: no paragraph opening with {opening!r} to replace; copy the table there "
                         "once by hand, or pass --results '' to leave the page alone")
    end = start + 1
    while end < len(lines) and not lines[end]:
        end += 1
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:start] + table.rstrip("\n").split("\n") + lines[end:])


def plot(args, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({s["set"] for s in results}, key=list(SETS).index)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for s in (s for s in results if s["set"] == name):
            style = {"margin-means": ":", "margin-fitted": "-.", "vote-cosine": "--", "vote-answers": "-"}[s["method"]]
            ax.plot(RADII, [s[f"certified_accuracy@{r:g}"] for r in RADII], style, marker="o", markersize=3,
                    label=f"{s['method']}, σ={s['sigma']}, {s['booster']}")
        ax.set(title=name, xlabel="ℓ2 radius (pixel [0,1] units)", ylim=(0, 1))
    axes[0][0].set_ylabel("certified accuracy")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-dinov2-smollm2", help="`hf-fs --model`: the LLaVA (its tower for "
                                                                        "the cosine predictor)")
    parser.add_argument("--booster", default="llava-dinov2-smollm2-gsb", help="the `gsb` variant's booster")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="image sets")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="certificates")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="booster or not")
    parser.add_argument("--sigmas", nargs="+", type=float, default=list(SIGMAS), help="noise levels")
    parser.add_argument("--digits", type=int, default=100, help="held-out digits per cell")
    parser.add_argument("--textiles", type=int, default=60, help="held-out textiles per cell (classes interleaved)")
    parser.add_argument("--n0", type=int, default=16, help="selection copies per image (every method)")
    parser.add_argument("--n", type=int, default=500, help="estimation copies per image (every method)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of every certificate's forward passes (bfloat16: 2-3× faster where the "
                             "CPU has AMX / AVX512-BF16, refused elsewhere); cells of each dtype are separate files")
    parser.add_argument("--shots", type=int, default=20, help="training images per class for the prototypes")
    parser.add_argument("--features", choices=("vision", "projected"), default="projected",
                        help="the cosine predictor's feature (`hf-fs prototypes --features`): the tower output the "
                             "projector reads, or the projector output the language model reads (default)")
    parser.add_argument("--center", choices=("position", "channel", "none"), default="position",
                        help="feature centre of the cosine predictor (`hf-fs prototypes --center`): μ of the smoothed "
                             "training features per token position (default), per channel, or none")
    parser.add_argument("--prototype-samples", type=int, default=4, help="noisy copies per prototype image")
    parser.add_argument("--image-size", type=int, default=112, help="tower input size (the LLaVA's)")
    parser.add_argument("--output-dir", default="outputs/prediction-certificates", help="run files and prototypes")
    parser.add_argument("--table", default="benchmarks/prediction_certificates.md", help="markdown table (+ .json)")
    parser.add_argument("--plot", default="benchmarks/prediction_certificates.png", help="curves")
    parser.add_argument("--results", default="benchmarks/RESULTS.md",
                        help="results page whose copy of the table is replaced ('': leave it)")
    parser.add_argument("--table-only", action="store_true", help="write the table from the rows there are")
    args = parser.parse_args()
    if not all(math.isfinite(s) and s > 0 for s in args.sigmas):
        parser.error(f"--sigmas must be positive, got {args.sigmas}")
    args.limit = {"digits": args.digits, "textiles": args.textiles}
    args.center = None if args.center == "none" else args.center
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.results:  # a page it cannot update is refused before hours of cells, not after
        splice_table(args.results, write_table(args, []))
    if not args.table_only:
        for cell in cells(args):
            run_cell(args, *cell)
    results = summarise(args)
    table = write_table(args, results)
    write_atomically(args.table, table)
    write_atomically(Path(args.table).with_suffix(".json"), json.dumps(results, indent=1))
    if args.results:
        write_atomically(args.results, splice_table(args.results, table))
    if results:
        plot(args, results)
    print(table)


if __name__ == "__main__":
    main()
