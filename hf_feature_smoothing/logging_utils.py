"""Deprecated path: `hf_feature_smoothing.logging_utils` moved to `hf_feature_smoothing.utils.logging` in 0.2.0. This name is an alias of that module (the same module object)
and warns once; it will be removed in a later release."""

import sys
import warnings

from .utils import logging as _module


warnings.warn("`hf_feature_smoothing.logging_utils` moved to `hf_feature_smoothing.utils.logging`; import it from there.", FutureWarning, stacklevel=2)
sys.modules[__name__] = _module
