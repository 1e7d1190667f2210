"""`evaluate` metrics shipped with the package, loadable offline: `hf_feature_smoothing.metrics.load(...)`."""

from pathlib import Path


METRICS_DIR = Path(__file__).parent
AVAILABLE = ("certified_robustness",)


def load(name: str = "certified_robustness", config_name: str = "cosine", **kwargs):
    """`evaluate.load` of a metric bundled in this package (no Hub access): `"certified_robustness"` with
    `config_name` `"cosine"` (certified cosine at ε) or `"accuracy"` (certified accuracy at radius r)."""
    import evaluate

    if name not in AVAILABLE:
        raise ValueError(f"Unknown metric {name!r}; available: {AVAILABLE}.")
    return evaluate.load(str(METRICS_DIR / name), config_name, **kwargs)
