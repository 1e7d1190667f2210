"""The field's attack protocol on the real-weight `llava-dinov2-smollm2` (which digit is this?), worst case per
image over an ensemble of attacks, and the study that shows how strong the attack is.

    # 1. attack strength: success vs iterations and EOT passes (10 digits, smoothed + GSB, ℓ∞ 4/255, targeted)
    python benchmarks/llava_protocol.py saturation --images 10
    # 2. the protocol: every variant, budget and attack; run in pieces (the same output resumes)
    python benchmarks/llava_protocol.py protocol --images 100 --variants smoothed+gsb --budgets linf:4
    accelerate launch benchmarks/llava_protocol.py protocol ...   # shards the image batches over processes

Protocol (per variant, norm and budget; budgets of a norm in increasing order):
- `apgd-ce`: untargeted APGD (Croce & Hein 2020) on the cross-entropy of the reference answer;
- `apgd-t`: targeted APGD towards "The digit is (label + 1) mod 10.";
- `apgd-t-runner-up`: targeted APGD towards each of the `--runner-ups` answers the clean model ranks next;
- `feature`: APGD minimising the cosine of the image tokens at the language model's input (the smoothed tower's
  feature site, the projector output) to their clean value, then the answer is measured (transfer to the answer);
- `transfer`: the `apgd-ce` and `apgd-t` perturbations found on the plain model, measured on the variant.
Every APGD runs `--steps` iterations with `--eot` forward passes per gradient (each pass of a smoothed model draws
n fresh noise copies: EOT over n · eot draws), gradients under bf16 autocast where the hardware has native bf16,
and stops an image once most passes of a step give the attack's answer. Each outcome is measured on `--eval-runs`
fresh float32 passes; an image counts as broken when most of them give a wrong answer (untargeted) or the target
(targeted). Only images not yet broken are attacked (as AutoAttack does), and an image broken at a smaller budget of
the same norm counts as broken at the larger ones. Rows (one per variant × budget × attack × image batch) go to a
resumable JSONL file whose header holds every parameter; the table gives, per cell, robust accuracy (worst case over
the attacks) and targeted success with 95 % Wilson intervals over images, and the seconds per image per 100 steps.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hf_feature_smoothing import FeatureSmoothingConfig
from hf_feature_smoothing.assets.labelled_images import digit_answer, digit_examples
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import MODEL_NAME as LLAVA_NAME
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import llava_checkpoint, prompt_text
from hf_feature_smoothing.assets.registry import resolve_booster_path, resolve_model
from hf_feature_smoothing.attacks.feature import feature_attack
from hf_feature_smoothing.attacks.protocol import BUDGETS, budget_name, image_states, parse_budget, protocol_cells
from hf_feature_smoothing.attacks.text import answer_attack
from hf_feature_smoothing.models.answers import CandidateAnswers
from hf_feature_smoothing.runs import read_run
from hf_feature_smoothing.runs.fingerprints import file_sha256
from hf_feature_smoothing.runs.runner import Run
from hf_feature_smoothing.runs.sharding import Shard
from hf_feature_smoothing.statistics.aggregates import wilson_interval
from hf_feature_smoothing.utils.atomic import write_atomically
from hf_feature_smoothing.utils.hardware import bf16_supported


VARIANTS = ("plain", "smoothed", "smoothed+gsb")
ATTACKS = ("apgd-ce", "apgd-t", "apgd-t-runner-up", "feature", "transfer")
SATURATION_STEPS = (10, 25, 50, 100, 200)


def booster_digest(folder: str) -> str:
    """The shipped benchmarks' booster id: the first 16 hex digits of its weights file's SHA-256."""
    return file_sha256(Path(folder) / "adapter_model.safetensors")[:16]


class Workbench:
    """The processor, the held-out digits with their answers, and the variants (loaded on first use)."""

    def __init__(self, args):
        from transformers import AutoProcessor

        self.args = args
        self.folder = llava_checkpoint()
        self.processor = AutoProcessor.from_pretrained(self.folder)
        self.tokenizer = self.processor.tokenizer
        self.examples = digit_examples("test", limit=args.images)
        self.candidates = CandidateAnswers.from_texts(self.tokenizer, [digit_answer(d) for d in range(10)],
                                                      suffix="<|im_end|>")
        self._models = {}

    def answer(self, digit: int) -> list[int]:
        return list(self.candidates.token_ids[digit])

    def inputs(self, indices: list[int]) -> dict:
        examples = [self.examples[i] for i in indices]
        inputs = self.processor(images=[e.image for e in examples], text=[prompt_text(e.question) for e in examples],
                                return_tensors="pt", padding=True)
        return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}

    def model(self, variant: str):
        if variant not in self._models:
            from transformers import LlavaForConditionalGeneration

            if variant == "plain":
                self._models[variant] = LlavaForConditionalGeneration.from_pretrained(self.folder).eval()
            else:
                config = FeatureSmoothingConfig(sigma=self.args.sigma, num_samples=self.args.num_samples,
                                                chunk_size=self.args.chunk_size).to_dict()
                if variant == "smoothed+gsb":
                    config["booster"] = resolve_booster_path(self.args.booster)
                self._models[variant] = resolve_model(LLAVA_NAME, smoothing_config=config)
        return self._models[variant]

    def attack(self, variant: str, indices: list[int], norm: str, epsilon: float, *, target: list[int] | None,
               steps: int, eot: int, delta: torch.Tensor | None = None):
        """APGD on the answers of `indices` (targeted at the digits `target` when given), or measure `delta`."""
        smoothed = variant != "plain"
        references = [self.answer(self.examples[i].label) for i in indices]
        return answer_attack(
            self.model(variant), self.inputs(indices), references, epsilon, norm=norm, steps=steps,
            target_ids=None if target is None else [self.answer(t) for t in target],
            eot_samples=eot if smoothed else 1, eval_runs=self.args.eval_runs if smoothed else 1,
            pad_token_id=self.tokenizer.pad_token_id, gradient_dtype=self.args.gradient_dtype,
            generator=torch.Generator().manual_seed(self.args.seed), stop_at_success=True,
            confirm_share=self.args.confirm_share, delta=delta)


def image_record(index: int, example, result, **extra) -> dict:
    return {"index": index, "key": example.key, "label": example.label, "accuracy": result.accuracy,
            "success": result.success, "broken": result.success > 0.5, "norm": result.norm, "loss": result.loss,
            "first_success": result.first_success, "evaluations": result.evaluations, **extra}


# ----- 1. saturation ------------------------------------------------------------------------------------------------
def saturation(args, bench: Workbench, run: Run, shard: Shard) -> None:
    norm, epsilon = parse_budget(args.budget)
    for eot in args.eots:
        for batch, indices in batches(args, shard):
            key = f"saturation|eot{eot}|batch{batch}"
            if key in run.done:
                continue
            start = time.time()
            target = [(bench.examples[i].label + 1) % 10 for i in indices]
            results = bench.attack(args.variant, indices, norm, epsilon, target=target, steps=max(args.steps), eot=eot)
            images = [image_record(i, bench.examples[i], r) for i, r in zip(indices, results)]
            run.append({"key": key, "status": "ok", "eot": eot, "seconds": round(time.time() - start, 1), "images": images})
            print(f"{key}: {sum(r['broken'] for r in images)}/{len(images)} broken ({time.time() - start:.0f} s)",
                  flush=True)


def saturation_table(rows: list[dict], params: dict) -> str:
    lines = [(f"Attack strength on {params['images']} held-out digits, {params['variant']} (σ = {params['sigma']}, "
             f"n = {params['num_samples']}), targeted APGD to (label + 1) mod 10 at {params['budget']}, one run of "
             f"{max(params['steps'])} iterations per EOT setting; 'by k' = most passes of a step gave the target at "
             f"iteration ≤ k; 'measured' = most of {params['eval_runs']} fresh passes give the target at the end. "
             "95 % Wilson intervals over images."), "",
             "| EOT passes (draws) | " + " | ".join(f"by {k}" for k in params["steps"]) + " | measured | s / image / 100 it |",
             "|---" * (len(params["steps"]) + 3) + "|"]
    for eot in params["eots"]:
        images = [i for r in rows if r["eot"] == eot for i in r["images"]]
        if not images:
            continue
        total = len(images)
        cells = []
        for k in params["steps"]:
            hit = sum(0 <= i["first_success"] <= k for i in images)
            low, high = wilson_interval(hit, total)
            cells.append(f"{hit}/{total} [{low:.0%}, {high:.0%}]")
        broken = sum(i["broken"] for i in images)
        low, high = wilson_interval(broken, total)
        seconds = sum(r["seconds"] for r in rows if r["eot"] == eot)
        evaluations = sum(i["evaluations"] for i in images)
        lines.append(f"| {eot} ({eot * params['num_samples']}) | " + " | ".join(cells)
                     + f" | {broken}/{total} [{low:.0%}, {high:.0%}] | {100 * seconds / max(1, evaluations):.0f} |")
    return "\n".join(lines) + "\n"


# ----- 2. protocol --------------------------------------------------------------------------------------------------
def runner_ups(bench: Workbench, indices: list[int], count: int) -> list[list[int]]:
    """The `count` digits other than the label that the plain model scores highest on each clean image."""
    inputs = bench.inputs(indices)
    prefixed, positions = bench.candidates.with_prefix(inputs, bench.tokenizer.pad_token_id)
    with torch.no_grad():
        scores = bench.candidates.scores(bench.model("plain"), prefixed, positions, inputs["pixel_values"])
    ranked = []
    for row, i in enumerate(indices):
        order = scores[row].argsort(descending=True).tolist()
        ranked.append([d for d in order if d != bench.examples[i].label][:count])
    return ranked


def feature_deltas(bench: Workbench, variant: str, indices: list[int], norm: str, epsilon: float) -> torch.Tensor:
    """APGD on the cosine of the image tokens at the language model's input (the smoothed tower's feature site)."""
    args, smoothed = bench.args, variant != "plain"
    results = feature_attack(bench.model(variant), bench.inputs(indices)["pixel_values"], None, epsilon, norm=norm,
                             steps=args.steps, eot_samples=args.eot * args.num_samples if smoothed else 0,
                             eval_samples=args.num_samples if smoothed else 0, input_space="processed",
                             generator=torch.Generator().manual_seed(args.seed))
    results = results if isinstance(results, list) else [results]
    return torch.stack([r.delta for r in results])


def protocol(args, bench: Workbench, run: Run, shard: Shard) -> None:
    rows = list(read_run(args.output).rows) if Path(args.output).exists() else []
    for variant in args.variants:
        for budget in args.budgets:
            norm, epsilon = parse_budget(budget)
            for batch, indices in batches(args, shard):
                for attack in args.attacks:
                    key = f"protocol|{variant}|{budget}|{attack}|batch{batch}"
                    if key in run.done or (attack == "transfer" and variant == "plain"):
                        continue
                    state = image_states(rows, variant, budget, indices)
                    todo = [i for i in indices if not (state[i]["target"] if attack == "apgd-t" else state[i]["broken"])]
                    start, images = time.time(), []
                    if todo:
                        images = run_attack(bench, attack, variant, todo, norm, epsilon)
                    row = {"key": key, "status": "ok", "variant": variant, "budget": budget, "attack": attack, "batch": batch,
                           "attacked": todo, "seconds": round(time.time() - start, 1), "images": images}
                    run.append(row)
                    rows.append(row)
                    print(f"{key}: {len(todo)} attacked, {sum(r['broken'] for r in images)} broken "
                          f"({time.time() - start:.0f} s)", flush=True)


def run_attack(bench: Workbench, attack: str, variant: str, todo: list[int], norm: str, epsilon: float) -> list[dict]:
    args, examples = bench.args, bench.examples
    nxt = [(examples[i].label + 1) % 10 for i in todo]
    if attack == "apgd-ce":
        results = bench.attack(variant, todo, norm, epsilon, target=None, steps=args.steps, eot=args.eot)
        return [image_record(i, examples[i], r, mode="untargeted") for i, r in zip(todo, results)]
    if attack == "apgd-t":
        results = bench.attack(variant, todo, norm, epsilon, target=nxt, steps=args.steps, eot=args.eot)
        return [image_record(i, examples[i], r, mode="targeted-next") for i, r in zip(todo, results)]
    if attack == "apgd-t-runner-up":
        records = []
        for rank, targets in enumerate(zip(*runner_ups(bench, todo, args.runner_ups))):
            results = bench.attack(variant, todo, norm, epsilon, target=list(targets), steps=args.steps, eot=args.eot)
            records += [image_record(i, examples[i], r, mode="targeted-runner-up", rank=rank, target=t)
                        for i, r, t in zip(todo, results, targets)]
        return records
    if attack == "feature":
        delta = feature_deltas(bench, variant, todo, norm, epsilon)
        results = bench.attack(variant, todo, norm, epsilon, target=None, steps=1, eot=1, delta=delta)
        return [image_record(i, examples[i], r, mode="untargeted") for i, r in zip(todo, results)]
    records = []
    for mode, target in (("untargeted", None), ("targeted-next", nxt)):
        found = bench.attack("plain", todo, norm, epsilon, target=target, steps=args.steps, eot=1)
        delta = torch.stack([r.delta for r in found])
        results = bench.attack(variant, todo, norm, epsilon, target=target, steps=1, eot=1, delta=delta)
        records += [image_record(i, examples[i], r, mode=mode) for i, r in zip(todo, results)]
    return records


def protocol_table(rows: list[dict], params: dict) -> str:
    lines = [(f"llava-dinov2-smollm2 on held-out digits; σ = {params['sigma']}, n = {params['num_samples']}, APGD "
              f"{params['steps']} iterations × {params['eot']} EOT passes ({params['eot'] * params['num_samples']} "
              f"draws), {params['eval_runs']} fresh passes per outcome; worst case per image over the attacks listed "
              "(an image broken at a smaller budget of the same norm counts as broken). 95 % Wilson intervals."), "",
             "| variant | budget | attacks run | images | robust accuracy | targeted success (next digit) | s / image / 100 it |",
             "|---|---|---|---|---|---|---|"]
    for cell in protocol_cells(rows, VARIANTS, ATTACKS):
        (r_low, r_high), (t_low, t_high) = cell.robust_interval, cell.targeted_interval
        seconds = "–" if cell.seconds_per_100_steps is None else f"{cell.seconds_per_100_steps:.0f}"
        targeted = (f"{cell.targeted / cell.images:.1%} [{t_low:.0%}, {t_high:.0%}]" if "apgd-t" in cell.attacks
                    else "– (apgd-t not run)")
        lines.append(f"| {cell.variant} | {budget_name(cell.budget)} | {', '.join(cell.attacks)} | {cell.images} | "
                     f"{cell.robust / cell.images:.1%} [{r_low:.0%}, {r_high:.0%}] | {targeted} | {seconds} |")
    return "\n".join(lines) + "\n"


# ----- shared -------------------------------------------------------------------------------------------------------
def batches(args, shard: Shard):
    """(batch number, image indices) of this process's share of the images."""
    count = math.ceil(args.images / args.batch_size)
    for batch in shard.indices(count):
        yield batch, list(range(batch * args.batch_size, min(args.images, (batch + 1) * args.batch_size)))


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the model variants and of measuring an outcome (this script and autoattack_reference.py)."""
    parser.add_argument("--batch-size", type=int, default=5, help="images attacked together (one row each batch)")
    parser.add_argument("--sigma", type=float, default=0.5, help="smoothing noise std (pixel [0, 1] units)")
    parser.add_argument("--num-samples", type=int, default=8, help="noisy copies per smoothed forward pass")
    parser.add_argument("--booster", default="llava-dinov2-smollm2-gsb", help="GSB adapter of the smoothed+gsb variant")
    parser.add_argument("--chunk-size", type=int, default=64, help="noisy images per tower call")
    parser.add_argument("--eval-runs", type=int, default=8, help="fresh forward passes measuring each outcome")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    parser.add_argument("--confirm-share", type=float, default=0.5,
                        help="an image is retired (stop at success) once more than this share of --eval-runs fresh "
                             "passes confirm the success, in [0.5, 1); 0.75 retires only clear successes")


def stop_rule(confirm_share: float) -> str:
    """The early-stopping rule in words (a run header parameter: rows of different rules never pool)."""
    if confirm_share == 0.5:  # the wording of the runs made before the option existed
        return "most EOT passes of a step, confirmed by most of eval_runs fresh passes"
    return f"most EOT passes of a step, confirmed by more than {confirm_share:g} of eval_runs fresh passes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=("saturation", "protocol"), help="attack-strength study or the protocol")
    parser.add_argument("--images", type=int, default=None, help="held-out digits, the first N of the test split "
                        "(default: 10 for saturation, 100 for protocol)")
    add_shared_arguments(parser)
    parser.add_argument("--output", default=None, help="resumable JSONL rows (default: benchmarks/llava_<study>.jsonl)")
    saturation_group = parser.add_argument_group("saturation")
    saturation_group.add_argument("--variant", choices=VARIANTS, default="smoothed+gsb", help="variant studied")
    saturation_group.add_argument("--budget", default="linf:4", help="budget studied (linf:K for K/255, l2:R)")
    saturation_group.add_argument("--eots", type=int, nargs="+", default=[1, 4, 16], help="EOT passes compared")
    protocol_group = parser.add_argument_group("protocol")
    protocol_group.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="variants")
    protocol_group.add_argument("--budgets", nargs="+", choices=BUDGETS, default=list(BUDGETS),
                                help="budgets: linf:K is ℓ∞ K/255, l2:R is ℓ2 R (pixel [0, 1] units)")
    protocol_group.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS), help="attacks")
    protocol_group.add_argument("--steps", type=int, default=100, help="APGD iterations (saturation: the longest)")
    protocol_group.add_argument("--eot", type=int, default=4, help="forward passes averaged per gradient (EOT)")
    protocol_group.add_argument("--runner-ups", type=int, default=2, help="runner-up answers attacked as targets")
    args = parser.parse_args()
    try:
        parse_budget(args.budget)
    except ValueError as e:
        parser.error(f"--budget: {e}")
    for name in ("images", "batch_size", "num_samples", "eval_runs", "steps", "eot"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}.")
    if not 0.5 <= args.confirm_share < 1:
        parser.error(f"--confirm-share must be in [0.5, 1), got {args.confirm_share}.")
    args.images = args.images or (10 if args.study == "saturation" else 100)
    args.output = args.output or f"benchmarks/llava_{args.study}.jsonl"
    args.gradient_dtype = "bfloat16" if bf16_supported("cuda" if torch.cuda.is_available() else "cpu") else None
    params = {"images": args.images, "batch_size": args.batch_size, "sigma": args.sigma,
              "num_samples": args.num_samples, "booster": args.booster,
              "booster_weights": booster_digest(resolve_booster_path(args.booster)), "eval_runs": args.eval_runs,
              "seed": args.seed, "gradient_dtype": args.gradient_dtype, "algorithm": "apgd",
              "stop_rule": stop_rule(args.confirm_share)}
    if args.study == "saturation":
        args.steps = sorted(set(SATURATION_STEPS) | {args.steps}) if args.steps != 100 else list(SATURATION_STEPS)
        params.update(variant=args.variant, budget=args.budget, eots=args.eots, steps=args.steps)
    else:
        # which variants, budgets, attacks and images run is a choice per invocation (rows carry them), so a run
        # grows in pieces; what makes rows comparable is fixed in the header
        params.update(steps=args.steps, eot=args.eot, runner_ups=args.runner_ups)
        del params["images"]
    shard = Shard.from_accelerate()
    bench = Workbench(args)
    with Run(args.output, f"llava-{args.study}", shard).lock() as run:
        run.open(params)
        (saturation if args.study == "saturation" else protocol)(args, bench, run, shard)
        rows = run.finish()
    if rows is not None:
        text = (saturation_table if args.study == "saturation" else protocol_table)(rows, run.params)
        write_atomically(Path(args.output).with_suffix(".md"), text.encode())
        write_atomically(Path(args.output).with_suffix(".summary.json"),
                         json.dumps({"params": run.params}, indent=1).encode())
        print(text)


if __name__ == "__main__":
    main()
