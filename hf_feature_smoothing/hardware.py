"""Deprecated path: `hf_feature_smoothing.hardware` moved to `hf_feature_smoothing.utils.hardware` in 0.2.0. This name is an alias of that module (the same module object)
and warns once; it will be removed in a later release."""

import sys
import warnings

from .utils import hardware as _module


warnings.warn("`hf_feature_smoothing.hardware` moved to `hf_feature_smoothing.utils.hardware`; import it from there.", FutureWarning, stacklevel=2)
sys.modules[__name__] = _module
