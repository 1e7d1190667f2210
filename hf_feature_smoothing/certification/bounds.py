"""Deprecated path: moved to `hf_feature_smoothing.statistics.bounds` in 0.2.0; this module re-exports it and warns
once (it will be removed in a later release)."""

import warnings

from ..statistics import bounds as _moved


globals().update({name: value for name, value in vars(_moved).items() if not name.startswith("__")})
warnings.warn("`hf_feature_smoothing.certification.bounds` moved to `hf_feature_smoothing.statistics.bounds`; import it "
              "from there.", FutureWarning, stacklevel=2)
