"""`hf-fs`: one module per command, each with its own `register_subcommand(subparsers)` (`certify`,
`certify-answer`, `attack`, `report`, `prototypes`, `build`), the option types, groups and checks they share
(`options`), the model / processor / image source loading behind `--model`, `--booster`, `--images` and `--dataset`
(`loading`) and the run helpers (`running`). This package is the top layer: nothing else in `hf_feature_smoothing` imports it (`cli.py` is a
shim that re-exports `build_parser` and `main`)."""

import logging
import sys
import traceback

from ..runs import RunError
from . import attack, build, certify, certify_answer, prototypes, report
from .options import HelpFormatter, OptionError, Parser


DESCRIPTION = """`hf-fs`: certify features or predictions (`hf-fs certify`), certify an MLLM's answers (`hf-fs
certify-answer`) or attack (`hf-fs attack`) folders or datasets of images in resumable, locked runs, on one process or
many (`accelerate launch -m hf_feature_smoothing.cli certify ...`), and turn finished runs into tables, plots and
`model-index` metrics (`hf-fs report`)."""

COMMANDS = (certify, certify_answer, attack, report, build, prototypes)  # the order of `hf-fs --help`

__all__ = ["COMMANDS", "build_parser", "main"]


def build_parser() -> Parser:
    parser = Parser(prog="hf-fs", description=DESCRIPTION, formatter_class=HelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register_subcommand(subparsers)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment (not the one at creation): `main` may run many times in a process."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging(level: str) -> None:
    package = logging.getLogger("hf_feature_smoothing")
    package.setLevel(level.upper())
    if not any(getattr(h, "_hf_fs", False) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[hf-fs] %(levelname)s: %(message)s"))
        handler._hf_fs = True
        package.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Run one `hf-fs` command. Exit status: 0 done; 1 the run cannot start or continue (locked, other parameters,
    corrupt rows, a model that does not load); 2 a bad option value or combination (argparse's status), also when
    the library refuses a value (`ValueError` / `TypeError`): one line on stderr, the traceback only with
    `--verbosity debug`."""
    import torch

    args = build_parser().parse_args(argv)
    _configure_logging(args.verbosity)
    if hasattr(args, "images") and not args.images and not args.dataset:
        args.images = "skimage"
    try:
        with torch.no_grad():  # attacks re-enable gradients where they need them
            return args.func(args)
    except OptionError as error:
        print(f"hf-fs {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"hf-fs {args.command}: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError) as error:
        if args.verbosity == "debug":
            traceback.print_exc()
        print(f"hf-fs {args.command}: error: {error}", file=sys.stderr)
        return 2
