"""The reference AutoAttack code (`pyautoattack`, `pip install -e ".[autoattack]"`) against the project's own APGD on
the same images: the real-weight `llava-dinov2-smollm2` asked "which digit is this?" with the ten answers "The digit
is k." is a 10-class classifier of [0, 1] images (`AnswerClassifier`: the logits of the ten digit tokens after the
shared prefix), so classifier attacks apply unchanged.

    python benchmarks/autoattack_reference.py --variant plain --version standard
    python benchmarks/autoattack_reference.py --variant smoothed+gsb --version rand --eot 4

Engines, each on the same `--images` held-out digits at the same budget:
- `autoattack`: `pyautoattack.AutoAttack(version=...)`: "standard" (APGD-CE, APGD-T, FAB-T, Square; deterministic
  models), "rand" (APGD-CE and APGD-DLR with EOT, for randomised defenses; `--eot` sets its `eot_iter`, 20 in the
  reference) or "apgd-ce" (APGD-CE alone, `--steps` iterations, `--eot` EOT), the like-for-like twin of:
- `project`: the project's APGD-CE on the classifier view (`classifier_attack`: `--steps` iterations, `--eot` EOT,
  images retired at success).
Each adversarial image is then measured the same way: the majority class of `--eval-runs` fresh classifier calls.
Rows go to a resumable JSONL file; the table gives robust accuracy with 95 % Wilson intervals.
"""

import argparse
import time
from pathlib import Path

import torch

from hf_feature_smoothing.assets.registry import resolve_booster_path
from hf_feature_smoothing.attacks.classifier import AnswerClassifier, classifier_attack, majority_predictions
from hf_feature_smoothing.attacks.protocol import parse_budget
from hf_feature_smoothing.runs.runner import Run
from hf_feature_smoothing.smoothing.towers import ImageInputs
from hf_feature_smoothing.statistics.aggregates import wilson_interval
from hf_feature_smoothing.utils.atomic import write_atomically
from hf_feature_smoothing.utils.hardware import bf16_supported


VERSIONS = ("standard", "rand", "apgd-ce")


def reference_attack(classifier, images, labels, norm: str, epsilon: float, args) -> torch.Tensor:
    from pyautoattack import AutoAttack

    norm_name = {"linf": "Linf", "l2": "L2"}[norm]
    if args.version == "apgd-ce":
        attack = AutoAttack(classifier, norm=norm_name, eps=epsilon, version="custom", attacks=["apgd-ce"],
                            seed=args.seed, device="cpu")
    else:
        attack = AutoAttack(classifier, norm=norm_name, eps=epsilon, version=args.version, seed=args.seed, device="cpu")
    if args.version != "standard":
        attack.apgd.n_iter, attack.apgd.eot_iter = args.steps, args.eot
    adversarial, _ = attack.run_standard_evaluation(images, labels, batch_size=len(images))
    return adversarial


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from llava_protocol import VARIANTS, Workbench, add_shared_arguments, booster_digest, stop_rule

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10, help="held-out digits (the first N of the test split)")
    parser.add_argument("--variant", choices=VARIANTS, default="smoothed+gsb", help="model variant")
    parser.add_argument("--version", choices=VERSIONS, default="apgd-ce", help="AutoAttack version compared")
    parser.add_argument("--budget", default="linf:4", help="linf:K (K/255) or l2:R")
    parser.add_argument("--steps", type=int, default=100, help="APGD iterations (both engines)")
    parser.add_argument("--eot", type=int, default=4, help="EOT calls per gradient (both engines; smoothed variants)")
    add_shared_arguments(parser)
    parser.add_argument("--output", default=None, help="resumable JSONL (default: benchmarks/autoattack_<variant>_<version>.jsonl)")
    args = parser.parse_args()
    try:
        norm, epsilon = parse_budget(args.budget)
    except ValueError as e:
        parser.error(f"--budget: {e}")
    if not 0.5 <= args.confirm_share < 1:
        parser.error(f"--confirm-share must be in [0.5, 1), got {args.confirm_share}.")
    if args.variant == "plain":
        args.eot, args.eval_runs = 1, 1  # deterministic
    args.gradient_dtype = "bfloat16" if bf16_supported("cpu") else None
    output = args.output or f"benchmarks/autoattack_{args.variant.replace('+', '_')}_{args.version}.jsonl"
    params = {k: getattr(args, k) for k in ("images", "batch_size", "variant", "version", "budget", "steps", "eot",
                                             "eval_runs", "sigma", "num_samples", "booster", "seed")}
    params["booster_weights"] = booster_digest(resolve_booster_path(args.booster))
    if args.confirm_share != 0.5:  # the project's engine confirms successes on fresh calls (earlier runs did not)
        params["stop_rule"] = stop_rule(args.confirm_share)
    bench = Workbench(args)
    model = bench.model(args.variant)
    prompt = bench.inputs([0])
    classifier = AnswerClassifier(model, {k: v[:1] for k, v in prompt.items()}, bench.candidates,
                                  pad_token_id=bench.tokenizer.pad_token_id)
    with Run(output, "autoattack-reference").lock() as run:
        run.open(params)
        for start in range(0, args.images, args.batch_size):
            indices = list(range(start, min(args.images, start + args.batch_size)))
            inputs = bench.inputs(indices)
            images = classifier.adapter.to_image(ImageInputs(inputs["pixel_values"])).detach()
            labels = torch.tensor([bench.examples[i].label for i in indices])
            for engine in ("project", "autoattack"):
                key = f"{engine}|batch{start // args.batch_size}"
                if key in run.done:
                    continue
                begin = time.time()
                if engine == "project":
                    attack = classifier_attack(classifier, images, labels, epsilon, norm=norm, steps=args.steps,
                                               eot_samples=args.eot, generator=torch.Generator().manual_seed(args.seed),
                                               confirm_runs=args.eval_runs if args.confirm_share > 0.5 else 0,
                                               confirm_share=args.confirm_share)
                    adversarial = (images + attack.delta).clamp(0, 1)
                else:
                    adversarial = reference_attack(classifier, images, labels, norm, epsilon, args)
                predicted, agreement = majority_predictions(classifier, adversarial, args.eval_runs)
                run.append({"key": key, "status": "ok", "engine": engine, "seconds": round(time.time() - begin, 1),
                            "images": [{"index": i, "label": int(y), "predicted": int(p), "agreement": float(a),
                                        "robust": bool(p == y and a > 0.5)}
                                       for i, y, p, a in zip(indices, labels, predicted, agreement)]})
                print(f"{key}: robust {int(((predicted == labels) & (agreement > 0.5)).sum())}/{len(indices)} ({time.time() - begin:.0f} s)",
                      flush=True)
        rows = run.finish()
    lines = [(f"AutoAttack ({args.version}) vs the project's APGD-CE on the classifier view of llava-dinov2-smollm2, "
             f"{args.variant}, {args.budget}, {args.steps} iterations, EOT {args.eot}, outcome = majority of "
             f"{args.eval_runs} fresh calls; 95 % Wilson intervals over images."), "",
             "| engine | images | robust accuracy | seconds |", "|---|---|---|---|"]
    for engine in ("project", "autoattack"):
        images = [im for r in rows if r["engine"] == engine for im in r["images"]]
        if images:
            robust = sum(im["robust"] for im in images)
            low, high = wilson_interval(robust, len(images))
            lines.append(f"| {engine} | {len(images)} | {robust}/{len(images)} [{low:.0%}, {high:.0%}] | "
                         f"{sum(r['seconds'] for r in rows if r['engine'] == engine):.0f} |")
    write_atomically(Path(output).with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
