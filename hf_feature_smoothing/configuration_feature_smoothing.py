"""Deprecated path: `hf_feature_smoothing.configuration_feature_smoothing` moved to `hf_feature_smoothing.smoothing.configuration_feature_smoothing` in 0.2.0. This name is an alias of that module (the same module object)
and warns once; it will be removed in a later release."""

import sys
import warnings

from .smoothing import configuration_feature_smoothing as _module


warnings.warn("`hf_feature_smoothing.configuration_feature_smoothing` moved to `hf_feature_smoothing.smoothing.configuration_feature_smoothing`; import it from there.", FutureWarning, stacklevel=2)
sys.modules[__name__] = _module
