"""Bookkeeping of an attack protocol over images: budgets, the worst case per image over an ensemble of attacks, and
monotonicity in the budget (an image broken at a smaller budget of a norm is broken at every larger one).

A protocol's rows (one per variant × budget × attack × image batch) hold, per attacked image, `index`, `mode`
(`"untargeted"`, `"targeted-next"`, `"targeted-runner-up"`), `accuracy` (the fraction of fresh passes giving the
reference answer) and `success` (of the attack's own goal) — the fields of [`AnswerAttackResult`]."""

from dataclasses import dataclass

from ..statistics.aggregates import wilson_interval


BUDGETS = ("linf:2", "linf:4", "linf:8", "l2:1", "l2:2")  # ℓ∞ in /255, ℓ2 in [0, 1] pixel units


def parse_budget(text: str) -> tuple[str, float]:
    """`"linf:4"` → `("linf", 4/255)`, `"l2:1"` → `("l2", 1.0)`."""
    norm, _, value = str(text).partition(":")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if norm not in ("linf", "l2") or not number > 0:
        raise ValueError(f"a budget is linf:K (ℓ∞ K/255) or l2:R (ℓ2 R in [0, 1] pixel units) with K, R > 0; "
                         f"got {text!r}.")
    return norm, number / 255 if norm == "linf" else number


def budget_name(budget: str) -> str:
    norm, epsilon = parse_budget(budget)
    return f"ℓ∞ {round(epsilon * 255)}/255" if norm == "linf" else f"ℓ2 {epsilon:g}"


def budgets_up_to(budget: str, budgets=BUDGETS) -> list[str]:
    """The budgets of `budget`'s norm no larger than it (itself included)."""
    norm, epsilon = parse_budget(budget)
    return [b for b in budgets if parse_budget(b)[0] == norm and parse_budget(b)[1] <= epsilon]


def is_broken(image: dict) -> bool:
    """Most fresh passes give a wrong answer."""
    return image["accuracy"] < 0.5


def hits_target(image: dict) -> bool:
    """The next-digit targeted attack made most fresh passes give its target."""
    return image["mode"] == "targeted-next" and image["success"] > 0.5


def image_states(rows: list[dict], variant: str, budget: str, indices) -> dict[int, dict]:
    """Per image of `indices`: `broken` by any attack at `budget` or a smaller budget of its norm, `target` reached."""
    scope = set(budgets_up_to(budget, {budget, *BUDGETS, *(r.get("budget") for r in rows if r.get("budget"))}))
    state = {i: {"broken": False, "target": False} for i in indices}
    for row in rows:
        if row.get("variant") == variant and row.get("budget") in scope:
            for image in row["images"]:
                if image["index"] in state:
                    state[image["index"]]["broken"] |= is_broken(image)
                    state[image["index"]]["target"] |= hits_target(image)
    return state


@dataclass
class ProtocolCell:
    """One (variant, budget) cell: images attacked, robust ones, next-digit targets reached, attacks run, and the
    time spent at this budget per image per 100 gradient steps."""

    variant: str
    budget: str
    attacks: list[str]
    images: int
    robust: int
    targeted: int
    seconds_per_100_steps: float | None

    @property
    def robust_interval(self) -> tuple[float, float]:
        return wilson_interval(self.robust, self.images)

    @property
    def targeted_interval(self) -> tuple[float, float]:
        return wilson_interval(self.targeted, self.images)


def protocol_cells(rows: list[dict], variants, attacks) -> list[ProtocolCell]:
    """The cells of `rows` in (variant, norm, budget) order, worst case per image over the attacks run."""
    known = {r["budget"] for r in rows if r.get("budget")}
    cells = []
    for variant in variants:
        for budget in sorted(known, key=lambda b: (BUDGETS.index(b) if b in BUDGETS else len(BUDGETS), b)):
            cell = [r for r in rows if r.get("variant") == variant and r.get("budget") in budgets_up_to(budget, known)]
            indices = {i for r in cell for i in r.get("attacked", [])}
            if not indices or not any(r["budget"] == budget for r in cell):
                continue
            states = image_states(rows, variant, budget, indices)
            here = [r for r in cell if r["budget"] == budget]
            steps = sum(image["evaluations"] for r in here for image in r["images"])
            cells.append(ProtocolCell(
                variant, budget, [a for a in attacks if any(r["attack"] == a for r in here)], len(indices),
                sum(not s["broken"] for s in states.values()), sum(s["target"] for s in states.values()),
                100 * sum(r["seconds"] for r in here) / steps if steps else None))
    return cells


__all__ = ["BUDGETS", "ProtocolCell", "budget_name", "budgets_up_to", "hits_target", "image_states", "is_broken",
           "parse_budget", "protocol_cells"]
