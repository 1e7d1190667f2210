"""`hf-fs prototypes`: class prototypes of a labelled image set (normalised mean features, or with --fit prototypes
fitted to the FS margin certificate), the few-shot cosine predictor that `hf-fs certify --prototypes` certifies."""

import dataclasses
from pathlib import Path

from ..certification.arguments import SIGMA
from ..smoothing.configuration_feature_smoothing import SMOOTHED_FEATURES
from ..utils.validation import POSITIVE_INT, SEED, is_class_index
from .loading import load_model, open_source
from .options import (
    HelpFormatter,
    OptionError,
    add_images,
    add_model,
    add_verbosity,
    check_output_folder,
    check_source_options,
    number,
    torch_device,
)


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
    p.add_argument("--fit", action="store_true",
                   help="fit the prototypes to the FS margin certificate instead of taking class means (recipe: "
                        "start from the centred class means of the smoothed training features at --sigma, then "
                        "maximise their mean capped certified margin, `certification.prototypes.fit_prototypes`); "
                        "certify with the same --sigma on other images; needs --sigma")
    p.add_argument("--features", choices=SMOOTHED_FEATURES, default=None,
                   help="the feature the predictor compares: the tower's output the projector reads (`vision`) or "
                        "the projector's output the language model reads (`projected`); default: the model's own "
                        "(`smoothing_config.smoothed_features`). Saved with the prototypes; `hf-fs certify "
                        "--prototypes` certifies that feature")
    p.add_argument("--center", choices=("position", "channel"), default=None,
                   help="centre the features first: the tower's `feature_center` μ is estimated on the same images "
                        "(smoothed, at --sigma, when given), per token position and channel (`position`, "
                        "fixed-resolution towers; the strongest FS margins) or per channel (`channel`), and saved "
                        "with the prototypes; `hf-fs certify --prototypes` then certifies normalise(f − μ)")
    p.add_argument("--seed", type=number(SEED), default=0, help="seed of the noise (smoothed prototypes)")
    p.add_argument("--device", type=torch_device, default=None, help="torch device")
    p.add_argument("--output", default="outputs/prototypes.safetensors", help="safetensors file to write")
    p.set_defaults(func=run)
    add_verbosity(p)


def check_options(args) -> None:
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise OptionError(f"--output {args.output}: prototypes are written as a .safetensors file; name one "
                          f"(e.g. {output.with_suffix('.safetensors').name}).")
    if output.is_dir():
        raise OptionError(f"--output {args.output}: is a folder; name a .safetensors file in it.")
    check_source_options(args)
    check_output_folder("--output", output)  # a missing folder is created once the prototypes are computed
    if args.fit and args.sigma is None:
        raise OptionError("--fit: prototypes are fitted to the smoothed features at the σ to certify; add --sigma "
                          "(the --sigma of `hf-fs certify`).")
    if args.sigma is None and args.num_samples:
        raise OptionError(f"--num-samples {args.num_samples}: smoothed prototypes need the noise level; add --sigma "
                          f"(or drop --num-samples for clean prototypes).")


def _label(item, column: str) -> int:
    """The item's class index; anything else (no label, a bool, str, float or negative value) is refused."""
    label = item.label
    if label is None:
        raise OptionError(f"{item.key} has no label: prototypes need a labelled source (`--images digits:train`, "
                          "or --dataset with --label-column).")
    if not is_class_index(label):
        raise OptionError(f"--label-column {column}: row {item.key} has label {label!r} ({type(label).__name__}), "
                          f"but labels must be class indices 0, 1, 2, … (-1 marks a missing label in 🤗 datasets); "
                          f"encode the column as integers (`Dataset.class_encode_column`) or drop those rows.")
    return int(label)


def choose_examples(source, shots: int) -> tuple[list, int]:
    """The first `shots` items of each class and the number of classes, every label checked and every class
    present (at least two), before any image is decoded or anything is written."""
    column = getattr(source, "label_column", None) or "label"
    by_class: dict[int, list] = {}
    for item in source.items():
        label = _label(item, column)
        if len(by_class.setdefault(label, [])) < shots:
            by_class[label].append(item)
    if not by_class:
        raise OptionError(f"--images / --dataset: {source.description} has no images.")
    num_classes = getattr(source, "num_classes", None) or max(by_class) + 1
    if max(by_class) >= num_classes:
        raise OptionError(f"--label-column {column}: label {max(by_class)}, but the column declares "
                          f"{num_classes} classes (0..{num_classes - 1}); fix the labels or the column's features.")
    if num_classes < 2:
        raise OptionError(f"--images / --dataset: {source.description} has a single class; a predictor needs at "
                          f"least two (and `hf-fs certify --prototypes` refuses fewer).")
    empty = [k for k in range(num_classes) if k not in by_class]
    if empty:
        raise OptionError(f"--label-column {column}: classes {empty[:10]} of 0..{num_classes - 1} have no image"
                          f"{' (within --limit)' if hasattr(source, 'limit') else ''}; every class needs one to get "
                          f"a prototype: use a source with every class, raise --limit, or relabel the classes "
                          f"0..K-1.")
    return [item for label in sorted(by_class) for item in by_class[label]], num_classes


def run(args) -> int:
    import torch

    from ..certification.centering import estimate_feature_mean
    from ..certification.certify import as_smoothed_tower
    from ..certification.prototypes import class_means, fit_prototypes, image_features, save_prototypes
    from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower

    check_options(args)
    source = open_source(args)
    chosen, num_classes = choose_examples(source, args.shots)
    num_samples = (args.num_samples or SMOOTHED_SAMPLES) if args.sigma is not None else 0
    model = load_model(args.model, args.booster).to(args.device or "cpu")
    tower = as_smoothed_tower(model, sigma=args.sigma)
    if args.center and tower.config.feature_center is not None:
        raise OptionError(f"--center {args.center}: --model {args.model} already centres its features "
                          f"(`feature_center` in its smoothing config); drop --center to compute the prototypes "
                          f"with its centre.")
    site = args.features or tower.config.smoothed_features
    if num_samples or site != tower.config.smoothed_features:
        tower = SmoothedVisionTower(tower.encoder, dataclasses.replace(tower.config, seed=args.seed,
                                                                       smoothed_features=site))
    labels = [item.label for item in chosen]
    images = [item.load() for item in chosen]
    if args.center:
        try:
            center = estimate_feature_mean(tower, images, image_size=args.image_size,
                                           per_position=args.center == "position", num_samples=num_samples,
                                           seed=args.seed)
        except ValueError as error:
            raise OptionError(f"--center {args.center}: {error}") from None
        tower = SmoothedVisionTower(tower.encoder, dataclasses.replace(tower.config, feature_center=center))
    with torch.no_grad():
        features = image_features(tower, images, image_size=args.image_size, num_samples=num_samples, progress=True)
    prototypes = (fit_prototypes if args.fit else class_means)(features, labels, num_classes)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_prototypes(prototypes, args.output, model=args.model, booster=args.booster, source=source.description,
                    shots=args.shots, image_size=args.image_size, keys=[item.key for item in chosen],
                    sigma=args.sigma, num_samples=num_samples, seed=args.seed if num_samples else None,
                    recipe="fit_prototypes" if args.fit else "class_means", smoothed_features=site, center=args.center,
                    feature_center=tower.config.feature_center)  # the space they live in: --center's or the model's
    print(f"prototypes: {args.output} ({prototypes.shape[0]} classes × {prototypes.shape[1]} features, "
          f"{len(chosen)} images)")
    return 0
