"""Side-by-side evaluation under attack: plain vs smoothed (vs smoothed + booster) towers, with certificates."""

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..certification import certify
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..smoothing.noise import derive_seed, image_fingerprint
from ..smoothing.towers import ImageInputs
from ..utils.validation import check_seed
from .feature import _features, feature_attack


def attack_rows(
    tower: SmoothedVisionTower,
    inputs: ImageInputs,
    epsilons: Sequence[float],
    *,
    smoothed: bool = True,
    norm: str = "l2",
    algorithm: str = "apgd",
    steps: int = 20,
    eot_samples: int = 8,
    eval_samples: int = 256,
    n: int = 1000,
    alpha: float = 0.001,
    success_threshold: float = 0.5,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    bound: str | None = None,
) -> list[dict]:
    """
    Attack one image at every ε and report, per ε: the clean feature cosine cos(g(x), f(x)), the attacked cosine
    cos(g(x + δ), f(x)) and whether the attack succeeded (attacked cosine < `success_threshold`), where g is the
    smoothed encoder f̂ (estimated with `eval_samples` draws; attacked with EOT over `eot_samples`) or, with
    `smoothed=False`, the plain encoder f. Smoothed rows also carry the certified FCSB from `n` separate samples
    at level `alpha` (confidence bound `bound`, default [`certify`]'s), and `certificate_holds` (attacked cosine ≥
    FCSB). ℓ∞ budgets are certified through the ℓ2 ball that contains them (radius ε√d).

    With a `seed`, every random draw for this image (random starts, EOT and evaluation noise, certification noise)
    comes from streams seeded by (`seed`, the image): the rows depend only on the seed, the image and the
    parameters, not on earlier calls or on which other images were attacked (the tower's forward-pass seed is
    restored afterwards). Without one, `generator` (random starts) and the tower's own noise are used.

    Args:
        seed (`int`, *optional*):
            Seeds every draw for this image from (`seed`, image); `None`: `generator` and the tower's noise.
        bound (`str`, *optional*):
            Confidence bound of the certificate; defaults to [`certify`]'s.
    """
    if inputs.num_images != 1:
        raise ValueError(f"`attack_rows` takes one image, got {inputs.num_images}.")
    seed = check_seed(seed)
    if seed is None:
        return _attack_rows(tower, inputs, epsilons, smoothed, norm, algorithm, steps, eot_samples, eval_samples, n,
                            alpha, success_threshold, generator, None, bound)
    fingerprint = image_fingerprint(tower.family.to_image(inputs))
    generator = torch.Generator(device=inputs.pixel_values.device)
    generator.manual_seed(derive_seed(seed, "attack", "starts", fingerprint=fingerprint))
    previous = tower.config.seed
    tower.manual_seed(derive_seed(seed, "attack", "forward", fingerprint=fingerprint))
    try:
        return _attack_rows(tower, inputs, epsilons, smoothed, norm, algorithm, steps, eot_samples, eval_samples, n,
                            alpha, success_threshold, generator, seed, bound)
    finally:
        tower.manual_seed(previous)


def _attack_rows(tower, inputs, epsilons, smoothed, norm, algorithm, steps, eot_samples, eval_samples, n, alpha,
                 success_threshold, generator, seed, bound) -> list[dict]:
    reference = tower.clean_unit_features(inputs)[-1].float()
    dim = tower.family.to_image(inputs).numel()
    l2_budgets = [e if norm == "l2" else e * math.sqrt(dim) for e in epsilons]
    # the attacks measure cosines to the clean feature f(x): certify that reference
    options = {"seed": seed, "reference": "clean"} | ({"bound": bound} if bound is not None else {})
    certificate = certify(tower, inputs, epsilon=l2_budgets, n=n, alpha=alpha, **options)[0] if smoothed else None
    samples = eval_samples if smoothed else 0
    with torch.no_grad():
        image = tower.family.to_image(inputs)
        clean = nn.functional.cosine_similarity(_features(tower, inputs, image, samples), reference, dim=0).item()
    rows = []
    for index, epsilon in enumerate(epsilons):
        attack = feature_attack(tower, inputs, reference, epsilon, norm=norm, algorithm=algorithm, steps=steps,
                                eot_samples=eot_samples if smoothed else 0, eval_samples=samples, generator=generator)
        bound = certificate.fcsb[index] if certificate is not None else None
        rows.append({
            "epsilon": epsilon, "norm": norm, "algorithm": algorithm, "steps": steps, "smoothed": smoothed,
            "eot_samples": eot_samples if smoothed else 0, "eval_samples": samples, "clean_cosine": clean,
            "attacked_cosine": attack.cosine, "perturbation_norm": attack.norm,
            "success": attack.cosine < success_threshold, "success_threshold": success_threshold,
            "fcsb": bound, "certificate_holds": None if bound is None else attack.cosine >= bound,
            "sigma": tower.sigma if smoothed else None, "n": n if smoothed else None,
            "alpha": alpha if smoothed else None, "noise_space": "pixel [0,1]" if smoothed else None,
            "bound": certificate.bound if smoothed else None, "seed": seed,
        })
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Mean clean / attacked cosine, success rate, mean FCSB and certificate violations per (variant, ε)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["epsilon"]), []).append(row)
    summary = []
    for (variant, epsilon), group in groups.items():
        bounds = [r["fcsb"] or 0.0 for r in group]
        summary.append({
            "variant": variant, "epsilon": epsilon, "images": len(group),
            "clean_cosine": sum(r["clean_cosine"] for r in group) / len(group),
            "attacked_cosine": sum(r["attacked_cosine"] for r in group) / len(group),
            "success_rate": sum(r["success"] for r in group) / len(group),
            "certified_cosine": None if not group[0]["smoothed"] else sum(bounds) / len(bounds),
            "violations": sum(r["certificate_holds"] is False for r in group),
        })
    return summary
