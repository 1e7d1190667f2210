"""`hf-fs` (the console script `hf_feature_smoothing.cli:main`, also `python -m hf_feature_smoothing.cli` and
`accelerate launch -m hf_feature_smoothing.cli ...`): a shim over `hf_feature_smoothing.commands`, where each
command lives in its own module."""

import sys

from .commands import build_parser, main
from .commands.loading import SHIPPED_BOOSTER, load_model, open_source, resolve_booster


__all__ = ["SHIPPED_BOOSTER", "build_parser", "load_model", "main", "open_source", "resolve_booster"]

if __name__ == "__main__":
    sys.exit(main())
