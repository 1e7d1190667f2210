"""Deprecated path: moved to `hf_feature_smoothing.statistics.advisories` in 0.2.0; this module re-exports it and warns
once (it will be removed in a later release)."""

import warnings

from ..statistics import advisories as _moved


globals().update({name: value for name, value in vars(_moved).items() if not name.startswith("__")})
warnings.warn("`hf_feature_smoothing.certification.advisories` moved to `hf_feature_smoothing.statistics.advisories`; import it "
              "from there.", FutureWarning, stacklevel=2)
