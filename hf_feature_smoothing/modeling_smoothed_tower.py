"""Deprecated path: `hf_feature_smoothing.modeling_smoothed_tower` moved to `hf_feature_smoothing.smoothing.modeling_smoothed_tower` in 0.2.0. This name is an alias of that module (the same module object)
and warns once; it will be removed in a later release."""

import sys
import warnings

from .smoothing import modeling_smoothed_tower as _module


warnings.warn("`hf_feature_smoothing.modeling_smoothed_tower` moved to `hf_feature_smoothing.smoothing.modeling_smoothed_tower`; import it from there.", FutureWarning, stacklevel=2)
sys.modules[__name__] = _module
