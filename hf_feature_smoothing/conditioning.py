"""Deprecated path: `hf_feature_smoothing.conditioning` moved to `hf_feature_smoothing.smoothing.conditioning` in 0.2.0. This name is an alias of that module (the same module object)
and warns once; it will be removed in a later release."""

import sys
import warnings

from .smoothing import conditioning as _module


warnings.warn("`hf_feature_smoothing.conditioning` moved to `hf_feature_smoothing.smoothing.conditioning`; import it from there.", FutureWarning, stacklevel=2)
sys.modules[__name__] = _module
