"""Option types, option groups and option checks shared by the `hf-fs` commands: every bad value is an error naming
the option and the value (exit status 2), found before a run file, a header or a lock is written. Ranges come from
the API (`errors.Range` objects defined next to the functions the options feed)."""

import argparse
import os
from pathlib import Path

import torch

from ..assets.registry import BOOSTER_ALIASES, model_aliases_help
from ..runs import RunError
from ..runs.plotting import PLOT_SUFFIXES
from ..statistics.vote import vote_target
from ..utils.validation import SEED, Range


DTYPES = ("float32", "bfloat16", "float16")


class OptionError(RunError):
    """A bad option value or combination, found before anything is written: `hf-fs` prints it and exits with 2."""


class Parser(argparse.ArgumentParser):
    """`hf-fs` parsers: a bad option is one line on stderr (`hf-fs <command>: error: ...`) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def number(kind: type | Range, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False):
    """An argparse `type` parsing a finite int or float in a range: an API `Range`, or `kind` and the bounds."""
    spec = kind if isinstance(kind, Range) else Range(kind, low, high, low_open, high_open)

    def parse(text: str):
        try:
            value = spec.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if spec.kind is int else 'a number'}") from None
        if not spec.contains(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {spec.describe()}{spec.hint().rstrip('.')}")
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
                        help=f"{model_aliases_help()}, or a local path / Hub repo id of a supported model")
    parser.add_argument("--booster", default=None,
                        help=f"{booster_help}; " + ", ".join(f"`{name}` is {description}"
                                                             for name, (description, _) in BOOSTER_ALIASES.items()))


def add_images(parser: argparse.ArgumentParser, image_size: bool = True) -> None:
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
    if image_size:  # commands that feed the model through its processor take its size
        parser.add_argument("--image-size", type=number(int, 1), default=None,
                            help="resize/centre-crop size in pixels; default: the model's own resolution")
    parser.add_argument("--limit", type=number(int, 1), default=None,
                        help="use only the first N images of the source; default: all")


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbosity", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level of hf_feature_smoothing messages")


def add_run(parser: argparse.ArgumentParser, output: str, chunk_size: Range,
            chunk_help: str | None = None, passes: str = "tower passes") -> None:
    """The `run` group of the run commands: output, plot, resume, seed, device, dtype, chunk size (`chunk_help` says
    what a chunk is, when not noisy copies per tower call; `passes` what runs in --dtype)."""
    from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig

    run = parser.add_argument_group("run")
    run.add_argument("--output", default=output,
                     help="the run file (.jsonl): a header with every parameter, then one row per image; resumed "
                          "when it exists and its parameters match")
    run.add_argument("--plot", default=None, help="plot file (.png, .pdf or .svg); default: --output with .png")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in --output even if it holds one with other parameters (the old file is "
                          "kept as <output>.bak)")
    run.add_argument("--repair", action="store_true",
                     help="move lines of --output that are not valid rows to <output>.corrupt and continue")
    run.add_argument("--seed", type=number(SEED), default=None,
                     help="seed of all noise: a row depends only on (seed, image, parameters); default: a fresh "
                          "seed, recorded in the run header and reused when the run is resumed")
    run.add_argument("--device", type=torch_device, default=None,
                     help="torch device; default: accelerate's device for this process (cuda:<local rank> on GPUs, "
                          "else cpu)")
    run.add_argument("--dtype", default=None, choices=DTYPES,
                     help=f"compute dtype of the {passes} (autocast); certificates then cover the model as computed "
                          f"in that dtype (recorded). Default: the model's own (a smoothed model's "
                          f"`autocast_dtype`, else its weights' dtype); float32 turns a model's own autocast off. "
                          f"bfloat16 only where the CPU/GPU supports it (AVX512-BF16 / AMX, "
                          f"2-3× faster there), float16 on CUDA")
    run.add_argument("--chunk-size", type=number(chunk_size), default=None,
                     help=chunk_help or f"noisy copies per tower call (memory vs speed; with a seed, certificates do "
                                        f"not depend on it); default: the model's own (a smoothed model's "
                                        f"`smoothing_config.chunk_size`), else {FeatureSmoothingConfig.chunk_size}")
    add_verbosity(run)


def check_output_folder(option: str, path: str | Path) -> None:
    """The folder of an output file can be made and written: missing folders are created later (after every
    check), but one below a file, or in a folder that is not writable, is refused now."""
    parent = Path(path).absolute().parent
    try:
        existing = next(p for p in (parent, *parent.parents) if p.exists())
        is_folder = existing.is_dir()
    except OSError as error:  # a parent that cannot be searched
        raise OptionError(f"{option} {path}: cannot look into the folders above it ({error}); choose an output "
                          "in a folder you can read and write.") from None
    if not is_folder:
        raise OptionError(f"{option} {path}: {existing} is a file, so the folder {parent} cannot be made; name a file "
                          f"in a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {path}: the folder {existing} is not writable; choose an output there you can "
                          f"write.")


def check_source_options(args) -> None:
    """The --dataset options (--split, --image-column, --label-column) are refused with --images, which they would
    not change."""
    if not args.images:
        return
    if args.label_column is not None:
        raise OptionError(f"--label-column {args.label_column}: labels come from a --dataset column; --images "
                          f"{args.images} has none.")
    for option, value, default in (("--split", args.split, "train"), ("--image-column", args.image_column, "image")):
        if value != default:
            raise OptionError(f"{option} {value}: an option of --dataset, which --images {args.images} does not "
                              f"use; drop it, or pass the dataset with --dataset.")


def check_run_options(args) -> None:
    """Checks of the `run` options that involve several options or the machine (before anything is written)."""
    output = Path(args.output)
    if output.suffix.lower() != ".jsonl":
        raise OptionError(f"--output {args.output}: rows are written as JSON lines, so the file name must end in "
                          f".jsonl (the plot goes to --plot, by default {output.with_suffix('.png').name}).")
    if output.is_dir():
        raise OptionError(f"--output {args.output}: is a folder; name a .jsonl file.")
    check_output_folder("--output", output)
    plot = Path(args.plot) if args.plot else output.with_suffix(".png")
    if plot.suffix.lower() not in PLOT_SUFFIXES:
        raise OptionError(f"--plot {plot}: must end in one of {', '.join(PLOT_SUFFIXES)}.")
    if plot.resolve() == output.resolve() or plot.is_dir():
        raise OptionError(f"--plot {plot}: must be a file other than --output {args.output}.")
    args.plot = str(plot)
    check_source_options(args)
    device = torch.device(args.device) if args.device else None
    if device is not None and device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s).")
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if getattr(args, "dtype", None) == "float16" and not on_cuda:
        raise OptionError("--dtype float16: only on CUDA devices; leave --dtype out (the model's own dtype), or "
                          "use --dtype float32 (or bfloat16 where supported).")
    if getattr(args, "dtype", None) == "bfloat16":
        from ..utils.hardware import bf16_supported

        if not bf16_supported("cuda" if on_cuda else "cpu"):
            raise OptionError(f"--dtype bfloat16: not supported on this {'GPU' if on_cuda else 'CPU'}; leave "
                              f"--dtype out (the model's own dtype), or use --dtype float32.")


def add_futility(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--futility", action="store_true",
                        help="with --target-radius, also stop sampling an image once its vote share is shown (upper "
                             "confidence sequence, level --alpha) to be below what the target needs: fewer copies on "
                             "images that will not reach it; their certificates stay valid, with the radius the "
                             "copies so far certify (recorded in the run)")


def check_futility(args, vote: bool = True) -> None:
    """--futility needs a vote certificate with --target-radius (an [`OptionError`] otherwise)."""
    if args.futility and (not vote or args.target_radius is None):
        raise OptionError("--futility: stops a vote certificate's sampling once --target-radius is out of reach; "
                          "give --target-radius" + ("" if vote else " with --prototypes (--method vote)")
                          + ", or drop --futility.")


def check_vote_target(target_radius: float, sigma: float, alpha: float, n: int) -> None:
    """--target-radius of a vote certificate is within reach at the model's σ with --n samples at --alpha (an
    [`OptionError`] otherwise)."""
    try:
        vote_target(target_radius, sigma, alpha, n, n_name="--n")
    except ValueError as error:
        raise OptionError(f"--target-radius {target_radius:g}: {error}") from None
