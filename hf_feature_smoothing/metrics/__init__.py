"""`evaluate` metrics shipped with the package, loadable offline: `hf_feature_smoothing.metrics.load(...)`."""

from pathlib import Path

from ..hub.sharing import certificate_kind


METRICS_DIR = Path(__file__).parent
AVAILABLE = ("certified_robustness",)


def load(name: str = "certified_robustness", config_name: str = "cosine", **kwargs):
    """`evaluate.load` of a metric bundled in this package (no Hub access): `"certified_robustness"` with
    `config_name` `"cosine"` (certified cosine at ε) or `"accuracy"` (certified accuracy at radius r)."""
    import evaluate

    if name not in AVAILABLE:
        raise ValueError(f"Unknown metric {name!r}; available: {AVAILABLE}.")
    return evaluate.load(str(METRICS_DIR / name), config_name, **kwargs)


def accuracy_inputs(certificates) -> dict[str, list]:
    """The `"accuracy"` metric's inputs from prediction or answer certificates (the objects, or their dicts such as
    `hf-fs` run rows): `prediction` (the predicted class or answer index; −1 where the certificate abstains),
    `label` and `radius`: `metric.compute(**accuracy_inputs(certificates), epsilon=[0, 0.5, 1])`. A certificate
    without a reference `label`, or a feature certificate, is refused."""
    rows = [c if isinstance(c, dict) else c.to_dict() for c in certificates]
    inputs = {"prediction": [], "label": [], "radius": []}
    for i, row in enumerate(rows):
        if row.get("status", "ok") != "ok":
            raise ValueError(f"row {i} ({row.get('key')}) is `{row['status']}`, not a certificate: pass the rows whose "
                             "`status` is `ok` (a skipped image has no certified prediction).")
        kind = certificate_kind(row)
        if kind == "feature":
            raise ValueError(f"certificate {i} is a feature certificate: certified accuracy needs prediction or answer "
                             "certificates (use the `\"cosine\"` metric with `score_lower` and `sigma`).")
        if row.get("label") is None:
            raise ValueError(f"certificate {i} has no `label`: certified accuracy needs the index of the correct class "
                             "or candidate (pass `labels` when certifying, or add `label` to its dict).")
        inputs["prediction"].append(-1 if row[kind] is None else row[kind])
        inputs["label"].append(row["label"])
        inputs["radius"].append(row["radius"])
    return inputs
