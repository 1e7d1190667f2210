"""Cohen et al.'s vote certificate (Cohen, Rosenfeld & Kolter, ICML 2019, "Certified Adversarial Robustness via
Randomized Smoothing", CERTIFY), with an anytime-valid bound. Pure: stdlib and torch only.

The smoothed classifier is g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I), for a base classifier f. CERTIFY:
choose ĉ_A = the most frequent class of f on `n0` selection samples ([`top_class`]); count how often f(x + δ) = ĉ_A
on `n` other samples (Bernoulli hits); bound p_A = P(f(x + δ) = ĉ_A) from below at level α by p̲_A; when p̲_A > ½,
g(x + e) = ĉ_A for every ‖e‖₂ < R = σ Φ⁻¹(p̲_A) ([`vote_radius`]); else abstain.

The paper bounds p_A with Clopper–Pearson at a fixed n. Here p̲_A comes from the project's betting confidence sequence
(Waudby-Smith & Ramdas, [`BettingTest`] run at a fixed grid of candidate means, [`VOTE_GRID`]): it holds at every
sample at once, so sampling may stop as soon as a `target_radius` is certified ([`VoteBound`]), and the state is O(grid)
whatever n (hits are counted, never stored). With `futility`, an upper confidence sequence (the same test on the
misses) also stops sampling once p_A < Φ(R/σ) is established: the target is then out of reach whatever n (Voráček,
NeurIPS 2024, "Treatment of statistical estimation problems in randomized smoothing", decides a radius from both sides
the same way). The lower sequence holds at any stopping time, so the certificate stays valid; its radius is what the
copies drawn so far certify, below the target. The grid costs at most σ·`VOTE_GRID_STEP` of radius (0.0025 at σ = 0.25).
"""

import math
from dataclasses import dataclass

import torch

from .betting import TRUNCATIONS, BettingTest, best_case_reach, reach_shortfall
from .bounds import normal_cdf, normal_ppf


VOTE_GRID_STEP = 0.01  # spacing of the grid in Φ⁻¹(p) units above p = ½ (radius resolution σ·step)
VOTE_GRID_TOP = 6.0  # the largest Φ⁻¹(p) on the grid (p ≈ 1 − 1e-9)
VOTE_STOPS = ("n", "target", "unreachable", "futile")


def vote_grid(target: float | None = None) -> list[float]:
    """Candidate values of p_A, fixed before sampling: Φ(z) for z = −3, −2.75, …, −0.25 (coarse: below ½ the
    certificate abstains whatever the value) and z = 0, 0.01, …, 6 (fine: they set the radius), plus `target`."""
    zs = [k * 0.25 for k in range(-12, 0)] + [k * VOTE_GRID_STEP for k in range(round(VOTE_GRID_TOP / VOTE_GRID_STEP) + 1)]
    grid = {normal_cdf(z) for z in zs} | ({float(target)} if target is not None else set())
    return sorted(p for p in grid if 0.0 < p < 1.0)


VOTE_GRID = tuple(vote_grid())


def top_class(counts: torch.Tensor) -> int:
    """ĉ_A: the class the base classifier chose most often on the selection samples (ties: the lowest index)."""
    counts = torch.as_tensor(counts)
    if counts.ndim != 1 or counts.numel() < 2:
        raise ValueError(f"`counts` must be a 1-D tensor of at least two class counts, got shape {tuple(counts.shape)}.")
    return int(counts.argmax())


def vote_radius(p_lower: float, sigma: float) -> float:
    """R = σ Φ⁻¹(p̲_A) when p̲_A > ½, else 0 (abstain)."""
    if not 0.0 <= p_lower <= 1.0 or not sigma > 0:
        raise ValueError(f"Need `p_lower` in [0, 1] and `sigma` > 0, got p_lower={p_lower!r}, sigma={sigma!r}.")
    return sigma * normal_ppf(p_lower) if p_lower > 0.5 else 0.0


TARGET_SLACK = 1e-12  # ≫ the float error of Φ(R/σ) (≈ 1e-15 at most): a target of 0.5 + 1e-17 is above ½ too


def vote_target(target_radius: float, sigma: float, alpha: float | None = None, n: int | None = None,
                n_name: str = "`n`") -> float:
    """The p̲_A a certificate of radius `target_radius` needs: Φ(R/σ) (so that σ Φ⁻¹(p̲_A) ≥ R), raised by
    `TARGET_SLACK` above the float rounding of R/σ and Φ, so that reaching it proves p_A > Φ(R/σ) in exact
    arithmetic (a stop at the target then claims R exactly, soundly). With `alpha` and
    `n`, a target that `n` samples cannot certify even if every one votes for the top class is refused, with the n
    that can (else every certificate would stop, out of reach, after one sample)."""
    if not target_radius > 0 or not sigma > 0 or not math.isfinite(target_radius):
        raise ValueError(f"Need `target_radius` > 0 and `sigma` > 0, got target_radius={target_radius!r}, "
                         f"sigma={sigma!r}.")
    target = normal_cdf(target_radius / sigma) + TARGET_SLACK
    if target >= normal_cdf(VOTE_GRID_TOP):
        raise ValueError(f"`target_radius` {target_radius:g} is out of reach at σ={sigma:g}: it needs p̲_A ≥ "
                         f"Φ({target_radius / sigma:.3g}), beyond what any sample size certifies here (Φ⁻¹(p̲_A) ≤ "
                         f"{VOTE_GRID_TOP:g}); lower the target or raise σ.")
    shortfall = None if alpha is None or n is None else reach_shortfall(target, alpha, n)
    if shortfall:
        best = VoteBound(alpha, n)
        best.update(torch.ones(n))
        raise ValueError(f"`target_radius` {target_radius:g} is out of reach with {n_name} {n} at σ={sigma:g} and "
                         f"α={alpha:g}: it needs p̲_A ≥ {target:.6g}, and even if all {n} samples vote for the top "
                         f"class the radius is {vote_radius(best.p_lower, sigma):.4g}. Raise {n_name} ({shortfall}) "
                         "or lower the target.")
    return target


class VoteBound:
    """
    Streaming lower confidence sequence for p_A from Bernoulli hits (1: the base classifier chose ĉ_A), valid at every
    sample: feed hits chunk by chunk with [`update`] until it returns True (`n` hits, the target reached, the
    target out of reach within `n`, or, with `futility`, p_A < target established). `p_lower` is then the largest
    candidate value of [`vote_grid`] whose test H₀: p_A ≤ p rejected by the stopping sample; with probability ≥ 1 − α
    it is ≤ p_A, whatever the stopping rule.

    Args:
        alpha (`float`): failure probability.
        n (`int`): the most hits that may be fed (the bets are tuned for it).
        target (`float`, *optional*): stop once p̲_A ≥ `target` (see [`vote_target`]), or once that has become
            impossible within `n` (`stop="unreachable"`).
        futility (`bool`, *optional*, defaults to `False`): also stop (`stop="futile"`) once the betting test of
            H₀: p_A ≥ `target` on the misses rejects at level α, i.e. once p_A < `target` is established: with
            probability ≥ 1 − α a p_A ≥ `target` never stops this way. Needs `target`. Its bets are tuned for the
            copies all-hit votes need to reach `target`.
    """

    def __init__(self, alpha: float, n: int, target: float | None = None, futility: bool = False):
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"`n` must be a positive number of samples, got {n!r}.")
        if isinstance(alpha, bool) or not 0 < alpha < 1:
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}; e.g. `alpha=0.001`.")
        if target is not None and not 0.0 < target < 1.0:
            raise ValueError(f"`target` must be a probability in (0, 1), got {target!r}.")
        if not isinstance(futility, bool):
            raise ValueError(f"`futility` must be True or False, got {futility!r}.")
        if futility and target is None:
            raise ValueError("`futility=True` stops sampling once the target is out of reach: it needs a `target`.")
        self.n, self.target, self.futility = int(n), target, futility
        # a candidate p whose capital cannot reach 1/α in n samples even if every hit is 1 (each factor is at most
        # 1 + c(1 − p)/p) is never rejected: leaving it out changes nothing and saves most of the work at small n
        threshold = math.log(1.0 / alpha)
        grid = [p for p in vote_grid(target)
                if p == target or self.n * math.log1p(max(TRUNCATIONS) * (1.0 - p) / p) >= threshold]
        grid = grid or vote_grid()[:1]
        self.test = BettingTest(grid, alpha, self.n)
        self.target_index = None if target is None else grid.index(float(target))
        # the upper sequence: H₀: E[miss] ≤ 1 − target (p_A ≥ target), rejected at level α → p_A < target. Its bets
        # are tuned for the copies a certificate needs at best to reach the target (any predictable bets are valid):
        # tuned for n they are several times too timid on the hundreds of copies that decide most images
        scale = (best_case_reach(target, alpha, self.n) or self.n) if futility else None
        self.upper = BettingTest(1.0 - target, alpha, scale) if futility else None
        self.reached = torch.zeros(len(grid), dtype=torch.bool)  # rejected by the stopping sample
        self.n_used = self.hits = 0
        self.stop: str | None = None

    @property
    def done(self) -> bool:
        return self.stop is not None

    def update(self, hits: torch.Tensor) -> bool:
        """Add a chunk of 0/1 hits (only as many as are still needed are used); returns True once done."""
        if self.done:
            return True
        hits = torch.as_tensor(hits).detach().flatten().to("cpu", torch.float64)[: self.n - self.n_used]
        if hits.numel() == 0:
            return self.done
        give_up = False if self.target_index is None else self.target_index
        reached, hopeless = self.test.update_all(hits, hopeless=give_up)
        end, stop = self.n_used + hits.numel(), None
        if self.target_index is not None:
            futile_at = 0 if self.upper is None else int(self.upper.update_all(1.0 - hits, hopeless=False)[0][0])
            stops = {"target": int(reached[self.target_index]), "futile": futile_at,
                     "unreachable": int(hopeless[self.target_index])}  # ties: the first named
            if any(stops.values()):
                end = min(t for t in stops.values() if t)
                stop = next(name for name, t in stops.items() if t == end)
        self.reached |= (reached > 0) & (reached <= end)
        self.hits += int(hits[: end - self.n_used].sum())
        self.n_used = end
        if stop is None and self.n_used == self.n:
            stop = "n"
        self.stop = stop
        return self.done

    @property
    def p_lower(self) -> float:
        return self.test.lower(self.reached)


@dataclass
class VoteResult:
    """What CERTIFY returns: the class ĉ_A (None: abstain), its radius, p̲_A, the hits among `n_used` samples and why
    sampling stopped (`"n"`, `"target"`, `"unreachable"`, `"futile"`)."""

    prediction: int | None
    radius: float
    p_lower: float
    hits: int
    n_used: int
    stop: str


def vote_result(top: int, bound: VoteBound, sigma: float, target_radius: float | None = None) -> VoteResult:
    """The certificate of ĉ_A = `top` once `bound` is done: abstain (None, radius 0) when p̲_A ≤ ½. Stopped at the
    target (p̲_A ≥ Φ(R/σ), R = `target_radius`), the radius is at least R exactly (σΦ⁻¹(Φ(R/σ)) can round below R)."""
    radius = vote_radius(bound.p_lower, sigma)
    if bound.stop == "target" and target_radius is not None:
        radius = max(radius, float(target_radius))
    return VoteResult(top if radius > 0 else None, radius, bound.p_lower, bound.hits, bound.n_used, bound.stop or "n")


def certify_vote(selection_counts: torch.Tensor, hits: torch.Tensor, sigma: float, alpha: float,
                 n: int | None = None, target_radius: float | None = None, futility: bool = False) -> VoteResult:
    """
    CERTIFY from the base classifier's outputs: `selection_counts` `(K,)` (n0 selection samples) choose ĉ_A, and the
    hits `(m,)` of ĉ_A on other samples, in sampling order, bound p_A (only the first hits are used when sampling
    stops early at `target_radius`, or with `futility` once it is out of reach; `n` defaults to m).
    """
    top = top_class(selection_counts)
    hits = torch.as_tensor(hits).flatten()
    n = n or hits.numel()
    bound = VoteBound(alpha, n, None if target_radius is None else vote_target(target_radius, sigma, alpha, n),
                      futility)
    bound.update(hits)
    return vote_result(top, bound, sigma, target_radius)


__all__ = ["VOTE_GRID", "VOTE_GRID_STEP", "VOTE_STOPS", "VoteBound", "VoteResult", "certify_vote", "top_class",
           "vote_grid", "vote_radius", "vote_target"]
