"""What `--model`, `--booster`, `--images` and `--dataset` name, loaded: the model aliases, the shipped booster and
the image sources of the `hf-fs` commands."""

from pathlib import Path

from ..assets.registry import (
    MODEL_ALIASES,
    SHIPPED_BOOSTER,
    attach_booster,
    check_model_name,
    resolve_booster_path,
    resolve_model,
)
from ..runs import DatasetImages, FirstImages, FolderImages, ImageSource, LabelledImages, RunError, SkimageImages
from .options import OptionError


def resolve_booster(booster: str | None) -> str | None:
    """A booster alias (`llava-dinov2-smollm2-gsb`, the booster shipped in the package) → its folder; anything else as
    given (see `assets.registry.BOOSTER_ALIASES`)."""
    return resolve_booster_path(booster)


def check_model_names(name: str) -> None:
    """`--model` checks that need no loading (a missing folder, a file, an adapter): an [`OptionError`] each."""
    try:
        check_model_name(name, "--model")
    except ValueError as error:
        raise OptionError(str(error)) from None


def load_model(name: str, booster: str | None = None):
    """`--model` (an alias of `assets.registry.MODEL_ALIASES`: `dinov2-s14`, `llava-dinov2-smollm2`,
    `tiny-<family>`; or a path / Hub repo id of a supported model) through `assets.registry.resolve_model`: MLLMs
    load as their smoothed type and stand-alone encoders as a `SmoothedVisionTower`, so the checkpoint's processor
    statistics and resolution are used (never family defaults silently); with a booster adapter (alias, folder or Hub
    repo id) loaded into it. Failures are `RunError`s naming the option."""
    check_model_names(name)
    try:
        model = resolve_model(name)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise RunError(f"--model {name}: cannot load it ({type(error).__name__}: {error}).") from None
    if booster:
        booster = resolve_booster(booster)
        try:
            attach_booster(model, booster)
        except (OSError, ValueError, TypeError) as error:
            raise RunError(f"--booster {booster}: cannot load it into {name} ({type(error).__name__}: {error}).") from None
    return model


def load_processor(name: str, model):
    """The processor (tokenizer + image processor) of `--model` `name`, from the checkpoint the model was loaded from
    (offline first: the built-in aliases are in the local Hub cache). A model without one is an [`OptionError`]."""
    from transformers import AutoProcessor

    source = getattr(model.config, "_name_or_path", None) or name
    # the Hub only for a repo id: an alias or a local folder has its processor here or nowhere
    online = source not in MODEL_ALIASES and not Path(source).exists()
    errors = []
    for offline in (True, False) if online else (True,):
        try:
            processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
        except (OSError, ValueError, KeyError, TypeError) as error:
            errors.append(error)
            continue
        if getattr(processor, "tokenizer", None) is not None:
            return processor
    detail = f" ({type(errors[-1]).__name__}: {errors[-1]})" if errors else ""
    raise OptionError(f"--model {name}: no processor with a tokenizer at {source}{detail}; answers need the model's "
                      f"tokenizer and image processor (processor_config.json / tokenizer files beside the weights).")


def open_source(args) -> ImageSource:
    """The images of `--images` (a folder, `skimage` or a built-in labelled set) or `--dataset`, read lazily; the
    first `--limit` of them when given. A source that cannot be opened (a missing or empty folder, an empty split,
    a missing column) is an [`OptionError`]: a bad option value, found before anything is written."""
    try:
        return _open_source(args)
    except OptionError:
        raise
    except RunError as error:
        raise OptionError(str(error)) from None


def _open_source(args) -> ImageSource:
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


__all__ = ["SHIPPED_BOOSTER", "load_model", "load_processor", "open_source", "resolve_booster"]
