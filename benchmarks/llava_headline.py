"""The paper's headline experiment on the real-weight `llava-dinov2-smollm2`: end-to-end white-box attacks on the
generated answer (which digit?) against the plain model, the smoothed model and the smoothed model with a Gaussian
Smoothness Booster.

    python benchmarks/llava_headline.py --images 30 --sigma 0.25 --num-samples 8 [--booster DIR]

Per (variant, attack, budget) cell: accuracy (greedy answer = reference) and attack success rate (targeted: the
answer is the target digit (label + 1) mod 10; untargeted: the answer is not the reference), each over the
held-out images with a 95% bootstrap confidence interval (images resampled). APGD with EOT: every forward pass of a
smoothed model draws fresh noise for its n copies; gradients are averaged over `--eot` passes, computed under bf16
autocast where the CPU/GPU has native bf16, and the outcome is measured in float32 over `--eval-runs` fresh passes.
Rows go to a resumable JSONL file (one record per cell); the table goes to `benchmarks/llava_headline.md`.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch

from hf_feature_smoothing import FeatureSmoothingConfig
from hf_feature_smoothing.assets.labelled_images import digit_answer, digit_examples
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import llava_checkpoint, prompt_text
from hf_feature_smoothing.attacks.text import answer_attack
from hf_feature_smoothing.hardware import bf16_supported
from hf_feature_smoothing.runs.runner import Run


BUDGETS = [("linf", 4 / 255), ("linf", 8 / 255), ("linf", 16 / 255), ("l2", 2.0)]
MODES = ("untargeted", "targeted")


def bootstrap_ci(values: list[float], resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (images resampled with replacement)."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def load_variants(args) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from hf_feature_smoothing import SmoothedLlavaForConditionalGeneration

    folder = llava_checkpoint()
    processor = AutoProcessor.from_pretrained(folder)
    smoothing = FeatureSmoothingConfig(sigma=args.sigma, num_samples=args.num_samples, chunk_size=args.chunk_size)
    variants = {"plain": LlavaForConditionalGeneration.from_pretrained(folder).eval()}
    variants["smoothed"] = SmoothedLlavaForConditionalGeneration.from_pretrained(folder, smoothing=smoothing).eval()
    if args.booster:
        boosted = FeatureSmoothingConfig(**{**smoothing.to_dict(), "booster": args.booster})
        variants["smoothed+gsb"] = SmoothedLlavaForConditionalGeneration.from_pretrained(
            folder, smoothing=boosted).eval()
    return processor, variants


def summarize(records: list[dict]) -> list[dict]:
    table = []
    for record in records:
        accuracy = [r["accuracy"] for r in record["images"]]
        success = [r["success"] for r in record["images"]]
        table.append({**{k: record[k] for k in ("variant", "mode", "norm", "epsilon")}, "images": len(accuracy),
                      "accuracy": sum(accuracy) / len(accuracy), "accuracy_ci": bootstrap_ci(accuracy),
                      "success": sum(success) / len(success), "success_ci": bootstrap_ci(success),
                      "seconds": record["seconds"]})
    return table


def markdown(table: list[dict], params: dict) -> str:
    lines = [(f"llava-dinov2-smollm2, {params['images']} held-out digits, σ = {params['sigma']} (pixel [0,1]), "
             f"n = {params['num_samples']} noisy copies per forward, APGD {params['steps']} steps, EOT "
             f"{params['eot']} pass(es) per step (= {params['eot'] * params['num_samples']} noise draws for smoothed "
             f"variants), gradients in {params['gradient_dtype'] or 'float32'}, outcome over {params['eval_runs']} "
             f"fresh passes in float32. 95% bootstrap CIs over images."), "",
             "| variant | attack | budget | accuracy | attack success |", "|---|---|---|---|---|"]
    for row in table:
        budget = "clean" if row["mode"] == "clean" else (
            f"ℓ∞ {round(row['epsilon'] * 255)}/255" if row["norm"] == "linf" else f"ℓ2 {row['epsilon']:g}")
        success = "–" if row["mode"] == "clean" else (
            f"{row['success']:.1%} [{row['success_ci'][0]:.0%}, {row['success_ci'][1]:.0%}]")
        lines.append(f"| {row['variant']} | {row['mode']} | {budget} | {row['accuracy']:.1%} "
                     f"[{row['accuracy_ci'][0]:.0%}, {row['accuracy_ci'][1]:.0%}] | {success} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=30, help="held-out digits (the first N of the test split)")
    parser.add_argument("--sigma", type=float, default=0.25, help="smoothing noise std (pixel [0, 1] units)")
    parser.add_argument("--num-samples", type=int, default=8, help="noisy copies per smoothed forward pass")
    parser.add_argument("--booster", default=None, help="GSB adapter folder: adds the smoothed+gsb variant")
    parser.add_argument("--steps", type=int, default=10, help="APGD steps")
    parser.add_argument("--eot", type=int, default=1, help="forward passes averaged per gradient (EOT)")
    parser.add_argument("--eval-runs", type=int, default=4, help="fresh forward passes measuring each outcome")
    parser.add_argument("--chunk-size", type=int, default=64, help="noisy images per tower call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    parser.add_argument("--output", default="benchmarks/llava_headline.jsonl", help="resumable JSONL rows")
    parser.add_argument("--table", default="benchmarks/llava_headline.md", help="markdown table")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gradient_dtype = "bfloat16" if bf16_supported("cuda" if torch.cuda.is_available() else "cpu") else None
    params = {"images": args.images, "sigma": args.sigma, "num_samples": args.num_samples, "steps": args.steps,
              "eot": args.eot, "eval_runs": args.eval_runs, "booster": args.booster, "seed": args.seed,
              "gradient_dtype": gradient_dtype, "algorithm": "apgd"}
    with Run(args.output, "llava-headline").lock() as run:  # locked, resumable, refuses other parameters
        run.open(params)
        rows = attack_cells(args, params, gradient_dtype, run)
    table = summarize(rows)
    Path(args.table).write_text(markdown(table, params))
    Path(args.output).with_suffix(".summary.json").write_text(json.dumps({"params": params, "table": table}, indent=1))
    print(markdown(table, params))


def attack_cells(args, params: dict, gradient_dtype: str | None, run: Run) -> list[dict]:
    processor, variants = load_variants(args)
    examples = digit_examples("test", limit=args.images)
    inputs = processor(images=[e.image for e in examples], text=[prompt_text(e.question) for e in examples],
                       return_tensors="pt", padding=True)
    inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    tokenizer = processor.tokenizer

    def answer_ids(answers: list[str]) -> list[list[int]]:
        return [tokenizer(f"{a}<|im_end|>", add_special_tokens=False)["input_ids"] for a in answers]

    references = answer_ids([e.answer for e in examples])
    targets = answer_ids([digit_answer((e.label + 1) % 10) for e in examples])
    cells = [(variant, "clean", "linf", 0.0) for variant in variants]
    cells += [(variant, mode, norm, eps) for variant in variants for mode in MODES for norm, eps in BUDGETS]
    for variant, mode, norm, epsilon in cells:
        key = f"{variant}|{mode}|{norm}|{epsilon:.6g}"
        if key in run.done:
            continue
        start = time.time()
        smoothed = variant != "plain"
        results = answer_attack(
            variants[variant], inputs, references, epsilon, target_ids=targets if mode == "targeted" else None,
            norm=norm, steps=args.steps, eot_samples=args.eot if smoothed else 1,
            eval_runs=args.eval_runs if smoothed else 1, pad_token_id=tokenizer.pad_token_id,
            gradient_dtype=gradient_dtype, generator=torch.Generator().manual_seed(args.seed),
        )
        images = [{"key": e.key, "label": e.label, "accuracy": r.accuracy, "success": r.success, "loss": r.loss,
                   "norm": r.norm} for e, r in zip(examples, results)]
        run.append({"key": key, "status": "ok", "variant": variant, "mode": mode, "norm": norm, "epsilon": epsilon,
                    "seconds": round(time.time() - start, 1), "images": images})
        print(f"{key}: accuracy {sum(i['accuracy'] for i in images) / len(images):.3f}, "
              f"success {sum(i['success'] for i in images) / len(images):.3f} ({time.time() - start:.0f} s)",
              flush=True)
    return run.finish()


if __name__ == "__main__":
    main()
