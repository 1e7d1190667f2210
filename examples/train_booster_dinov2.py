"""Train Gaussian Smoothness Boosters on the real DINOv2-S/14 (offline) and measure what they buy.

    python examples/train_booster_dinov2.py                           # the README table (hours on 2 busy CPU cores)
    python examples/train_booster_dinov2.py --quick --output-dir /tmp/gsb   # smoke run, a few minutes

Three encoders on one held-out protocol: the stock DINOv2 (`none`), today's booster (`mapper`: token-wise residual MLP,
trained as before: 200 steps, batch 8, 2 noisy copies, no augmentation) and the stronger booster (`gsb`: a
σ-conditioned pixel purifier inside the tower, pretrained on the pixel term alone, then an attention-mixing mapper
trained on top of the frozen purifier with seeded crops / flips).

Training images: `conformal-clip-data` textiles plus random crops of four scikit-image photos. Held out: six other
scikit-image photos and textiles never seen in training (the certificates), and more unseen textiles for the utility
proxy: nearest-class-mean accuracy over the three textile classes with class means of the *stock* clean features of the
training textiles, for the stock features, the boosted clean features and the smoothed + boosted features (n = 8, the
deployed Monte Carlo size). For every σ the script certifies the held-out images (same n, α, bound, seed) and reports S,
S_low, FCSB at each ε and the clean-feature cosine of the boosted encoder to the stock one.

Every stage is resumable: a killed run picks up from the last checkpoint / finished measurement (kept in
`--output-dir`). The boosters are saved as PEFT adapters; the tables go to `--results` (`.md` and `.json`).
"""

import argparse
import json
import os
import random
import time
from pathlib import Path

import datasets
import torch
from peft import PeftModel
from transformers import TrainingArguments

from hf_feature_smoothing import FeatureSmoothingConfig, GSBConfig, SmoothedVisionTower, add_booster
from hf_feature_smoothing.assets import load_dinov2_small, skimage_photos, textile_images
from hf_feature_smoothing.booster import GSBTrainer, booster_noise_level
from hf_feature_smoothing.certification import certify
from hf_feature_smoothing.utils.atomic import write_atomically


HELD_OUT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field")
TRAIN_PHOTOS = ("immunohistochemistry", "retina", "colorwheel", "logo")
VARIANTS = ("none", "mapper", "gsb")
ROW_KEYS = {"score", "score_lower", "abstain", "fcsb", "clean_cosine", "accuracy_boosted_clean", "accuracy_smoothed",
            "accuracy_few_shot"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.12, 0.25, 0.5])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--image-size", type=int, default=112, help="DINOv2 input size (112: 8×8 patches)")
    parser.add_argument("--textiles-per-class", type=int, default=40)
    parser.add_argument("--held-out-textiles", type=int, default=2, help="per class, certified, never trained on")
    parser.add_argument("--utility-textiles", type=int, default=30, help="per class, utility proxy, never trained on")
    parser.add_argument("--mapper-steps", type=int, default=200, help="today's booster")
    parser.add_argument("--purifier-steps", type=int, default=200, help="gsb stage 1: purifier on the pixel term")
    parser.add_argument("--gsb-steps", type=int, default=200, help="gsb stage 2: mapper on the frozen purifier")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n", type=int, default=256, help="Monte Carlo samples per certificate")
    parser.add_argument("--utility-n", type=int, default=8, help="Monte Carlo samples of the smoothed utility features")
    parser.add_argument("--shots", type=int, default=10, help="training textiles per class for the few-shot means")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("gsb-dinov2-s14"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/gsb_dinov2_results"),
                        help="tables go to RESULTS.md and RESULTS.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, n=32, 2+2 utility textiles")
    args = parser.parse_args()
    if args.quick:
        args.mapper_steps, args.purifier_steps, args.gsb_steps, args.n, args.utility_textiles = 4, 4, 4, 32, 2
    return args


def write_json(path: Path, data) -> None:
    """Atomic: a kill leaves the previous file."""
    write_atomically(path, json.dumps(data, indent=2))


def images(args) -> dict[str, list]:
    rng = random.Random(args.seed)
    per_class = args.textiles_per_class + args.held_out_textiles + args.utility_textiles
    by_class: dict[str, list] = {}
    for image, label in textile_images(per_class=per_class):
        by_class.setdefault(label, []).append(image)
    labels = sorted(by_class)
    train = [img for imgs in by_class.values() for img in imgs[: args.textiles_per_class]]
    cut = args.textiles_per_class + args.held_out_textiles
    held_out = [img for imgs in by_class.values() for img in imgs[args.textiles_per_class: cut]]
    for photo in skimage_photos(TRAIN_PHOTOS).values():  # random crops: more natural-image variety
        for _ in range(8):
            w, h = photo.size
            side = rng.randint(min(w, h) // 2, min(w, h))
            left, top = rng.randint(0, w - side), rng.randint(0, h - side)
            train.append(photo.crop((left, top, left + side, top + side)))
    return {
        "train": train,
        "held_out": list(skimage_photos(HELD_OUT_PHOTOS).values()) + held_out,
        "prototype": [(img, labels.index(c)) for c in labels for img in by_class[c][: args.textiles_per_class]],
        "utility": [(img, labels.index(c)) for c in labels for img in by_class[c][cut:]],
        "shots": [(img, labels.index(c)) for c in labels for img in by_class[c][: args.shots]],
    }


def training_args(args, output: Path, steps: int, lr: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output / "checkpoints"), max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=steps // 20, logging_steps=max(1, steps // 10),
        save_strategy="steps", save_steps=max(1, steps // 8), save_total_limit=1, use_cpu=True, report_to=[],
        seed=args.seed, dataloader_drop_last=True,
    )


def train_stage(name: str, output: Path, booster, args, steps: int, lr: float, train_set, **trainer_kwargs) -> dict:
    """Train (or resume) one stage; the adapter lands in `output`, its cost in `output/cost.json`."""
    if (output / "adapter_model.safetensors").exists() and (output / "cost.json").exists():
        return json.loads((output / "cost.json").read_text())
    trainer = GSBTrainer(booster, training_args(args, output, steps, lr), train_dataset=train_set,
                         image_size=args.image_size, noise_samples=2, **trainer_kwargs)
    resume = any((output / "checkpoints").glob("checkpoint-*"))
    load = os.getloadavg()[0]
    metrics = trainer.train(resume_from_checkpoint=resume or None).metrics
    trainer.save_model(str(output))
    cost = {"stage": name, "steps": steps, "seconds": round(metrics["train_runtime"], 1), "resumed": resume,
            "load_average": round((load + os.getloadavg()[0]) / 2, 2)}
    write_json(output / "cost.json", cost)
    return cost


def train_boosters(args, train_set) -> dict[str, dict]:
    out = args.output_dir
    sigmas = args.sigmas
    mapper = add_booster(load_dinov2_small(), GSBConfig(sigmas=sigmas, hidden_dim=512))
    costs = {"mapper": [train_stage("mapper", out / "mapper", mapper, args, args.mapper_steps, args.lr, train_set,
                                    crop_scale=None, flip=False)]}
    config = GSBConfig(sigmas=sigmas, hidden_dim=512, mapper_mixing="attention", mixing_heads=6, purifier=True)
    stage1 = add_booster(load_dinov2_small(), config)
    costs["gsb"] = [train_stage("purifier", out / "purifier", stage1, args, args.purifier_steps, 2 * args.lr,
                                train_set, lambda_consistency=0.0, lambda_clean=0.0, lambda_stats=0.0,
                                trainable=("purifier",))]
    stage2 = PeftModel.from_pretrained(load_dinov2_small(), out / "purifier", is_trainable=True)
    costs["gsb"].append(train_stage("gsb", out, stage2, args, args.gsb_steps, args.lr, train_set, lambda_clean=2.0,
                                    lambda_pixel=0.0, trainable=("mapper",)))
    return costs


def unit(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)


@torch.no_grad()
def measure(model, data: dict, prototypes: torch.Tensor, sigma: float, args) -> dict:
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=sigma, chunk_size=64, seed=args.seed,
                                                              num_samples=args.utility_n))
    adapter = tower.family
    held_out = adapter.preprocess(data["held_out"], args.image_size)
    certificates = certify(tower, held_out, epsilon=args.epsilon, n=args.n, alpha=args.alpha, seed=args.seed,
                           bound="bernstein", reference="clean",  # the protocol of the baseline table
                           progress=True)
    with booster_noise_level(tower.encoder, sigma, adapter.image_mean, adapter.image_std):
        boosted = unit(adapter.encode(held_out)[-1])
    with booster_noise_level(tower.encoder, 0.0):
        stock = unit(adapter.encode(held_out)[-1])
    utility = adapter.preprocess([img for img, _ in data["utility"]], args.image_size)
    labels = torch.tensor([label for _, label in data["utility"]])
    with booster_noise_level(tower.encoder, sigma, adapter.image_mean, adapter.image_std):
        boosted_utility = unit(adapter.encode(utility)[-1])
    smoothed_utility = unit(torch.stack(tower(utility.pixel_values)))
    shots = adapter.preprocess([img for img, _ in data["shots"]], args.image_size)
    shot_labels = torch.tensor([label for _, label in data["shots"]])
    smoothed_shots = unit(torch.stack(tower(shots.pixel_values)))
    few_shot = unit(torch.stack([smoothed_shots[shot_labels == c].mean(0) for c in range(len(prototypes))]))

    def accuracy(features: torch.Tensor, means: torch.Tensor = prototypes) -> float:
        return ((features @ means.T).argmax(-1) == labels).float().mean().item()

    count = len(certificates)
    return {
        "score": sum(c.score for c in certificates) / count,
        "score_lower": sum(c.score_lower for c in certificates) / count,
        "abstain": sum(c.abstain for c in certificates),
        # mean certified cosine over images; an abstention or a vacuous bound counts as 0 (no guarantee)
        "fcsb": [sum(c.fcsb[i] or 0.0 for c in certificates) / count for i in range(len(args.epsilon))],
        "clean_cosine": (boosted * stock).sum(-1).mean().item(),
        "accuracy_boosted_clean": accuracy(boosted_utility),
        "accuracy_smoothed": accuracy(smoothed_utility),
        "accuracy_few_shot": accuracy(smoothed_utility, few_shot),
    }


def load_variant(name: str, args):
    if name == "none":
        return load_dinov2_small()
    return PeftModel.from_pretrained(load_dinov2_small(), args.output_dir / ("mapper" if name == "mapper" else ""))


def table(results: dict, costs: dict, args, data: dict, stock_accuracy: float, stock_accuracy_shots: float) -> str:
    eps = " | ".join(f"FCSB ε={e}" for e in args.epsilon)
    n_held, n_util = len(data["held_out"]), len(data["utility"])
    lines = [
        (f"DINOv2-S/14 @ {args.image_size}px, {n_held} held-out images, n={args.n}, α={args.alpha}, empirical-Bernstein "
        "bound, noise in pixel [0,1] space (ℓ2), seed "
        f"{args.seed}. Means over images; abstain / vacuous FCSB counted as 0. Utility: nearest-class-mean accuracy on "
        f"{n_util} unseen textiles (3 classes; class means of stock clean features of the training textiles): stock "
        f"clean features {100 * stock_accuracy:.1f}%; `acc boosted` = boosted clean features, `acc smoothed` = "
        f"smoothed + boosted features (n={args.utility_n}, as deployed); `few-shot` = smoothed + boosted features "
        f"against class means of smoothed + boosted features of {args.shots} training textiles per class (stock: "
        f"{100 * stock_accuracy_shots:.1f}% with clean features). `mapper` = today's booster (token-wise MLP); "
        "`gsb` = pixel purifier + attention-mixing mapper."),
        "",
        f"| σ | booster | S | S_low | abstain | {eps} | clean cos to stock | acc boosted | acc smoothed | few-shot |",
        "|---|---|---|---|---|" + "---|" * len(args.epsilon) + "---|---|---|---|",
    ]
    for sigma in args.sigmas:
        for name in VARIANTS:
            r = results[name][str(sigma)]
            fcsb = " | ".join(f"{v:.3f}" for v in r["fcsb"])
            lines.append(f"| {sigma} | {name} | {r['score']:.3f} | {r['score_lower']:.3f} | {r['abstain']}/{n_held} "
                         f"| {fcsb} | {r['clean_cosine']:.4f} | {100 * r['accuracy_boosted_clean']:.1f} "
                         f"| {100 * r['accuracy_smoothed']:.1f} | {100 * r['accuracy_few_shot']:.1f} |")
    lines.append("")
    lines.append("Training cost (CPU, 2 threads shared with other jobs; `load` = mean 1-min load average during the "
                 "stage):")
    for name, stages in costs.items():
        parts = ", ".join(f"{c['stage']}: {c['steps']} steps in {c['seconds']:.0f} s (load {c['load_average']})"
                          for c in stages)
        lines.append(f"- `{name}`: {parts}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    data = images(args)
    costs = train_boosters(args, datasets.Dataset.from_dict({"image": data["train"]}))

    stock = SmoothedVisionTower(load_dinov2_small())
    with torch.no_grad():
        prototype_features = unit(stock.family.encode(stock.family.preprocess(
            [img for img, _ in data["prototype"]], args.image_size))[-1])
        utility_features = unit(stock.family.encode(stock.family.preprocess(
            [img for img, _ in data["utility"]], args.image_size))[-1])
    prototype_labels = torch.tensor([label for _, label in data["prototype"]])
    prototypes = unit(torch.stack([prototype_features[prototype_labels == c].mean(0)
                                   for c in range(int(prototype_labels.max()) + 1)]))
    utility_labels = torch.tensor([label for _, label in data["utility"]])
    stock_accuracy = ((utility_features @ prototypes.T).argmax(-1) == utility_labels).float().mean().item()
    shot_labels = torch.tensor([label for _, label in data["shots"]])
    shot_features = prototype_features[torch.cat([torch.nonzero(prototype_labels == c).flatten()[: args.shots]
                                                  for c in range(len(prototypes))])]
    shot_means = unit(torch.stack([shot_features[shot_labels == c].mean(0) for c in range(len(prototypes))]))
    stock_accuracy_shots = ((utility_features @ shot_means.T).argmax(-1) == utility_labels).float().mean().item()

    store = args.output_dir / "measurements.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for name in VARIANTS:
        model = None
        for sigma in args.sigmas:
            if ROW_KEYS <= set(results.get(name, {}).get(str(sigma), {})):
                continue  # measured by an earlier (killed) run
            model = model or load_variant(name, args)
            start = time.time()
            row = measure(model, data, prototypes, sigma, args)
            row["seconds"] = round(time.time() - start, 1)
            results.setdefault(name, {})[str(sigma)] = row
            write_json(store, results)

    report = table(results, costs, args, data, stock_accuracy, stock_accuracy_shots)
    print(report)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.results.with_suffix(".md"), report + "\n")
    write_json(args.results.with_suffix(".json"), {
        "results": results, "stock_accuracy": stock_accuracy, "stock_accuracy_few_shot": stock_accuracy_shots,
        "training_cost": costs,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    })


if __name__ == "__main__":
    main()
