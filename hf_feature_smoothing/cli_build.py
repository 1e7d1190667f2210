"""Deprecated location of the `hf-fs` build commands: `build-llava` / `build-llava-booster` live in
`hf_feature_smoothing.commands.build`, `prototypes` in `hf_feature_smoothing.commands.prototypes`."""

from .commands import build, prototypes
from .commands.build import run_build_llava as cmd_build_llava
from .commands.build import run_build_llava_booster as cmd_build_llava_booster
from .commands.prototypes import run as cmd_prototypes


__all__ = ["add_build_commands", "cmd_build_llava", "cmd_build_llava_booster", "cmd_prototypes"]


def add_build_commands(sub) -> None:
    """Register `build-llava`, `build-llava-booster` and `prototypes` on the `hf-fs` sub-parsers."""
    build.register_subcommand(sub)
    prototypes.register_subcommand(sub)
