"""Option types and option groups shared by the `hf-fs` commands: every bad value is an error naming the option and
the value."""

import argparse
import math

import torch

from .loading import SHIPPED_BOOSTER


def number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False):
    """An argparse `type` parsing a finite `kind` (int or float) in the given range."""
    if low is not None and high is not None:
        wanted = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"{'>' if low_open else '≥'} {low}"
    else:
        wanted = ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        bad = not math.isfinite(value)
        bad |= low is not None and (value < low or (low_open and value == low))
        bad |= high is not None and (value > high or (high_open and value == high))
        if bad:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite {'integer' if kind is int else 'number'} "
                                             f"{wanted}".rstrip())
        return value

    return parse


def torch_device(text: str) -> str:
    try:
        torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({error})") from None
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: ...)` for every option with a default (options defaulting to None explain it in words)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_model(parser: argparse.ArgumentParser, booster_help: str) -> None:
    parser.add_argument("--model", default="dinov2-s14",
                        help="`dinov2-s14` (real DINOv2-S/14, offline), `llava-dinov2-smollm2` (the real-weight "
                             "LLaVA, assembled offline), `tiny-<llava|qwen2_vl|qwen2_5_vl|qwen3_vl>` (random, for smoke "
                             "runs), or a local path / Hub repo id of a supported model")
    parser.add_argument("--booster", default=None,
                        help=f"{booster_help}; `{SHIPPED_BOOSTER}` is the booster shipped for llava-dinov2-smollm2")


def add_images(parser: argparse.ArgumentParser) -> None:
    from PIL import Image

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", default=None,
                        help="a folder of images (recursive; keys are paths relative to it), `skimage` for the "
                             "built-in photos (the default when --dataset is not given either), or a built-in "
                             "labelled set: `digits:train`, `digits:test`, `textiles:train`, `textiles:test`")
    source.add_argument("--dataset", default=None,
                        help="a `save_to_disk` folder, a local `load_dataset` folder, or a Hub dataset id (read from "
                             "the offline cache); rows are read one at a time")
    parser.add_argument("--split", default="train", help="dataset split")
    parser.add_argument("--image-column", default="image", help="dataset column holding the images")
    parser.add_argument("--label-column", default=None,
                        help="dataset column holding integer class labels (used with --prototypes); default: "
                             "`label` when the dataset has it")
    parser.add_argument("--max-image-pixels", type=number(int, 0), default=Image.MAX_IMAGE_PIXELS,
                        help="images with more pixels are skipped as decompression bombs (0: no limit)")
    parser.add_argument("--image-size", type=number(int, 1), default=None,
                        help="resize/centre-crop size in pixels; default: the model's own resolution")
    parser.add_argument("--limit", type=number(int, 1), default=None,
                        help="use only the first N images of the source; default: all")


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbosity", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level of hf_feature_smoothing messages")
