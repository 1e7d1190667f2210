"""`hf-fs build-llava` (the real-weight `llava-dinov2-smollm2`: train its projector, resumably) and
`hf-fs build-llava-booster` (its Gaussian Smoothness Booster, resumably): build what the other commands use."""

import json

from ..utils.validation import SEED
from .options import HelpFormatter, add_verbosity, number


def run_build_llava(args) -> int:
    from ..assets.llava_dinov2_smollm2 import REPO_ID, install_in_hub_cache, llava_checkpoint, projector_metadata
    from ..assets.projector_training import train_projector

    projector = train_projector(args.output_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                                learning_rate=args.learning_rate, seed=args.seed, resume=not args.restart)
    record = projector_metadata(projector)
    print(json.dumps(record.get("held_out", {}), indent=1))
    print(f"projector: {projector}")
    if args.install:
        install_in_hub_cache(llava_checkpoint(projector), REPO_ID)
        print(f"installed in the Hub cache: `--model {REPO_ID}` / `from_pretrained(\"{REPO_ID}\")` now use it")
    return 0


def run_build_llava_booster(args) -> int:
    from ..assets.llava_booster_training import LlavaBoosterRecipe, train_llava_booster

    recipe = LlavaBoosterRecipe(steps=args.max_steps, purifier_steps=args.purifier_steps, lambda_lm=args.lambda_lm,
                                seed=args.seed)
    folder = train_llava_booster(args.output_dir, args.variant, recipe)
    print(f"booster: {folder}  (use it with `--booster {folder}`)")
    return 0


def register_subcommand(subparsers) -> None:
    """Register `build-llava` and `build-llava-booster`."""
    b = subparsers.add_parser("build-llava", formatter_class=HelpFormatter,
                              help="train the projector of llava-dinov2-smollm2 (resumable); the package ships one",
                              description="LLaVA stage-1 alignment: DINOv2-S/14 tower and SmolLM2-135M frozen, the "
                                          "projector trained on the digits and textiles training splits; writes "
                                          "OUTPUT_DIR/projector.safetensors with the held-out answer accuracy.")
    b.add_argument("--output-dir", default="outputs/llava-projector", help="checkpoints and the final projector")
    b.add_argument("--max-steps", type=number(int, 1), default=600, help="optimizer steps")
    b.add_argument("--batch-size", type=number(int, 1), default=16, help="image-question pairs per step")
    b.add_argument("--learning-rate", type=number(float, 0, low_open=True), default=1e-3, help="AdamW peak rate")
    b.add_argument("--seed", type=number(SEED), default=0, help="projector initialisation and data order")
    b.add_argument("--restart", action="store_true", help="ignore checkpoints in --output-dir")
    b.add_argument("--install", action="store_true",
                   help="assemble the model with the new projector and make it the Hub-cache checkpoint "
                        "`hf-feature-smoothing/llava-dinov2-smollm2`")
    b.set_defaults(func=run_build_llava)
    add_verbosity(b)

    g = subparsers.add_parser("build-llava-booster", formatter_class=HelpFormatter,
                              help="train a Gaussian Smoothness Booster for llava-dinov2-smollm2 (resumable); the "
                                   "package ships one (`--booster llava-dinov2-smollm2-gsb`)",
                              description="Stage 1: a σ-conditioned pixel purifier on the pixel term; stage 2: "
                                          "purifier + attention mapper on the feature terms, with the frozen language "
                                          "model's KL term (`--variant lm`) or without it (`features`). Tower, "
                                          "projector and LM stay frozen; data: the projector's training splits "
                                          "(digits, textiles).")
    g.add_argument("--output-dir", default="outputs/llava-gsb", help="stages, checkpoints and the adapters")
    g.add_argument("--variant", choices=("lm", "features", "mapper"), default="lm",
                   help="`lm`: the language model in the loop; `features`: feature terms only; `mapper`: the earlier "
                        "token-wise mapper alone (no purifier), feature terms only")
    g.add_argument("--max-steps", type=number(int, 1), default=300, help="stage-2 optimizer steps")
    g.add_argument("--purifier-steps", type=number(int, 1), default=400, help="stage-1 optimizer steps")
    g.add_argument("--lambda-lm", type=number(float, 0), default=1.0, help="weight of the LM's KL term (`lm` only)")
    g.add_argument("--seed", type=number(SEED), default=0, help="noise, σ draws, crops and data order")
    g.set_defaults(func=run_build_llava_booster)
    add_verbosity(g)
