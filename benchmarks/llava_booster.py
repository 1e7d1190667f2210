"""What a Gaussian Smoothness Booster buys on the real-weight `llava-dinov2-smollm2`, and what the language model in
the loop adds: no booster vs the booster trained on the feature terms only (`features`) vs the same booster with the
frozen LM's KL term (`lm`), at σ ∈ {0.12, 0.25, 0.5}, in one table:

* answer accuracy of the smoothed (+ boosted) model on held-out digits and textiles (n noisy copies per forward, as
  deployed; exact answer, teacher-forced ≡ greedy), next to the plain model's on the same images;
* S (clean reference, the paper's score), its one-sided lower bound S_low and FCSB(ε) of the smoothed tower on
  held-out digits (betting bound);
* the clean-feature cosine of the boosted tower to the stock one.

    python benchmarks/llava_booster.py --boosters outputs/llava-gsb    # trains the missing boosters first

Boosters come from `train_llava_booster` (resumable); the measurements go to a locked, resumable run file
(`--output`, one row per cell, refused if the parameters differ), the table to `--table` (.md and .json).
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from hf_feature_smoothing import certify
from hf_feature_smoothing.assets.labelled_images import digit_examples, textile_examples
from hf_feature_smoothing.assets.llava_booster_training import RECORD_FILE, VARIANTS, train_llava_booster
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import MODEL_NAME as LLAVA_NAME
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import llava_checkpoint
from hf_feature_smoothing.assets.projector_training import answer_accuracy
from hf_feature_smoothing.assets.registry import resolve_model
from hf_feature_smoothing.booster import booster_noise_level
from hf_feature_smoothing.runs.runner import Run
from hf_feature_smoothing.statistics.aggregates import bootstrap_ci


def digest(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


def load(folder: Path, sigma: float | None, booster: Path | None, args):
    if sigma is None:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(folder).eval()
    smoothing = {"sigma": sigma, "num_samples": args.num_samples, "seed": args.seed, "chunk_size": 64}
    if booster is not None:
        smoothing["booster"] = str(booster)
    return resolve_model(LLAVA_NAME, smoothing_config=smoothing)  # the built-in LLaVA as its smoothed class


@torch.no_grad()
def clean_cosine(model, images: list, sigma: float) -> float:
    """Mean cosine between the boosted tower's features of the clean images (booster conditioned on σ) and the
    stock tower's (every booster is the identity at σ = 0), all tokens of an image as one vector."""
    tower = model.smoothed_vision_tower
    adapter = tower.family
    inputs = adapter.preprocess(images)

    def unit(level: float, *stats) -> torch.Tensor:
        with booster_noise_level(tower.encoder, level, *stats):
            rows = adapter.encode(inputs)[-1].float()
        return tower._unit_rows(rows[None], inputs)[0][0].reshape(inputs.num_images, -1)

    stock, boosted = unit(0.0), unit(sigma, adapter.image_mean, adapter.image_std)
    return (boosted * stock).sum(-1).mean().item()


def measure(model, sigma: float | None, data: dict, args) -> dict:
    row = {}
    for task, examples in (("digits", data["digits"]), ("textiles", data["textiles"])):
        result = answer_accuracy(model, data["processor"], examples, per_example=True)
        row[f"{task}_hits"] = [int(h) for h in result["hits"]]
    if sigma is None:
        return row
    images = [e.image for e in data["certified"]]
    certificates = certify(model, images, epsilon=args.epsilon, n=args.n, alpha=args.alpha, reference="clean",
                           seed=args.seed, progress=True)
    count = len(certificates)
    row.update({
        "score": sum(c.score for c in certificates) / count,
        "score_lower": sum(c.score_lower for c in certificates) / count,
        "abstain": sum(c.abstain for c in certificates),
        # mean certified cosine over images; an abstention or a vacuous bound counts as 0 (no guarantee)
        "fcsb": [sum(c.fcsb[i] or 0.0 for c in certificates) / count for i in range(len(args.epsilon))],
        "clean_cosine": clean_cosine(model, images, sigma),
    })
    return row


def table(rows: dict, args, params: dict) -> tuple[str, list[dict]]:
    plain = rows["plain"]
    eps = " | ".join(f"FCSB ε={e:g}" for e in args.epsilon)
    lines = [
        (f"llava-dinov2-smollm2; accuracy: {len(plain['digits_hits'])} held-out digits and "
         f"{len(plain['textiles_hits'])} held-out textiles, smoothed with n = {args.num_samples} copies per forward "
         f"(as deployed), 95% bootstrap CIs; certificates: {params['certified_images']} held-out digits, n = {args.n}, "
         f"α = {args.alpha}, betting bound, clean reference (S = the paper's score), noise in pixel [0, 1] space "
         "(ℓ2, 112 px), FCSB averaged with abstentions / vacuous bounds as 0; seed "
         f"{args.seed}. Plain model: digits {100 * mean(plain['digits_hits']):.1f}%, textiles "
         f"{100 * mean(plain['textiles_hits']):.1f}%."), "",
        f"| σ | booster | digits acc | Δ vs plain | textiles acc | S | S_low | {eps} | clean cos to stock |",
        "|---|---|---|---|---|---|---|" + "---|" * len(args.epsilon) + "---|",
    ]
    summary = []
    for sigma in args.sigmas:
        for variant in ("none", *VARIANTS):
            r = rows.get(f"{variant}|{sigma:g}")
            if r is None:
                continue
            digits, textiles = r["digits_hits"], r["textiles_hits"]
            low, high = bootstrap_ci(digits)
            t_low, t_high = bootstrap_ci(textiles)
            delta = 100 * (mean(digits) - mean(plain["digits_hits"]))
            fcsb = " | ".join(f"{v:.3f}" for v in r["fcsb"])
            lines.append(f"| {sigma:g} | {variant} | {100 * mean(digits):.1f} [{100 * low:.0f}, {100 * high:.0f}] "
                         f"| {delta:+.1f} | {100 * mean(textiles):.1f} [{100 * t_low:.0f}, {100 * t_high:.0f}] "
                         f"| {r['score']:.4f} | {r['score_lower']:.4f} | {fcsb} | {r['clean_cosine']:.4f} |")
            summary.append({"sigma": sigma, "booster": variant, "digits_accuracy": mean(digits),
                            "digits_ci": [low, high], "textiles_accuracy": mean(textiles),
                            "textiles_ci": [t_low, t_high], **{k: r[k] for k in ("score", "score_lower", "abstain",
                                                                                "fcsb", "clean_cosine", "seconds")}})
    lines += ["", ("Training cost (2 CPU threads; one stage line per stage, the purifier stage is shared by "
                   "`features` and `lm`):")]
    for variant, cost in training_costs(args.boosters).items():
        stages = ", ".join(f"{c['stage']} {c['steps']} steps in {c['seconds']:.0f} s (load {c['load_average']})"
                           for c in cost)
        lines.append(f"- `{variant}`: {stages}")
    return "\n".join(lines) + "\n", summary


def training_costs(folder: Path) -> dict[str, list[dict]]:
    """The per-stage cost each booster's `training_record.json` recorded while it trained."""
    return {variant: json.loads((folder / variant / RECORD_FILE).read_text())["cost"] for variant in VARIANTS
            if (folder / variant / RECORD_FILE).exists()}


def mean(values: list) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--boosters", type=Path, default=Path("outputs/llava-gsb"),
                        help="train_llava_booster output folder (its `features` and `lm` stages)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.12, 0.25, 0.5])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--digits", type=int, default=397, help="held-out digits for the accuracy (all: 397)")
    parser.add_argument("--textiles", type=int, default=50, help="held-out textiles per class for the accuracy")
    parser.add_argument("--certified", type=int, default=30, help="held-out digits certified")
    parser.add_argument("--num-samples", type=int, default=8, help="noisy copies per smoothed forward")
    parser.add_argument("--n", type=int, default=256, help="Monte Carlo samples per certificate")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="benchmarks/llava_booster.jsonl", help="resumable run file")
    parser.add_argument("--table", type=Path, default=Path("benchmarks/llava_booster.md"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    boosters = {variant: train_llava_booster(args.boosters, variant) for variant in VARIANTS}
    folder = llava_checkpoint()
    from transformers import AutoProcessor

    data = {"processor": AutoProcessor.from_pretrained(folder), "digits": digit_examples("test", limit=args.digits),
            "textiles": textile_examples("test", limit_per_class=args.textiles),
            "certified": digit_examples("test", limit=args.certified)}
    params = {"model": folder.name, "sigmas": args.sigmas, "epsilon": args.epsilon, "digits": len(data["digits"]),
              "textiles": len(data["textiles"]), "certified_images": len(data["certified"]),
              "num_samples": args.num_samples, "n": args.n, "alpha": args.alpha, "seed": args.seed,
              "bound": "betting", "reference": "clean",
              "boosters": {variant: digest(path) for variant, path in boosters.items()}}
    cells = [("plain", None, None)] + [(variant, sigma, boosters.get(variant)) for sigma in args.sigmas
                                        for variant in ("none", *VARIANTS)]
    with Run(args.output, "llava-booster").lock() as run:
        run.open(params)
        for variant, sigma, booster in cells:
            key = variant if sigma is None else f"{variant}|{sigma:g}"
            if key in run.done:
                continue
            start = time.time()
            row = measure(load(folder, sigma, booster, args), sigma, data, args)
            run.append({"key": key, "status": "ok", "variant": variant, "sigma": sigma, **row,
                        "seconds": round(time.time() - start, 1)})
            print(f"{key}: digits {mean(row['digits_hits']):.3f}, textiles {mean(row['textiles_hits']):.3f}"
                  + (f", S {row['score']:.4f}" if "score" in row else "") + f" ({time.time() - start:.0f} s)",
                  flush=True)
        rows = {r["key"]: r for r in run.finish()}
    markdown, summary = table(rows, args, params)
    args.table.write_text(markdown)
    args.table.with_suffix(".json").write_text(json.dumps({"params": params, "table": summary}, indent=1))
    print(markdown)


if __name__ == "__main__":
    main()
