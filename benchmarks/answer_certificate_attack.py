"""Attack the certified answers of the real-weight LLaVA inside their certified radii: no attack may beat a
certificate. Reads a `hf-fs certify-answer` run (default: the digits, σ = 0.5, shipped booster cell of
`prediction_certificates.py`), takes its first `--images` digits certified correct at radius R ≥ `--min-radius`, and
attacks each with EOT-APGD (ℓ2, untargeted on the certified answer's cross-entropy, `--eot` single-copy forward
passes per step: EOT over the smoothing noise) at ε = f·R for each `--fractions` f, then counts the certified answer
among `--votes` fresh single-copy answers at x + δ. The certificate promises p(x + δ) ≥ Φ(Φ⁻¹(p̲_A) − ε/σ) (> ½ for
ε < R: the majority answer stays); a row is **refuted** when a one-sided binomial test rejects that at level 0.001.

    python benchmarks/answer_certificate_attack.py --images 10 --steps 20 --eot 4

The model, prompt, candidates and booster are rebuilt from the run's header and checked against each certificate's
digests (the function attacked is the one certified); every pass runs in the run's dtype. Rows (one per image ×
fraction) go to a resumable JSONL file whose header holds every parameter; the table goes to the `.md` beside it."""

import argparse
import math
import time
from pathlib import Path

import torch

from hf_feature_smoothing import CandidateAnswers, FeatureSmoothingConfig, SmoothedLlavaForConditionalGeneration
from hf_feature_smoothing.assets.labelled_images import digit_examples
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import llava_checkpoint
from hf_feature_smoothing.assets.registry import resolve_booster_path
from hf_feature_smoothing.attacks.classifier import AnswerClassifier, classifier_attack
from hf_feature_smoothing.commands.running import run_info
from hf_feature_smoothing.models.answer_certificates import booster_record, prompt_digest
from hf_feature_smoothing.runs import read_run
from hf_feature_smoothing.runs.fingerprints import file_sha256, weights_fingerprint
from hf_feature_smoothing.runs.runner import Run
from hf_feature_smoothing.runs.sharding import Shard
from hf_feature_smoothing.smoothing.towers import ImageInputs
from hf_feature_smoothing.statistics.aggregates import wilson_interval
from hf_feature_smoothing.statistics.bounds import normal_cdf, normal_ppf
from hf_feature_smoothing.utils.atomic import write_atomically


RUN = "benchmarks/prediction_runs/digits-vote-answers-gsb-sigma0.5-bfloat16.jsonl"
LEVEL = 1e-3  # the refutation test's level


def binomial_cdf(hits: int, votes: int, p: float) -> float:
    """P(X ≤ hits) for X ~ Binomial(votes, p)."""
    return sum(math.comb(votes, k) * p**k * (1 - p) ** (votes - k) for k in range(hits + 1))


def certified_rows(path: str, images: int, min_radius: float) -> list[dict]:
    rows = [r for r in read_run(path).rows if r["status"] == "ok" and r["correct"] and r["radius"] >= min_radius]
    return rows[:images]


class Target:
    """The certified function of a certify-answer run: the smoothed LLaVA (one noisy copy per pass), its prompt and
    candidates, each checked against the digests its certificates carry."""

    def __init__(self, params: dict):
        from transformers import AutoProcessor

        booster = resolve_booster_path(params["booster"]) if params.get("booster") else None
        smoothing = FeatureSmoothingConfig(sigma=params["sigma"], num_samples=1, seed=0, booster=booster)
        self.model = SmoothedLlavaForConditionalGeneration.from_pretrained(llava_checkpoint(), smoothing=smoothing)
        self.model.eval()
        self.processor = AutoProcessor.from_pretrained(llava_checkpoint())
        self.candidates = CandidateAnswers.from_texts(self.processor.tokenizer, params["candidates"])
        self.prompt = params["prompt"]
        self.dtype = getattr(torch, params.get("dtype", "float32"))
        self.digests = {"candidates_digest": self.candidates.digest(),
                        "booster_digest": booster_record(self.model)[1]}
        if weights_fingerprint(self.model) != params["model_weights"]:  # the checkpoint (and booster) certified
            raise SystemExit(f"the run certified weights {params['model_weights']}, the rebuilt model has "
                             f"{weights_fingerprint(self.model)}: it was made with another checkpoint or booster.")

    def classifier(self, row: dict, image) -> tuple[AnswerClassifier, torch.Tensor]:
        """The base classifier of `row`'s certificate on `image` (its digests checked) and the [0, 1] image."""
        inputs = self.processor(images=[image], text=[self.prompt], return_tensors="pt")
        inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}
        found = {**self.digests, "prompt_digest": prompt_digest(inputs["input_ids"], inputs["attention_mask"])}
        for key, value in found.items():
            if value != row[key]:
                raise SystemExit(f"{row['key']}: its certificate's {key} is {row[key]}, the rebuilt model's {value}; "
                                 "the run was made with another model, booster, prompt or candidate set.")
        classifier = AnswerClassifier(self.model, inputs, self.candidates,
                                      pad_token_id=self.processor.tokenizer.pad_token_id)
        pixels = self.model.smoothed_vision_tower.family.to_image(ImageInputs(inputs["pixel_values"]))
        return classifier, pixels

    def autocast(self):
        return torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32)


def attack_row(target: Target, row: dict, example, fraction: float, args) -> dict:
    classifier, image = target.classifier(row, example.image)
    epsilon = fraction * row["radius"]
    guaranteed = normal_cdf(normal_ppf(row["p_lower"]) - epsilon / row["sigma"])
    start = time.perf_counter()
    with target.autocast():
        found = classifier_attack(classifier, image, torch.tensor([row["answer"]]), epsilon, norm="l2",
                                  steps=args.steps, eot_samples=args.eot, stop_at_success=False,
                                  generator=torch.Generator().manual_seed(args.seed))
        delta = found.delta.detach()
        with torch.no_grad():
            votes = torch.cat([classifier((image + delta).expand(args.batch, -1, -1, -1)).argmax(-1).cpu()
                               for _ in range(math.ceil(args.votes / args.batch))])[: args.votes]
    hits = int((votes == row["answer"]).sum())
    return {"key": f"{row['key']}|{fraction:g}", "image": row["key"], "status": "ok", "label": row["label"], "radius": row["radius"], "p_lower": row["p_lower"],
            "fraction": fraction, "epsilon": epsilon, "delta_norm": float(delta.flatten().norm()),
            "guaranteed": guaranteed, "hits": hits, "votes": args.votes,
            "refuted": binomial_cdf(hits, args.votes, guaranteed) <= LEVEL,
            "answers": torch.bincount(votes, minlength=len(row["candidates"])).tolist(),
            "seconds": round(time.perf_counter() - start, 1)}


def table(rows: list[dict], params: dict) -> str:
    title = (f"Certified answers attacked inside their radius: {params['run']} (sha256 {params['run_sha256'][:12]}), "
             f"the first {params['images']} digits certified correct at R ≥ {params['min_radius']}; EOT-APGD ℓ2 "
             f"untargeted, {params['steps']} steps × {params['eot']} single-copy passes, {params['votes']} fresh "
             f"votes at x + δ in {params['dtype']}; refuted: one-sided binomial test of p ≥ Φ(Φ⁻¹(p̲_A) − ε/σ) at "
             f"level {LEVEL:g}.")
    head = ("| ε / R | images | refuted | vote share at x + δ: min / median | guaranteed (median) | "
            "min share − guaranteed | s / image |")
    lines = [title, "", head, "|---|---|---|---|---|---|---|"]
    for fraction in sorted({r["fraction"] for r in rows}):
        cell = [r for r in rows if r["fraction"] == fraction]
        shares = sorted(r["hits"] / r["votes"] for r in cell)
        guaranteed = sorted(r["guaranteed"] for r in cell)
        gap = min(r["hits"] / r["votes"] - r["guaranteed"] for r in cell)
        refuted = sum(r["refuted"] for r in cell)
        low, high = wilson_interval(refuted, len(cell))
        lines.append(f"| {fraction:g} | {len(cell)} | {refuted} [{low:.2f}, {high:.2f}] | {shares[0]:.2f} / "
                     f"{shares[len(shares) // 2]:.2f} | {guaranteed[len(guaranteed) // 2]:.3f} | {gap:+.3f} | "
                     f"{sorted(r['seconds'] for r in cell)[len(cell) // 2]:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=RUN, help="the certify-answer run whose certificates are attacked")
    parser.add_argument("--images", type=int, default=10, help="certified-correct digits attacked (the run's first)")
    parser.add_argument("--min-radius", type=float, default=0.25, help="only certificates of at least this radius")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0], help="ε as fractions of R, in (0, 1]")
    parser.add_argument("--steps", type=int, default=20, help="APGD iterations")
    parser.add_argument("--eot", type=int, default=4, help="single-copy forward passes averaged per gradient")
    parser.add_argument("--votes", type=int, default=96, help="fresh single-copy answers counted at x + δ")
    parser.add_argument("--batch", type=int, default=16, help="noisy copies per forward pass when voting")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack's random start")
    parser.add_argument("--output", default="benchmarks/answer_certificate_attack.jsonl", help="resumable JSONL rows")
    args = parser.parse_args()
    for name in ("images", "steps", "eot", "votes", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be ≥ 1, got {getattr(args, name)}.")
    if not all(0 < f <= 1 for f in args.fractions):
        parser.error(f"--fractions: each in (0, 1] (inside the certified radius), got {args.fractions}.")
    run_file = read_run(args.run)
    rows = certified_rows(args.run, args.images, args.min_radius)
    if not rows:
        parser.error(f"--run {args.run}: no certified-correct row with radius ≥ {args.min_radius}.")
    params = {"run": args.run, "run_sha256": file_sha256(args.run), "images": args.images,
              "min_radius": args.min_radius, "steps": args.steps, "eot": args.eot, "votes": args.votes,
              "batch": args.batch, "seed": args.seed, "dtype": run_file.header["params"].get("dtype", "float32"),
              "norm": "l2",
              "attack": "apgd-ce (untargeted, certified answer)", "level": LEVEL}
    target = Target(run_file.header["params"])
    examples = {e.key: e for e in digit_examples("test")}
    shard = Shard.from_accelerate()
    with Run(args.output, "answer-certificate-attack", shard).lock() as run:
        run.open(params, run_info(shard, len(rows) * len(args.fractions)), newer_params=("batch",))
        for row in rows:
            for fraction in args.fractions:
                if f"{row['key']}|{fraction:g}" in run.done:
                    continue
                result = attack_row(target, row, examples[row["key"]], fraction, args)
                run.append(result)
                print(f"{row['key']} ε = {fraction:g}·R = {result['epsilon']:.3f}: {result['hits']}/{args.votes} "
                      f"votes for the certified answer (guaranteed ≥ {result['guaranteed']:.3f}), "
                      f"refuted {result['refuted']} ({result['seconds']:.0f} s)", flush=True)
        finished = run.finish()
    if finished is not None:
        text = table(finished, run.params)
        write_atomically(Path(args.output).with_suffix(".md"), text.encode())
        print(text)


if __name__ == "__main__":
    main()
