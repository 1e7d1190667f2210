import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_feature_smoothing.certification import bounds
from hf_feature_smoothing.certification.bounds import (
    certified_radius,
    empirical_bernstein_lower_bound,
    fcsb,
    hoeffding_lower_bound,
    lower_confidence_bound,
    normal_cdf,
    normal_ppf,
    prediction_radius,
    upper_confidence_bound,
)


# Reference values from the design notes (paper-notes §2.4), σ = 1 so r = ε/σ.
FCSB_TABLE = {
    0.60: [0.2000, 0.1219, 0.0027, -0.1948, -0.5447],
    0.75: [0.5000, 0.4344, 0.3288, 0.1385, -0.2552],
    0.80: [0.6000, 0.5417, 0.4459, 0.2674, -0.1258],
    0.90: [0.8000, 0.7626, 0.6977, 0.5655, 0.2217],
    0.95: [0.9000, 0.8776, 0.8369, 0.7477, 0.4810],
    0.99: [0.9800, 0.9740, 0.9621, 0.9322, 0.8153],
    0.999: [0.9980, 0.9972, 0.9955, 0.9904, 0.9634],
}
RADIUS_TABLE = {
    0.75: [0.6745, 0.0, 0.0, 0.0],
    0.80: [0.8416, 0.1671, 0.0, 0.0],
    0.90: [1.2816, 0.6071, 0.0, 0.0],
    0.95: [1.6449, 0.9704, 0.3633, 0.0],
    0.99: [2.3263, 1.6519, 1.0448, 0.6815],
    0.999: [3.0902, 2.4157, 1.8087, 1.4454],
}


@pytest.mark.parametrize("score, expected", FCSB_TABLE.items())
def test_fcsb_table(score, expected):
    for r, value in zip([0, 0.1, 0.25, 0.5, 1.0], expected):
        assert fcsb(score, epsilon=r * 0.5, sigma=0.5) == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("score, expected", RADIUS_TABLE.items())
def test_radius_table(score, expected):
    for tau, value in zip([0, 0.5, 0.8, 0.9], expected):
        assert certified_radius(score, sigma=2.0, tau=tau) == pytest.approx(2.0 * value, abs=2e-4)


@pytest.mark.parametrize(
    "x, phi",
    [(0.0, 0.5), (1.0, 0.8413447461), (-1.959963985, 0.025), (8.0, 1 - 6.22e-16), (-math.inf, 0.0), (math.inf, 1.0)],
)
def test_normal_cdf_table(x, phi):
    assert normal_cdf(x) == pytest.approx(phi, abs=1e-9)


@pytest.mark.parametrize(
    "p, q", [(0.5, 0.0), (0.975, 1.959963985), (1e-10, -6.361340902), (0.0, -math.inf), (1.0, math.inf)]
)
def test_normal_ppf_table(p, q):
    assert normal_ppf(p) == pytest.approx(q, abs=1e-7)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_normal_ppf_rejects_non_probabilities(p):
    with pytest.raises(ValueError, match="`p`"):
        normal_ppf(p)


def test_fcsb_properties():
    for score in [0.55, 0.7, 0.9, 0.99]:
        assert fcsb(score, 0.0, 0.25) == pytest.approx(2 * score - 1)
        values = [fcsb(score, e, 0.25) for e in [0, 0.05, 0.1, 0.3, 1.0]]
        assert values == sorted(values, reverse=True)
        for e in [0.05, 0.1, 0.3, 1.0]:  # never weaker than the linear Lipschitz bound
            assert fcsb(score, e, 0.25) >= 2 * score - 1 - math.sqrt(2 / math.pi) * e / 0.25 - 1e-12
        assert certified_radius(score, 0.25, 0.5) == pytest.approx(max(0, 0.25 * (normal_ppf(score) - 0.6744897502)))
    assert fcsb(1.0, 0.3, 0.25) == 1.0 and fcsb(0.0, 0.0, 0.25) == -1.0
    with pytest.raises(ValueError, match="sigma"):
        fcsb(0.9, 0.1, 0.0)
    with pytest.raises(ValueError, match="tau"):
        certified_radius(0.9, 0.25, 1.0)


def test_bernstein_is_tighter_for_concentrated_scores_and_margins_match_notes():
    n, alpha = 1000, 1e-3
    assert 0.9 - hoeffding_lower_bound(torch.full((n,), 0.9), alpha) == pytest.approx(0.0588, abs=1e-3)
    scores = torch.cat([torch.full((n // 2,), 0.95 - math.sqrt(0.001)), torch.full((n // 2,), 0.95 + math.sqrt(0.001))])
    assert scores.var().item() == pytest.approx(0.001, rel=0.01)
    margin = scores.double().mean().item() - empirical_bernstein_lower_bound(scores, alpha)
    assert margin == pytest.approx(0.022, abs=1.5e-3)  # notes: EB, V = 0.001, N = 1000 → 0.022
    assert empirical_bernstein_lower_bound(torch.tensor([0.9]), alpha) == -math.inf


@pytest.mark.parametrize("method", ["hoeffding", "bernstein"])
@pytest.mark.parametrize("distribution", ["bernoulli", "beta"])
def test_lower_bound_coverage(method, distribution):
    """≥ 1 − α of 2000 independent bounds fall below the true mean."""
    generator = torch.Generator().manual_seed(0)
    alpha, n, trials = 0.05, 200, 2000
    if distribution == "bernoulli":
        truth = 0.8
        samples = (torch.rand(trials, n, generator=generator) < truth).double()
    else:
        beta = torch.distributions.Beta(torch.tensor(8.0), torch.tensor(2.0))
        torch.manual_seed(0)
        samples, truth = beta.sample((trials, n)).double(), 0.8
    covered = sum(lower_confidence_bound(s, alpha, method) <= truth for s in samples)
    assert covered / trials >= 1 - alpha
    uppers = sum(upper_confidence_bound(s, alpha, method) >= truth for s in samples)
    assert uppers / trials >= 1 - alpha


def test_lower_bound_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        lower_confidence_bound(torch.ones(3), 0.1, "clopper")
    with pytest.raises(ValueError, match="empty"):
        lower_confidence_bound(torch.ones(0), 0.1)


def test_prediction_radius():
    assert prediction_radius(0.9, [0.5, 0.6], sigma=0.5) == pytest.approx(0.25 * (normal_ppf(0.9) - normal_ppf(0.6)))
    assert prediction_radius(0.55, [0.6], sigma=0.5) == 0.0


def test_statistics_core_does_not_import_transformers():
    path = Path(bounds.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('bounds', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert module.fcsb(0.9, 0.1, 0.25) > 0\n"
        "assert 'transformers' not in sys.modules, 'bounds.py imported transformers'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
