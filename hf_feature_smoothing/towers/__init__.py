"""Deprecated path: `hf_feature_smoothing.towers` moved to `hf_feature_smoothing.smoothing.towers` in 0.2.0. This
package and its submodules are aliases of those modules (the same objects) and warn once; they will be removed in a
later release."""

import sys
import warnings

from ..smoothing import towers as _package
from ..smoothing.towers import base, llava, processor, qwen_vl, vision


for _submodule in (base, llava, processor, qwen_vl, vision):
    sys.modules[f"{__name__}.{_submodule.__name__.rpartition('.')[2]}"] = _submodule
warnings.warn("`hf_feature_smoothing.towers` moved to `hf_feature_smoothing.smoothing.towers`; import it from there.",
              FutureWarning, stacklevel=2)
sys.modules[__name__] = _package
