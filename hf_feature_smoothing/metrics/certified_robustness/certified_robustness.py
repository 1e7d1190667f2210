"""`evaluate` metric: certified cosine (FCSB) and certified accuracy of Feature-space Smoothing certificates."""

import math
import warnings

import datasets
import evaluate

from hf_feature_smoothing.statistics.aggregates import ABSTAIN, REPORT_RADII, certified_accuracy, certified_cosine


_DESCRIPTION = """
Aggregates Feature-space Smoothing certificates (see `hf_feature_smoothing.certification`).

* `"cosine"`: inputs `score_lower` (the (1 − α) lower confidence bound S_low of the Gaussian robustness score) and
  `sigma` (noise std, pixel [0, 1] units) per image. Returns `certified_cosine@ε`: the mean over images of
  FCSB(ε) = 2Φ(Φ⁻¹(S_low) − ε/σ) − 1, where an abstention (S_low ≤ 1/2) or a negative bound counts as 0, plus
  `abstain_rate`.
* `"accuracy"`: inputs `prediction` (−1 = abstain), `label` and `radius` (certified ℓ2 radius) per image. Returns
  `certified_accuracy@r`: the fraction of images predicted correctly with a certified radius ≥ r (r = 0: correct
  and not abstained), plus `abstain_rate`. Prediction certificates (FS margin or vote) give `prediction`; answer
  certificates of an MLLM (`certify_answer`, `hf-fs certify-answer` rows) give the answer's index as `prediction`
  (`answer`, None → −1) and the candidate index of the reference answer as `label`.
"""

_KWARGS_DESCRIPTION = """
Args (the names of `certify` / `certify_prediction` and of their certificates' fields):
    score_lower (`list[float]`), sigma (`list[float]`): for `"cosine"`.
    prediction (`list[int]`), label (`list[int]`), radius (`list[float]`): for `"accuracy"`.
    epsilon (`list[float]`, *optional*, defaults to `[0.0, 0.05, 0.1, 0.25, 0.5, 1.0]`): ℓ2 budgets in [0, 1] pixel
        units: FCSB(ε) for `"cosine"`, "correct with certified radius ≥ ε" for `"accuracy"`. (`epsilons` / `radii`
        are deprecated aliases.)
Returns:
    `dict[str, float]`, e.g. `{"certified_cosine@0.1": 0.62, "abstain_rate": 0.1}`.
Examples:
    >>> metric = hf_feature_smoothing.metrics.load("certified_robustness", "cosine")
    >>> metric.compute(score_lower=[0.9], sigma=[0.25], epsilon=[0.0])
    {'certified_cosine@0': 0.8, 'abstain_rate': 0.0}
"""

_CITATION = "Feature-space Smoothing: certified robustness of multimodal LLM vision features (FS / GSB)."
DEFAULT_BUDGETS = list(REPORT_RADII)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CertifiedRobustness(evaluate.Metric):
    BUILDER_CONFIGS = ["cosine", "accuracy"]

    def _info(self):
        if self.config_name == "accuracy":
            features = datasets.Features({"prediction": datasets.Value("int64"), "label": datasets.Value("int64"),
                                          "radius": datasets.Value("float64")})
        elif self.config_name in ("cosine", "default"):
            features = datasets.Features({"score_lower": datasets.Value("float64"), "sigma": datasets.Value("float64")})
        else:
            raise KeyError(f"config_name must be 'cosine' or 'accuracy', got {self.config_name!r}.")
        return evaluate.MetricInfo(description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
                                   features=features)

    def _compute(self, score_lower=None, sigma=None, prediction=None, label=None, radius=None, epsilon=None,
                 epsilons=None, radii=None):
        for old, value in (("epsilons", epsilons), ("radii", radii)):
            if value is not None:
                if epsilon is not None:
                    raise ValueError(f"Pass the budgets once, as `epsilon` (`{old}` is its deprecated alias).")
                warnings.warn(f"`{old}` is deprecated; use `epsilon` (the name `certify` uses).", FutureWarning,
                              stacklevel=2)
                epsilon = value
        budgets = DEFAULT_BUDGETS if epsilon is None else [epsilon] if isinstance(epsilon, (int, float)) else epsilon
        for value in budgets:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`epsilon` must hold finite ℓ2 budgets ≥ 0, got {value!r} in {list(budgets)}.")
        if self.config_name == "accuracy":  # Arrow int columns cannot hold None: −1 is the abstention here
            return certified_accuracy([ABSTAIN if p == -1 else p for p in prediction], label, radius, budgets)
        return certified_cosine(score_lower, sigma, budgets)
