"""`hf-fs prototypes`: class prototypes (normalised mean features) of a labelled image set, the few-shot cosine
predictor that `hf-fs certify --prototypes` certifies."""

import dataclasses
from pathlib import Path

from ..certification.arguments import SIGMA
from ..utils.validation import POSITIVE_INT, SEED
from .loading import load_model, open_source
from .options import HelpFormatter, OptionError, add_images, add_model, add_verbosity, number, torch_device


SMOOTHED_SAMPLES = 16  # default noisy copies per image of smoothed prototypes


def register_subcommand(subparsers) -> None:
    p = subparsers.add_parser("prototypes", formatter_class=HelpFormatter,
                              help="class prototypes (normalised mean features) of a labelled image set",
                              description="A few-shot cosine predictor: the first --shots images of each class, their "
                                          "mean unit feature per class; for `hf-fs certify --prototypes`.")
    add_model(p, "booster adapter folder or Hub repo id, loaded before computing features")
    add_images(p)
    p.add_argument("--shots", type=number(POSITIVE_INT), default=50, help="images per class")
    p.add_argument("--sigma", type=number(SIGMA), default=None,
                   help="smoothed prototypes: mean directions of the smoothed features at this σ (pixel [0, 1] "
                        "units; a booster conditioned on it), to certify with the same --sigma; default: clean "
                        "features")
    p.add_argument("--num-samples", type=number(POSITIVE_INT), default=None,
                   help=f"noisy copies per image for smoothed prototypes (needs --sigma); default: "
                        f"{SMOOTHED_SAMPLES}")
    p.add_argument("--seed", type=number(SEED), default=0, help="seed of the noise (smoothed prototypes)")
    p.add_argument("--device", type=torch_device, default=None, help="torch device")
    p.add_argument("--output", default="outputs/prototypes.safetensors", help="safetensors file to write")
    p.set_defaults(func=run)
    add_verbosity(p)


def check_options(args) -> None:
    if Path(args.output).suffix != ".safetensors":
        raise OptionError(f"--output {args.output}: prototypes are written as a .safetensors file; name one "
                          f"(e.g. {Path(args.output).with_suffix('.safetensors').name}).")
    if args.sigma is None and args.num_samples:
        raise OptionError(f"--num-samples {args.num_samples}: smoothed prototypes need the noise level; add --sigma "
                          f"(or drop --num-samples for clean prototypes).")


def run(args) -> int:
    import torch

    from ..certification.certify import as_smoothed_tower
    from ..certification.prototypes import class_prototypes, save_prototypes
    from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower

    check_options(args)
    source = open_source(args)
    by_class: dict[int, list] = {}
    for item in source.items():
        if item.label is None:
            raise OptionError(f"{item.key} has no label: prototypes need a labelled source (`--images digits:train`, "
                              "or --dataset with --label-column).")
        if len(by_class.setdefault(item.label, [])) < args.shots:
            by_class[item.label].append(item)
    chosen = [item for label in sorted(by_class) for item in by_class[label]]
    num_classes = getattr(source, "num_classes", None) or max(by_class) + 1
    if num_classes < 2:
        raise OptionError(f"--images / --dataset: {source.description} has a single class; a predictor needs at "
                          f"least two (and `hf-fs certify --prototypes` refuses fewer).")
    num_samples = (args.num_samples or SMOOTHED_SAMPLES) if args.sigma is not None else 0
    model = load_model(args.model, args.booster).to(args.device or "cpu")
    tower = as_smoothed_tower(model, sigma=args.sigma)
    if num_samples:
        tower = SmoothedVisionTower(tower.encoder, dataclasses.replace(tower.config, seed=args.seed))
    with torch.no_grad():
        prototypes = class_prototypes(tower, [item.load() for item in chosen], [item.label for item in chosen],
                                      num_classes=num_classes, image_size=args.image_size, num_samples=num_samples,
                                      progress=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_prototypes(prototypes, args.output, model=args.model, booster=args.booster, source=source.description,
                    shots=args.shots, image_size=args.image_size, keys=[item.key for item in chosen],
                    sigma=args.sigma, num_samples=num_samples, seed=args.seed if num_samples else None)
    print(f"prototypes: {args.output} ({prototypes.shape[0]} classes × {prototypes.shape[1]} features, "
          f"{len(chosen)} images)")
    return 0
