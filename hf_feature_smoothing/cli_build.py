"""`hf-fs` commands that build things the other commands use: `build-llava` (the real-weight
`llava-dinov2-smollm2`: train its projector, resumably), `build-llava-booster` (its Gaussian Smoothness Booster,
resumably) and `prototypes` (class prototypes of a few-shot cosine predictor, for `hf-fs certify --prototypes`)."""

import json
from pathlib import Path

from .commands.loading import load_model, open_source
from .commands.options import HelpFormatter, add_images, add_model, add_verbosity, number
from .runs import RunError


def cmd_build_llava(args) -> int:
    from .assets.llava_dinov2_smollm2 import REPO_ID, install_in_hub_cache, llava_checkpoint, projector_metadata
    from .assets.projector_training import train_projector

    projector = train_projector(args.output_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                                learning_rate=args.learning_rate, seed=args.seed, resume=not args.restart)
    record = projector_metadata(projector)
    print(json.dumps(record.get("held_out", {}), indent=1))
    print(f"projector: {projector}")
    if args.install:
        install_in_hub_cache(llava_checkpoint(projector), REPO_ID)
        print(f"installed in the Hub cache: `--model {REPO_ID}` / `from_pretrained(\"{REPO_ID}\")` now use it")
    return 0


def cmd_build_llava_booster(args) -> int:
    from .assets.llava_booster_training import LlavaBoosterRecipe, train_llava_booster

    recipe = LlavaBoosterRecipe(steps=args.max_steps, purifier_steps=args.purifier_steps, lambda_lm=args.lambda_lm,
                                seed=args.seed)
    folder = train_llava_booster(args.output_dir, args.variant, recipe)
    print(f"booster: {folder}  (use it with `--booster {folder}`)")
    return 0


def cmd_prototypes(args) -> int:
    import dataclasses

    import torch

    from . import SmoothedVisionTower
    from .certification.certify import as_smoothed_tower
    from .certification.prototypes import class_prototypes, save_prototypes

    if Path(args.output).suffix != ".safetensors":
        raise RunError(f"--output {args.output}: prototypes are written as a .safetensors file.")
    source = open_source(args)
    items = list(source.items())
    by_class: dict[int, list] = {}
    for item in items:
        if item.label is None:
            raise RunError(f"{item.key} has no label: prototypes need a labelled source (`--images digits:train`, "
                           "or --dataset with --label-column).")
        if len(by_class.setdefault(item.label, [])) < args.shots:
            by_class[item.label].append(item)
    chosen = [item for label in sorted(by_class) for item in by_class[label]]
    num_classes = getattr(source, "num_classes", None) or max(by_class) + 1
    if args.sigma is None and args.num_samples:
        raise RunError(f"--num-samples {args.num_samples}: smoothed prototypes need the noise level; add --sigma.")
    num_samples = (args.num_samples or 16) if args.sigma is not None else 0
    model = load_model(args.model, args.booster).to(args.device or "cpu")
    tower = as_smoothed_tower(model, sigma=args.sigma)
    if num_samples:
        tower = SmoothedVisionTower(tower.encoder, dataclasses.replace(tower.config, seed=args.seed))
    with torch.no_grad():
        prototypes = class_prototypes(tower, [item.load() for item in chosen], [item.label for item in chosen],
                                      num_classes=num_classes, image_size=args.image_size, num_samples=num_samples,
                                      progress=True)
    save_prototypes(prototypes, args.output, model=args.model, booster=args.booster, source=source.description,
                    shots=args.shots, image_size=args.image_size, keys=[item.key for item in chosen],
                    sigma=args.sigma, num_samples=num_samples, seed=args.seed if num_samples else None)
    print(f"prototypes: {args.output} ({prototypes.shape[0]} classes × {prototypes.shape[1]} features, "
          f"{len(chosen)} images)")
    return 0


def add_build_commands(sub) -> None:
    """Register `build-llava`, `build-llava-booster` and `prototypes` on the `hf-fs` sub-parsers."""
    b = sub.add_parser("build-llava", formatter_class=HelpFormatter,
                       help="train the projector of llava-dinov2-smollm2 (resumable); the package ships one",
                       description="LLaVA stage-1 alignment: DINOv2-S/14 tower and SmolLM2-135M frozen, the "
                                   "projector trained on the digits and textiles training splits; writes "
                                   "OUTPUT_DIR/projector.safetensors with the held-out answer accuracy.")
    b.add_argument("--output-dir", default="outputs/llava-projector", help="checkpoints and the final projector")
    b.add_argument("--max-steps", type=number(int, 1), default=600, help="optimizer steps")
    b.add_argument("--batch-size", type=number(int, 1), default=16, help="image-question pairs per step")
    b.add_argument("--learning-rate", type=number(float, 0, low_open=True), default=1e-3, help="AdamW peak rate")
    b.add_argument("--seed", type=number(int, 0), default=0, help="projector initialisation and data order")
    b.add_argument("--restart", action="store_true", help="ignore checkpoints in --output-dir")
    b.add_argument("--install", action="store_true",
                   help="assemble the model with the new projector and make it the Hub-cache checkpoint "
                        "`hf-feature-smoothing/llava-dinov2-smollm2`")
    b.set_defaults(func=cmd_build_llava)

    g = sub.add_parser("build-llava-booster", formatter_class=HelpFormatter,
                       help="train a Gaussian Smoothness Booster for llava-dinov2-smollm2 (resumable); the package "
                            "ships one (`--booster llava-dinov2-smollm2-gsb`)",
                       description="Stage 1: a σ-conditioned pixel purifier on the pixel term; stage 2: purifier + "
                                   "attention mapper on the feature terms, with the frozen language model's KL term "
                                   "(`--variant lm`) or without it (`features`). Tower, projector and LM stay frozen; "
                                   "data: the projector's training splits (digits, textiles).")
    g.add_argument("--output-dir", default="outputs/llava-gsb", help="stages, checkpoints and the adapters")
    g.add_argument("--variant", choices=("lm", "features", "mapper"), default="lm",
                   help="`lm`: the language model in the loop; `features`: feature terms only; `mapper`: the earlier "
                        "token-wise mapper alone (no purifier), feature terms only")
    g.add_argument("--max-steps", type=number(int, 1), default=300, help="stage-2 optimizer steps")
    g.add_argument("--purifier-steps", type=number(int, 1), default=400, help="stage-1 optimizer steps")
    g.add_argument("--lambda-lm", type=number(float, 0), default=1.0, help="weight of the LM's KL term (`lm` only)")
    g.add_argument("--seed", type=number(int, 0), default=0, help="noise, σ draws, crops and data order")
    g.set_defaults(func=cmd_build_llava_booster)

    p = sub.add_parser("prototypes", formatter_class=HelpFormatter,
                       help="class prototypes (normalised mean features) of a labelled image set",
                       description="A few-shot cosine predictor: the first --shots images of each class, their mean "
                                   "unit feature per class; for `hf-fs certify --prototypes`.")
    add_model(p, "booster adapter folder or Hub repo id, loaded before computing features")
    add_images(p)
    p.add_argument("--shots", type=number(int, 1), default=50, help="images per class")
    p.add_argument("--sigma", type=number(float, 0, low_open=True), default=None,
                   help="smoothed prototypes: mean directions of the smoothed features at this σ (pixel [0, 1] "
                        "units; a booster conditioned on it), to certify with the same --sigma; default: clean "
                        "features")
    p.add_argument("--num-samples", type=number(int, 1), default=None,
                   help="noisy copies per image for smoothed prototypes (needs --sigma); default: 16")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0, help="seed of the noise (smoothed prototypes)")
    p.add_argument("--device", default=None, help="torch device")
    p.add_argument("--output", default="outputs/prototypes.safetensors", help="safetensors file to write")
    p.set_defaults(func=cmd_prototypes)
    for parser in (b, g, p):
        add_verbosity(parser)


