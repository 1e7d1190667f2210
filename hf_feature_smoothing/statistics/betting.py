"""Confidence bounds for the mean of [0, 1] scores by betting (Waudby-Smith & Ramdas, JRSS-B 2023, "Estimating means
of bounded random variables by betting"). Pure: stdlib and torch only.

For a candidate mean m, a gambler bets λᵢ(m) ≥ 0 on each score: the capital is K_t(m) = ∏_{i≤t} (1 + λᵢ(m)(Xᵢ − m)).
When E[X] ≤ m and λᵢ(m) ∈ [0, 1/m) depends on X₁..Xᵢ₋₁ only (predictable), K_t(m) is a non-negative
supermartingale, so by Ville's inequality P(sup_t K_t(m) ≥ 1/α) ≤ α. The average of capitals over several
truncations λᵢ(m) = min(λ̃ᵢ, c/m), c ∈ `TRUNCATIONS`, is itself such a process (much tighter than any single c when
the scores concentrate near 1). Every factor decreases in m, so the rejected set {m : sup_t K_t(m) ≥ 1/α} is an
interval [0, L): the lower bound is L, found by a grid search with refinement, vectorised over sequences (only
points verified as rejected are ever reported). Because sup_t is taken over every prefix, the bound after t scores
holds **simultaneously for every t** (a confidence sequence): stopping at a data-dependent time is valid.
"""

import contextlib
import functools
import math
from collections.abc import Sequence

import torch


TRUNCATIONS = (0.5, 0.75, 0.9, 0.99)
_GRID = 3  # candidate means per refinement round (each round shrinks the bracket 4×; fastest measured)
_ROUNDS = 12  # resolution 4^-12 ≈ 6e-8
_MAX_ELEMENTS = 2**23  # elements of one (sequences × time × grid × truncations) block: bounds the memory of the search
_TIME_BLOCK = 4096  # scores per block along time (fixed, so results never depend on the batch)


@contextlib.contextmanager
def _one_thread():
    """Run the bound computations on one intra-op thread: on a busy machine, waking OpenMP workers for each
    transcendental op costs far more than the op (measured: 16 ms vs 12 µs per op on 2 shared cores)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _log_inverse(alpha: float | torch.Tensor) -> float | torch.Tensor:
    """ln(1/α): a float for one α, a `(B, 1)` float64 column for one α per sequence (the same bits either way)."""
    if torch.is_tensor(alpha):  # math.log per level: torch.log may round differently in the last bit
        return torch.tensor([[math.log(1.0 / a)] for a in alpha.reshape(-1).tolist()], dtype=torch.float64,
                            device=alpha.device)
    return math.log(1.0 / alpha)


def plug_in_bets(scores: torch.Tensor, alpha: float | torch.Tensor, horizon: int) -> torch.Tensor:
    """
    Predictable plug-in bets λ̃ᵢ = √(2 ln(1/α) / (N σ̂²ᵢ₋₁)), N = `horizon`, with the running estimates
    μ̂_t = (1/2 + Σ_{i≤t} Xᵢ)/(t + 1) and σ̂²_t = (1/4 + Σ_{i≤t} (Xᵢ − μ̂ᵢ)²)/(t + 1) (σ̂²₀ = 1/4). Bet i uses
    X₁..Xᵢ₋₁ only. Shape of `scores` `(..., n)` float64; `alpha` a float, or a `(B,)` tensor (one α per row of
    `(B, n)` scores).
    """
    n = scores.shape[-1]
    t = torch.arange(1, n + 1, dtype=scores.dtype, device=scores.device)
    mean = (0.5 + scores.cumsum(-1)) / (t + 1)
    var = (0.25 + (scores - mean).pow(2).cumsum(-1)) / (t + 1)
    previous = torch.cat([torch.full_like(var[..., :1], 0.25), var[..., :-1]], dim=-1)
    return torch.sqrt(2.0 * _log_inverse(alpha) / (horizon * previous))


@functools.lru_cache(maxsize=16)
def _truncation_tensor(truncations: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The mixture's truncations c as a tensor, built once per setting (read only)."""
    return torch.tensor(list(truncations), dtype=dtype, device=device)


def _max_log_capital(scores: torch.Tensor, bets_all: torch.Tensor, means: torch.Tensor,
                     truncations: Sequence[float], threshold: float | torch.Tensor) -> torch.Tensor:
    """log sup_t of the truncation-mixture capital for every candidate mean: scores/bets `(B, n)`, means `(B, G)`
    → `(B, G)`, exact below `threshold` (a float, or a `(B, 1)` column: one per sequence; above it, any value
    ≥ `threshold` may be returned: a component's log capital is capped at threshold + ln|C| + 1 before averaging,
    where the mixture exceeds the threshold either way).

    Time is walked in blocks of `_TIME_BLOCK` scores, carrying each component's (uncapped) log capital from one block
    to the next, and sequences in groups, so memory is bounded and each sequence's result does not depend on the
    others or on the block size (up to float rounding). In a block where no bet reaches a truncation
    (λ̃ᵢ ≤ min(c)/m, the rule once n is large), every component grows by the same Σ log(1 + λ̃ᵢ(Xᵢ − m)): the
    mixture is then exp(that sum) times the mean of the carried capitals, computed without the component axis."""
    batch, n = scores.shape
    grid = means.shape[-1]
    rows = max(1, _MAX_ELEMENTS // (_TIME_BLOCK * grid * len(truncations)))
    if batch > rows:
        return torch.cat([_max_log_capital(scores[i : i + rows], bets_all[i : i + rows], means[i : i + rows],
                                           truncations, threshold[i : i + rows] if torch.is_tensor(threshold)
                                           else threshold) for i in range(0, batch, rows)])
    cap = threshold + math.log(len(truncations)) + 1.0
    if torch.is_tensor(cap):
        cap = cap[:, :, None, None]  # (B, 1, 1, 1) against (B, T, G, C)
    caps = _truncation_tensor(tuple(truncations), scores.dtype, scores.device) / means[..., None]  # (B, G, C)
    lowest_cap = caps.amin(-1)  # (B, G)
    several = n > _TIME_BLOCK  # one block (the usual n): no capital to carry, so none is added or copied
    carry = torch.zeros(batch, grid, len(truncations), dtype=scores.dtype, device=scores.device)
    best = None  # log Σ_c capital, the max over the blocks so far
    for start in range(0, n, _TIME_BLOCK):
        excess = scores[:, start : start + _TIME_BLOCK, None] - means[:, None, :]  # (B, T, G)
        bets = bets_all[:, start : start + _TIME_BLOCK, None]  # (B, T, 1)
        if bool((bets <= lowest_cap[:, None]).all()):  # no truncation binds: one increment for every component
            growth = torch.log1p(bets * excess).cumsum(1)  # (B, T, G)
            block_best = growth.amax(1) + torch.logsumexp(carry, -1)
            if several:
                carry = carry + growth[:, -1, :, None]
        else:
            log_capital = torch.log1p(torch.minimum(bets[..., None], caps[:, None]) * excess[..., None]).cumsum(1)
            if several:
                log_capital = log_capital + carry[:, None]  # (B, T, G, C), a new tensor: the carry below is its own
                carry = log_capital[:, -1].clone()
            block_best = log_capital.clamp_max_(cap).exp_().sum(-1).amax(1).log_()  # in place: carry is a copy
        best = block_best if best is None else torch.maximum(best, block_best)
    if best is None:  # no scores: no capital
        best = torch.full((batch, grid), -math.inf, dtype=scores.dtype, device=scores.device)
    return best - math.log(len(truncations))


def betting_rejects(
    scores: torch.Tensor,
    mean: float,
    alpha: float,
    horizon: int | None = None,
    truncations: Sequence[float] = TRUNCATIONS,
) -> torch.Tensor:
    """
    The batch form of [`BettingTest`]: True where the truncation-mixture capital at `mean` reaches 1/α at some prefix,
    i.e. where H₀: E[X] ≤ `mean` is rejected. When E[X] ≤ `mean` this happens with probability ≤ α (Ville), whatever
    n; [`betting_lower_bound`] only reports means rejected by this same test, so its miss rate is at most this one's.

    Args:
        scores (`torch.Tensor`): `(..., n)` scores in [0, 1].
        mean (`float`): the candidate mean, in (0, 1).
        alpha (`float`): level of the test.
        horizon (`int`, *optional*): the sample size the bets are tuned for (defaults to n).
        truncations (`Sequence[float]`): the mixture's bet caps c/m, each c in (0, 1).
    Returns:
        `torch.Tensor`: booleans of shape `(...)`.
    """
    if not 0.0 < mean < 1.0:
        raise ValueError(f"`mean` must be in (0, 1), got {mean!r}.")
    with _one_thread():
        x = scores.detach().to(torch.float64).clamp(0.0, 1.0)
        lead, n = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, n)
        bets = plug_in_bets(x, alpha, horizon or n)
        threshold = math.log(1.0 / alpha)
        means = torch.full((x.shape[0], 1), float(mean), dtype=torch.float64, device=x.device)
        return (_max_log_capital(x, bets, means, tuple(truncations), threshold)[:, 0] >= threshold).reshape(lead)


def betting_lower_bound(
    scores: torch.Tensor,
    alpha: float | torch.Tensor,
    horizon: int | None = None,
    truncations: Sequence[float] = TRUNCATIONS,
) -> torch.Tensor:
    """
    (1 − α) lower confidence bound on E[X] from i.i.d. scores X ∈ [0, 1], by betting (see the module docstring):
    with probability ≥ 1 − α, E[X] ≥ L_t for **every** prefix length t at once, L_t the value returned for the
    first t scores. Vectorised over leading dimensions: `scores` `(..., n)` → bounds `(...)` (float64).

    Args:
        scores (`torch.Tensor`): `(..., n)` scores in [0, 1].
        alpha (`float` or `torch.Tensor`): failure probability, or one per sequence (shape `(...)`: several bounds
            at different levels in one search, e.g. the classes of a prediction certificate under a union bound).
        horizon (`int`, *optional*): the sample size the bets are tuned for (defaults to n); any value is valid,
            the planned maximum is the tightest at that size. Sequential certification passes its maximum n.
        truncations (`Sequence[float]`): the mixture's bet caps c/m, each c in (0, 1).
    """
    with _one_thread():
        return _betting_lower_bound(scores, alpha, horizon, truncations)


def _betting_lower_bound(scores: torch.Tensor, alpha: float | torch.Tensor, horizon: int | None,
                         truncations: Sequence[float]) -> torch.Tensor:
    x = scores.detach().to(torch.float64).clamp(0.0, 1.0)
    lead, n = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, n)
    if not all(0.0 < c < 1.0 for c in truncations):
        raise ValueError(f"`truncations` must lie in (0, 1), got {list(truncations)}.")
    if torch.is_tensor(alpha):
        if alpha.shape != lead or not bool(((alpha > 0) & (alpha < 1)).all()):
            raise ValueError(f"`alpha` must be a float or one level in (0, 1) per sequence (shape {tuple(lead)}), "
                             f"got shape {tuple(alpha.shape)}.")
        alpha = alpha.to(device=x.device, dtype=torch.float64).reshape(-1)
    bets = plug_in_bets(x, alpha, horizon or n)
    threshold = _log_inverse(alpha)
    low = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    high = torch.ones_like(low)
    fractions = torch.arange(1, _GRID + 1, dtype=torch.float64, device=x.device) / (_GRID + 1)
    for _ in range(_ROUNDS):
        means = low[:, None] + (high - low)[:, None] * fractions
        rejected = _max_log_capital(x, bets, means, tuple(truncations), threshold) >= threshold
        # k = the first candidate not rejected (every one before it is rejected: verified, not assumed); the new
        # bracket is [edges[k], edges[k + 1]] of edges = (low, candidates..., high)
        first_kept = rejected.long().cumprod(-1).sum(-1, keepdim=True)
        edges = torch.cat([low[:, None], means, high[:, None]], dim=1)
        low, high = edges.gather(1, torch.cat([first_kept, first_kept + 1], dim=1)).unbind(1)
    return low.reshape(lead)


class BettingTest:
    """
    Online test of H₀: E[X] ≤ `mean` with the truncation-mixture capital of [`betting_lower_bound`] (same bets):
    feed scores chunk by chunk; it reports the first sample at which the capital reaches 1/α (then the lower
    confidence sequence is ≥ `mean` from that sample on), and the first sample at which reaching 1/α by `horizon`
    has become impossible even if every remaining score were 1 (each factor is at most 1 + c(1 − m)/m). State is
    O(1) in the number of scores.

    `mean` may also be a sequence of G candidate means (a grid fixed before the scores): the G tests then run side by
    side on the same scores ([`update_all`]), state O(G), and since every factor of the capital decreases in the
    mean, the largest rejected grid mean is a lower confidence sequence for E[X] valid at every sample ([`lower`]).
    """

    def __init__(self, mean: float | Sequence[float], alpha: float, horizon: int,
                 truncations: Sequence[float] = TRUNCATIONS):
        means = torch.as_tensor(mean, dtype=torch.float64).flatten().clone()
        if means.numel() == 0 or not bool(((means > 0) & (means < 1)).all()):
            raise ValueError(f"`mean` must be in (0, 1), got {mean!r}.")
        self.means = means
        self.mean = float(means[0]) if means.numel() == 1 else None
        self.alpha, self.horizon = float(alpha), int(horizon)
        self.caps = torch.tensor(list(truncations), dtype=torch.float64)
        self.threshold = math.log(1.0 / alpha)
        self.count, self.total, self.squares, self.last_var = 0, 0.0, 0.0, 0.25
        self.log_capital = torch.zeros(means.numel(), self.caps.numel(), dtype=torch.float64)  # (G, C)
        self.best = torch.full((means.numel(),), -math.inf, dtype=torch.float64)  # log sup_t capital, per mean
        self._bet_caps = self.caps / means[:, None]  # (G, C)
        self._log_growth = torch.log1p(self.caps * ((1.0 - means) / means)[:, None])  # per-step ceiling (G, C)

    def update(self, scores: torch.Tensor) -> tuple[int | None, int | None]:
        """Add scores; returns `(reached, unreachable)`: the 1-based sample counts at which the test (of the first
        mean) first rejected / first became hopeless within this chunk, or None."""
        reached, hopeless = self.update_all(scores)
        return (int(reached[0]) or None), (int(hopeless[0]) or None)

    def update_all(self, scores: torch.Tensor, hopeless: bool | int = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scores; returns, per mean `(G,)`, the 1-based sample count at which its test first rejected / first
        became hopeless within this chunk (0: not in this chunk). The second is computed for every mean with
        `hopeless=True`, for the mean of that index only with an `int` (0 elsewhere), for none with `False`."""
        with _one_thread():
            return self._update(scores, hopeless)

    @property
    def rejected(self) -> torch.Tensor:
        """`(G,)` booleans: the means whose H₀ has been rejected at some sample so far."""
        return self.best >= self.threshold

    def lower(self, rejected: torch.Tensor | None = None) -> float:
        """The largest rejected mean (0 when none): with probability ≥ 1 − α, E[X] ≥ this value at every sample."""
        rejected = self.rejected if rejected is None else rejected
        return float(self.means[rejected].max()) if bool(rejected.any()) else 0.0

    def _update(self, scores: torch.Tensor, give_up: bool | int = True) -> tuple[torch.Tensor, torch.Tensor]:
        x = scores.detach().to("cpu", torch.float64).flatten().clamp(0.0, 1.0)  # the state lives on the CPU
        if x.numel() == 0:
            none = torch.zeros(self.means.numel(), dtype=torch.long)
            return none, none.clone()
        t = self.count + torch.arange(1, x.numel() + 1, dtype=torch.float64)
        totals = torch.cat([torch.tensor([self.total], dtype=torch.float64), x]).cumsum(0)[1:]
        mean = (0.5 + totals) / (t + 1)
        squares = torch.cat([torch.tensor([self.squares], dtype=torch.float64), (x - mean).pow(2)]).cumsum(0)[1:]
        var = (0.25 + squares) / (t + 1)
        previous = torch.cat([torch.tensor([self.last_var], dtype=torch.float64), var[:-1]])
        bets = torch.minimum(torch.sqrt(2.0 * self.threshold / (self.horizon * previous))[:, None, None],
                             self._bet_caps)  # (T, G, C)
        increments = torch.log1p(bets * (x[:, None, None] - self.means[:, None]))
        log_capital = torch.cat([self.log_capital[None], increments]).cumsum(0)[1:]
        log_mix = math.log(self.caps.numel())
        running = torch.cummax(torch.logsumexp(log_capital, 2) - log_mix, 0).values.maximum(self.best)  # (T, G)
        hopeless = torch.zeros_like(running, dtype=torch.bool)
        if give_up is not False:
            columns = slice(None) if give_up is True else slice(int(give_up), int(give_up) + 1)
            remaining = (self.horizon - t).clamp_min(0)
            ceiling = torch.logsumexp(log_capital[:, columns] + remaining[:, None, None] * self._log_growth[columns],
                                      2) - log_mix
            hopeless[:, columns] = (running[:, columns] < self.threshold) & (ceiling < self.threshold)
        start = self.count
        self.count += x.numel()
        self.total, self.squares, self.last_var = totals[-1].item(), squares[-1].item(), var[-1].item()
        self.log_capital, self.best = log_capital[-1], running[-1]
        return _first_all(running >= self.threshold, start), _first_all(hopeless, start)


REACH_LIMIT = 2**22  # the most samples [`samples_to_reach`] looks at


@functools.lru_cache(maxsize=256)  # pure; asked once per certificate of a sequential run
def best_case_reach(mean: float, alpha: float, horizon: int) -> int | None:
    """
    The sample at which [`BettingTest`]`(mean, alpha, horizon)` first rejects H₀: E[X] ≤ `mean` when every score is 1
    (the largest factors and, at the smallest variance, the boldest bets: no scores reach it much sooner), or None
    when even that does not happen within `horizon` samples. A sequential target that needs the bound to reach
    `mean` is then out of reach at this sample size, whatever the scores: sampling would stop after one sample.
    """
    test, done = BettingTest(mean, alpha, horizon), 0
    while done < horizon:
        count = min(16 * _TIME_BLOCK, horizon - done)
        reached, _ = test.update_all(torch.ones(count, dtype=torch.float64), hopeless=False)
        if reached[0]:
            return int(reached[0])
        done += count
    return None


def samples_to_reach(mean: float, alpha: float, start: int = 1) -> int | None:
    """About the fewest samples n ≥ `start` with which the betting bound can reach `mean` ([`best_case_reach`] with
    horizon n, n doubled from `start`), or None beyond [`REACH_LIMIT`]."""
    horizon = max(int(start), 1)
    while horizon <= REACH_LIMIT:
        reached = best_case_reach(mean, alpha, horizon)
        if reached is not None:
            return max(reached, int(start))
        horizon *= 2
    return None


def reach_shortfall(mean: float, alpha: float, n: int) -> str | None:
    """None when `n` samples can bring the betting bound to `mean` ([`best_case_reach`]); else the advice on n for an
    error message: "to N" (an n that can, [`samples_to_reach`]) or "to more than REACH_LIMIT"."""
    if best_case_reach(mean, alpha, n) is not None:
        return None
    enough = samples_to_reach(mean, alpha, n)
    return f"to {enough}" if enough else f"to more than {REACH_LIMIT}"


def _first_all(mask: torch.Tensor, offset: int) -> torch.Tensor:
    """Per column of a `(T, G)` mask, the 1-based sample count of its first True, shifted by `offset`; 0 when none."""
    found = mask.any(0)
    return torch.where(found, offset + mask.int().argmax(0) + 1, 0)
