"""The paper's headline experiment on the real-weight `llava-dinov2-smollm2`: end-to-end white-box attacks on the
generated answer (which digit?) against the plain model, the smoothed model and the smoothed model with a Gaussian
Smoothness Booster.

    python benchmarks/llava_headline.py --images 30 --sigma 0.12 --num-samples 8
    python benchmarks/llava_headline.py --images 30 --sigma 0.25 --variants smoothed+gsb \
        --booster llava-dinov2-smollm2-gsb --output benchmarks/llava_headline_gsb.jsonl \
        --combine benchmarks/llava_headline.jsonl      # one table of both runs, each row with its own σ

Per (variant, attack, budget) cell: accuracy (greedy answer = reference) and attack success rate (targeted: the
answer is the target digit (label + 1) mod 10; untargeted: the answer is not the reference), each over the
held-out images with a 95% bootstrap confidence interval (images resampled). APGD with EOT: every forward pass of a
smoothed model draws fresh noise for its n copies; gradients are averaged over `--eot` passes, computed under bf16
autocast where the CPU/GPU has native bf16, and the outcome is measured in float32 over `--eval-runs` fresh passes.
Rows go to a resumable JSONL file (one record per cell, its header holding every parameter; a run with other
parameters is refused, so variants at another σ or with another booster go to their own file); `--combine` adds
the rows of other finished runs of this script to the table, each row labelled with its run's σ and booster.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from hf_feature_smoothing import FeatureSmoothingConfig
from hf_feature_smoothing.assets.labelled_images import digit_answer, digit_examples
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import MODEL_NAME as LLAVA_NAME
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import llava_checkpoint, prompt_text
from hf_feature_smoothing.assets.registry import resolve_booster_path, resolve_model
from hf_feature_smoothing.attacks.text import answer_attack
from hf_feature_smoothing.runs.fingerprints import file_sha256
from hf_feature_smoothing.runs.runner import Run
from hf_feature_smoothing.statistics.aggregates import bootstrap_ci
from hf_feature_smoothing.utils.hardware import bf16_supported


BUDGETS = [("linf", 4 / 255), ("linf", 8 / 255), ("linf", 16 / 255), ("l2", 2.0)]
MODES = ("untargeted", "targeted")


VARIANTS = ("plain", "smoothed", "smoothed+gsb")


def load_variants(args) -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = llava_checkpoint()
    processor = AutoProcessor.from_pretrained(folder)
    smoothing = FeatureSmoothingConfig(sigma=args.sigma, num_samples=args.num_samples, chunk_size=args.chunk_size)
    variants = {}
    for variant in args.variants:
        if variant == "plain":
            variants[variant] = LlavaForConditionalGeneration.from_pretrained(folder).eval()
        else:
            config = smoothing.to_dict()
            if variant == "smoothed+gsb":
                config["booster"] = resolve_booster_path(args.booster)
            variants[variant] = resolve_model(LLAVA_NAME, smoothing_config=config)  # the built-in LLaVA, smoothed
    return processor, variants


def summarize(records: list[dict], params: dict) -> list[dict]:
    table = []
    for record in records:
        accuracy = [r["accuracy"] for r in record["images"]]
        success = [r["success"] for r in record["images"]]
        smoothed = record["variant"] != "plain"
        table.append({**{k: record[k] for k in ("run", "variant", "mode", "norm", "epsilon")},
                      "images": len(accuracy),
                      "sigma": params["sigma"] if smoothed else None,
                      "num_samples": params["num_samples"] if smoothed else None,
                      "booster": params.get("booster") if record["variant"] == "smoothed+gsb" else None,
                      "accuracy": sum(accuracy) / len(accuracy), "accuracy_ci": bootstrap_ci(accuracy),
                      "success": sum(success) / len(success), "success_ci": bootstrap_ci(success),
                      "seconds": record["seconds"]})
    return table


def describe(params: dict) -> str:
    return (f"{params['images']} held-out digits, σ = {params['sigma']} (pixel [0,1]), n = {params['num_samples']} "
            f"noisy copies per forward, APGD {params['steps']} steps, EOT {params['eot']} pass(es) per step (= "
            f"{params['eot'] * params['num_samples']} noise draws for smoothed variants), gradients in "
            f"{params['gradient_dtype'] or 'float32'}, outcome over {params['eval_runs']} fresh passes in float32"
            + (f", booster `{params['booster']}`" if params.get("booster") else ""))


def markdown(table: list[dict], runs: list[dict]) -> str:
    lines = ["llava-dinov2-smollm2; " + "; ".join(f"run {run['run']}: {describe(run['params'])}" for run in runs)
             + ". Targeted: the answer must become (label + 1) mod 10; untargeted: any other answer. 95% bootstrap "
             "CIs over images.", "",
             "| variant | σ | attack | budget | accuracy | attack success |", "|---|---|---|---|---|---|"]
    for row in table:
        budget = "clean" if row["mode"] == "clean" else (
            f"ℓ∞ {round(row['epsilon'] * 255)}/255" if row["norm"] == "linf" else f"ℓ2 {row['epsilon']:g}")
        success = "–" if row["mode"] == "clean" else (
            f"{row['success']:.1%} [{row['success_ci'][0]:.0%}, {row['success_ci'][1]:.0%}]")
        sigma = "–" if row["sigma"] is None else f"{row['sigma']:g}"
        lines.append(f"| {row['variant']} | {sigma} | {row['mode']} | {budget} | {row['accuracy']:.1%} "
                     f"[{row['accuracy_ci'][0]:.0%}, {row['accuracy_ci'][1]:.0%}] | {success} |")
    return "\n".join(lines) + "\n"


def combined_table(rows: list[dict], header: dict, others: list[str]) -> tuple[list[dict], list[dict]]:
    """This run's cells and those of the finished runs in `others` (same script), in cell order."""
    from hf_feature_smoothing.runs import read_run

    runs = [{"run": header["run"], "params": header["params"], "rows": rows}]
    for path in others:
        contents = read_run(path)
        if contents.header is None or contents.header["command"] != "llava-headline":
            raise SystemExit(f"--combine {path}: not a run file of this script.")
        runs.append({"run": contents.header["run"], "params": contents.header["params"], "rows": contents.rows})
    table = [row for run in runs for row in summarize(run["rows"], run["params"])]
    order = {v: i for i, v in enumerate(VARIANTS)}
    modes = {"clean": 0, "untargeted": 1, "targeted": 2}
    table.sort(key=lambda r: (modes[r["mode"]], order[r["variant"]], r["sigma"] or 0, r["norm"] != "linf",
                              r["epsilon"]))
    return table, [{k: run[k] for k in ("run", "params")} for run in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=30, help="held-out digits (the first N of the test split)")
    parser.add_argument("--sigma", type=float, default=0.25, help="smoothing noise std (pixel [0, 1] units)")
    parser.add_argument("--num-samples", type=int, default=8, help="noisy copies per smoothed forward pass")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="variants to attack (default: plain and smoothed, + smoothed+gsb with --booster)")
    parser.add_argument("--booster", default=None,
                        help="GSB adapter folder, or `llava-dinov2-smollm2-gsb` (the shipped one), for smoothed+gsb")
    parser.add_argument("--steps", type=int, default=10, help="APGD steps")
    parser.add_argument("--eot", type=int, default=1, help="forward passes averaged per gradient (EOT)")
    parser.add_argument("--eval-runs", type=int, default=4, help="fresh forward passes measuring each outcome")
    parser.add_argument("--chunk-size", type=int, default=64, help="noisy images per tower call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    parser.add_argument("--output", default="benchmarks/llava_headline.jsonl", help="resumable JSONL rows")
    parser.add_argument("--combine", nargs="*", default=[], help="finished run files of this script to add to the table")
    parser.add_argument("--table", default="benchmarks/llava_headline.md", help="markdown table")
    args = parser.parse_args()
    if args.variants is None:
        args.variants = ["plain", "smoothed"] + (["smoothed+gsb"] if args.booster else [])
    if ("smoothed+gsb" in args.variants) != bool(args.booster):
        parser.error("--booster and the smoothed+gsb variant go together")
    torch.manual_seed(args.seed)
    gradient_dtype = "bfloat16" if bf16_supported("cuda" if torch.cuda.is_available() else "cpu") else None
    params = {"images": args.images, "sigma": args.sigma, "num_samples": args.num_samples, "steps": args.steps,
              "eot": args.eot, "eval_runs": args.eval_runs, "booster": args.booster, "seed": args.seed,
              "gradient_dtype": gradient_dtype, "algorithm": "apgd"}
    if args.variants != ["plain", "smoothed"]:  # runs of the original layout keep their header
        params["variants"] = args.variants
    if args.booster:
        params["booster_weights"] = booster_digest(resolve_booster_path(args.booster))
    with Run(args.output, "llava-headline").lock() as run:  # locked, resumable, refuses other parameters
        run.open(params)
        rows = attack_cells(args, run)
        header = run.header
    table, runs = combined_table(rows, header, args.combine)
    text = markdown(table, runs)
    Path(args.table).write_text(text)
    Path(args.table).with_suffix(".summary.json").write_text(json.dumps({"runs": runs, "table": table}, indent=1))
    print(text)


def booster_digest(folder: str) -> str:
    return file_sha256(Path(folder) / "adapter_model.safetensors")[:16]


def attack_cells(args, run: Run) -> list[dict]:
    gradient_dtype = run.params["gradient_dtype"]
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
