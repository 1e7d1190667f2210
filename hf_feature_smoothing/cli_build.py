"""`hf-fs` commands that build things the other commands use: `build-llava` (the real-weight
`llava-dinov2-smollm2`: train its projector, resumably) and `prototypes` (class prototypes of a few-shot cosine
predictor, for `hf-fs certify --prototypes`)."""

import json
from pathlib import Path

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


def cmd_prototypes(args) -> int:
    import torch

    from .certification.certify import as_smoothed_tower
    from .certification.prototypes import class_prototypes, save_prototypes
    from .cli import load_model, open_source

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
    model = load_model(args.model, args.booster).to(args.device or "cpu")
    tower = as_smoothed_tower(model)
    with torch.no_grad():
        prototypes = class_prototypes(tower, [item.load() for item in chosen], [item.label for item in chosen],
                                      num_classes=num_classes, image_size=args.image_size, progress=True)
    save_prototypes(prototypes, args.output, model=args.model, booster=args.booster, source=source.description,
                    shots=args.shots, image_size=args.image_size, keys=[item.key for item in chosen])
    print(f"prototypes: {args.output} ({prototypes.shape[0]} classes × {prototypes.shape[1]} features, "
          f"{len(chosen)} images)")
    return 0


def add_build_commands(sub, number, help_formatter, add_model, add_images, add_verbosity) -> None:
    """Register `build-llava` and `prototypes` on the `hf-fs` sub-parsers (`number` makes validated types)."""
    b = sub.add_parser("build-llava", formatter_class=help_formatter,
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

    p = sub.add_parser("prototypes", formatter_class=help_formatter,
                       help="class prototypes (normalised mean features) of a labelled image set",
                       description="A few-shot cosine predictor: the first --shots images of each class, their mean "
                                   "unit feature per class; for `hf-fs certify --prototypes`.")
    add_model(p, "booster adapter folder or Hub repo id, loaded before computing features")
    add_images(p)
    p.add_argument("--shots", type=number(int, 1), default=50, help="images per class")
    p.add_argument("--device", default=None, help="torch device")
    p.add_argument("--output", default="outputs/prototypes.safetensors", help="safetensors file to write")
    p.set_defaults(func=cmd_prototypes)
    for parser in (b, p):
        add_verbosity(parser)


