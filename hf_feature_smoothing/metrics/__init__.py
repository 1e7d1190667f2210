"""`evaluate` metrics shipped with the package, loadable offline: `hf_feature_smoothing.metrics.load(...)`."""

from collections.abc import Sequence
from pathlib import Path

from ..certification.arguments import RADIUS, check_values
from ..hub.sharing import certificate_kind, check_one_setting


METRICS_DIR = Path(__file__).parent
AVAILABLE = ("certified_robustness",)


def load(name: str = "certified_robustness", config_name: str = "cosine", **kwargs):
    """`evaluate.load` of a metric bundled in this package (no Hub access): `"certified_robustness"` with
    `config_name` `"cosine"` (certified cosine at ε) or `"accuracy"` (certified accuracy at radius r)."""
    import evaluate

    if name not in AVAILABLE:
        raise ValueError(f"Unknown metric {name!r}; available: {AVAILABLE}.")
    return evaluate.load(str(METRICS_DIR / name), config_name, **kwargs)


def accuracy_inputs(certificates, epsilon: float | Sequence[float] | None = None) -> dict[str, list]:
    """The `"accuracy"` metric's inputs from prediction or answer certificates of one setting (the objects, or their
    dicts such as `hf-fs` run rows): `prediction` (the predicted class or answer index; −1 where the certificate
    abstains), `label` and `radius`, and with `epsilon` the ℓ2 radii to measure at:
    `metric.compute(**accuracy_inputs(certificates, epsilon=[0, 0.5, 1]))`. Refused: a certificate without a
    reference `label`, a feature certificate, certificates of several settings (as `model-index` entries refuse
    them), and for sequential certificates (stopped at `target_radius`) a missing `epsilon` or a radius beyond the
    target: sampling stopped there, so accuracy beyond it would count the stops as failures."""
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
    check_one_setting(rows)
    target = rows[0].get("target_radius") if rows else None  # one value: `check_one_setting`
    if target is not None and epsilon is None:
        raise ValueError(f"The certificates stopped sampling at their target radius {target:g}: pass the radii to "
                         f"measure, at most {target:g}, e.g. `metric.compute(**accuracy_inputs(certificates, "
                         f"epsilon=[0, {target:g}]))`.")
    if epsilon is not None:
        radii = check_values("epsilon", epsilon, RADIUS)
        beyond = [r for r in radii if target is not None and r > target]
        if beyond:
            raise ValueError(f"`epsilon` {beyond} lies beyond the certificates' target radius {target:g}: sampling "
                             "stopped once the target was certified, so accuracy there would count the stops as "
                             f"failures; measure at radii up to {target:g}.")
        inputs["epsilon"] = list(radii)
    return inputs
