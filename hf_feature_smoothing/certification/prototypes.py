"""Class prototypes for certified cosine-similarity predictors y(x) = argmax_k cos(f(x), t_k): the few-shot
nearest-class-mean classifier (t_k the normalised mean unit feature of class k's training images) and prototypes
fitted to the FS margin certificate on smoothed training features."""

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..smoothing.configuration_feature_smoothing import SMOOTHED_FEATURES
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..utils.atomic import atomic_path
from .arguments import check_prototypes
from .inputs import tower_device


PROTOTYPES_KEY = "prototypes"
CENTER_KEY = "feature_center"
MADE_WITH = ("model", "booster", "sigma")  # the setting a prototypes file records it was made for


@torch.inference_mode()
def image_features(tower: SmoothedVisionTower, images: Sequence, *, image_size: int | None = None,
                   batch_size: int = 32, num_samples: int = 0, progress: bool = False) -> torch.Tensor:
    """
    `(N, F)` features of `images`, one row per image: with `num_samples` = k > 0 the smoothed feature f̂(x) at the
    tower's σ estimated from k noisy copies (the mean of their unit features, norm ≤ 1; a booster conditioned on σ;
    noise from the tower's seed), with 0 the clean unit feature f(x) (no noise; computed as the certificates' clean
    reference is: a booster conditioned on σ, the tower's autocast dtype); both centred by the tower's
    `feature_center`, if any.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"`num_samples` must be an int ≥ 0 (0: clean features), got {num_samples!r}.")
    rows, device = [], tower_device(tower)
    for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress):
        inputs = tower.family.preprocess(list(images[start : start + batch_size]), image_size)
        inputs = inputs.with_pixels(inputs.pixel_values.to(device))
        if num_samples:
            unit_sum, _ = tower.monte_carlo(inputs, num_samples)[-1]
            rows_per_image = tower.family.rows_per_image(inputs, unit_sum.shape[0])
            rows.append(torch.stack([part.flatten() / num_samples for part in unit_sum.split(rows_per_image)]).cpu())
        else:  # f(x) as the certificates' clean reference computes it: a booster conditioned on σ, the tower's dtype
            with tower._compute_context(device):
                encoded = tower._center(tower.family.encode(inputs)[-1].float())  # in the tower's centred space
            unit, _ = tower._unit_rows(encoded[None], inputs)
            rows.append(unit[0].reshape(inputs.num_images, -1).cpu())
    return torch.cat(rows)


def _check_labels(labels: Sequence[int], count: int, num_classes: int | None) -> tuple[torch.Tensor, int]:
    labels = [int(label) for label in labels]
    if count != len(labels) or not labels:
        raise ValueError(f"Need one label per image and at least one image, got {count} images and "
                         f"{len(labels)} labels.")
    num_classes = num_classes or max(labels) + 1
    if min(labels) < 0 or max(labels) >= num_classes:
        raise ValueError(f"`labels` must lie in [0, {num_classes}), got {min(labels)}..{max(labels)}.")
    index = torch.tensor(labels)
    empty = [k for k in range(num_classes) if not bool((index == k).any())]
    if empty:
        raise ValueError(f"Classes {empty} have no training image; every class needs at least one.")
    return index, num_classes


def class_means(features: torch.Tensor, labels: Sequence[int], num_classes: int | None = None) -> torch.Tensor:
    """`(K, F)` unit prototypes from `(N, F)` features: per class, the normalised mean of its images' feature
    directions."""
    index, num_classes = _check_labels(labels, features.shape[0], num_classes)
    index = index.to(features.device)
    directions = nn.functional.normalize(features.float(), dim=1)
    sums = torch.zeros(num_classes, features.shape[1], device=features.device).index_add_(0, index, directions)
    counts = torch.bincount(index, minlength=num_classes).float()
    return nn.functional.normalize(sums / counts[:, None], dim=1)


@torch.inference_mode()
def class_prototypes(tower: SmoothedVisionTower, images: Sequence, labels: Sequence[int], *,
                     num_classes: int | None = None, image_size: int | None = None, batch_size: int = 32,
                     num_samples: int = 0, progress: bool = False) -> torch.Tensor:
    """
    `(K, F)` unit prototypes: for each class the mean of the unit features of its images, normalised. Every class in
    `range(num_classes)` (default `max(labels) + 1`) needs at least one image. Any fixed prototypes give sound
    prediction certificates; smoothed ones (`num_samples` > 0) match what the smoothed predictor sees at the tower's
    σ (noisy features drift towards a common direction as σ grows, away from clean class means).

    Args:
        tower (`SmoothedVisionTower`): the encoder whose (primary) feature the predictor uses.
        images (`Sequence[PIL.Image.Image]`): training images.
        labels (`Sequence[int]`): their class indices.
        image_size (`int`, *optional*): resize/crop size; defaults to the model's resolution.
        num_samples (`int`, *optional*, defaults to 0): 0: the base features f(x) of the clean images (no noise, a
            booster conditioned on σ as in the certificates' clean reference); k > 0: the directions of the smoothed
            features f̂(x) at the tower's σ, estimated from k noisy copies (a booster conditioned on σ; noise from
            the tower's seed).
    """
    _check_labels(labels, len(images), num_classes)
    features = image_features(tower, images, image_size=image_size, batch_size=batch_size, num_samples=num_samples,
                              progress=progress)
    return class_means(features, labels, num_classes)


def certified_margins(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """`(N,)` FS margins min_{k≠y} Φ⁻¹(p_y) − Φ⁻¹(p_k), p_k = (1 + ⟨f̂, t_k⟩)/2, of smoothed features `(N, F)` with
    labels y: the certified radius of a prediction certificate is σ/2 times this (with p_y, p_k replaced by their
    confidence bounds), negative where the predictor errs."""
    p = ((1.0 + features @ prototypes.T) / 2.0).clamp(1e-6, 1.0 - 1e-6)
    z = torch.special.ndtri(p)
    own = z.gather(1, labels[:, None])
    others = z.masked_fill(nn.functional.one_hot(labels, prototypes.shape[0]).bool(), -math.inf)
    return own[:, 0] - others.amax(1)


def fit_prototypes(features: torch.Tensor, labels: Sequence[int], num_classes: int | None = None, *,
                   steps: int = 300, lr: float = 0.02, cap: float = 4.0, temperature: float = 0.1) -> torch.Tensor:
    """
    `(K, F)` unit prototypes fitted to the FS margin certificate (the recipe of `hf-fs prototypes --fit`): on the
    smoothed training features f̂ (`(N, F)`, from [`image_features`] with `num_samples` > 0 at the σ to certify),
    maximise the mean over images of min(softmin_{k≠y} [Φ⁻¹(p_y) − Φ⁻¹(p_k)], `cap`), p_k = (1 + ⟨f̂, t_k⟩)/2, the
    margin that sets the certified radius (σ/2 times it; see [`certified_margins`]). Class means of DINOv2 features sit
    at cosine ≈ 0.9 to each other, so their margins are tiny; fitting starts from the centred class means
    normalise(μ_k − μ̄) and runs `steps` full-batch Adam steps on t_k = w_k/‖w_k‖ (deterministic: no sampling). The
    cap stops easy images from taking the budget; `temperature` smooths the min over competitors. Prototypes chosen
    on training images and certified on others keep the certificate sound (they are fixed before its noise).
    """
    index, num_classes = _check_labels(labels, features.shape[0], num_classes)
    index = index.to(features.device)
    features = features.detach().float().clone()  # a normal tensor (features may come from inference mode)
    means = torch.stack([features[index == k].mean(0) for k in range(num_classes)])
    weights = (means - means.mean(0)).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weights], lr=lr)
    mask = nn.functional.one_hot(index, num_classes).bool()
    with torch.enable_grad():
        for _ in range(steps):
            prototypes = nn.functional.normalize(weights, dim=1)
            z = torch.special.ndtri(((1.0 + features @ prototypes.T) / 2.0).clamp(1e-6, 1.0 - 1e-6))
            gaps = (z.gather(1, index[:, None]) - z).masked_fill(mask, math.inf)  # (N, K): Φ⁻¹(p_y) − Φ⁻¹(p_k)
            softmin = -temperature * torch.logsumexp(-gaps / temperature, dim=1)
            loss = -softmin.clamp_max(cap).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return nn.functional.normalize(weights.detach(), dim=1)


def save_prototypes(prototypes: torch.Tensor, path: str | os.PathLike, *, class_names: Sequence[str] | None = None,
                    feature_center: Sequence[float] | None = None, **metadata) -> None:
    """Write `prototypes` (`(K, F)`) to a safetensors file under the key `prototypes`, with the class names and
    any other string-able `metadata` (model, image size, shots, ...) in the header; atomically. `feature_center`:
    the tower's `feature_center` the prototypes' features were computed with (saved in float64 under the key
    `feature_center`, read back exactly by [`load_prototype_space`]): the prototypes live in that centred space,
    and `hf-fs certify --prototypes` certifies with it."""
    if class_names is not None and len(class_names) != prototypes.shape[0]:
        raise ValueError(f"Got {len(class_names)} class names for {prototypes.shape[0]} prototypes.")
    header = {"class_names": json.dumps(list(class_names) if class_names is not None else None),
              **{k: json.dumps(v) for k, v in metadata.items()}}
    tensors = {PROTOTYPES_KEY: prototypes.contiguous()}
    if feature_center is not None:
        tensors[CENTER_KEY] = torch.tensor(list(feature_center), dtype=torch.float64)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


@dataclass(frozen=True)
class PrototypeSpace:
    """The feature space a prototypes file was made in: the tower's `smoothed_features` site and `feature_center`
    (None: not recorded, e.g. a file from before these were saved, or no centre), and `made_with`: the `model`,
    `booster` and `sigma` its metadata records (`hf-fs prototypes`; only those present)."""

    smoothed_features: str | None = None
    feature_center: list[float] | None = None
    made_with: dict = field(default_factory=dict)


def _metadata_value(metadata: dict[str, str], key: str):
    """A safetensors metadata value as [`save_prototypes`] writes it (JSON), else the raw string; None if absent."""
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        return metadata[key]


def read_prototypes(path: str | os.PathLike, name: str | None = None,
                    width: int | None = None) -> tuple[torch.Tensor, PrototypeSpace]:
    """The `(K, F)` prototypes of a file written by [`save_prototypes`] (any safetensors file with a `prototypes`
    tensor), checked as [`certify_prediction`] checks them (K ≥ 2, finite, no zero row; F = `width` when given), and
    the [`PrototypeSpace`] they were made in (the centre exactly as saved), from one read of the file. Errors name
    the file (or `name`, e.g. `--prototypes <path>`)."""
    name = name or str(path)
    try:
        with safe_open(str(path), "pt") as f:
            keys, metadata = set(f.keys()), f.metadata() or {}
            prototypes = f.get_tensor(PROTOTYPES_KEY) if PROTOTYPES_KEY in keys else None
            center = f.get_tensor(CENTER_KEY) if CENTER_KEY in keys else None
    except Exception as error:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{name}: not a readable safetensors file ({type(error).__name__}: {error}); write it with "
                         f"`hf-fs prototypes` or `save_prototypes`.") from None
    if prototypes is None:
        raise ValueError(f"{name}: no `{PROTOTYPES_KEY}` tensor (found {sorted(keys)}); save the (K, F) class "
                         f"prototypes under that name.")
    check_prototypes(prototypes, name, width)
    site = _metadata_value(metadata, "smoothed_features")
    if site is not None and site not in SMOOTHED_FEATURES:
        raise ValueError(f"{name}: `smoothed_features` {site!r} in its metadata is not one of {SMOOTHED_FEATURES}; "
                         f"recompute the prototypes with `hf-fs prototypes`.")
    if center is not None and (center.ndim != 1 or not center.numel() or not torch.isfinite(center).all()):
        raise ValueError(f"{name}: its `{CENTER_KEY}` must be a non-empty, finite 1-d tensor (got shape "
                         f"{tuple(center.shape)}); recompute the prototypes with `hf-fs prototypes --center`.")
    made_with = {key: _metadata_value(metadata, key) for key in MADE_WITH if key in metadata}
    return prototypes, PrototypeSpace(site, None if center is None else center.tolist(), made_with)


def load_prototypes(path: str | os.PathLike, name: str | None = None, width: int | None = None) -> torch.Tensor:
    """The checked `(K, F)` prototypes of a prototypes file (see [`read_prototypes`]): the tensor alone. A file made
    with `hf-fs prototypes --center` or `--features` lives in that feature space; pass its path to
    [`certify_prediction`], which certifies in it (or put a tower in it with [`tower_in_space`])."""
    return read_prototypes(path, name, width)[0]


def tower_in_space(tower: SmoothedVisionTower, space: PrototypeSpace, name: str = "prototypes") -> SmoothedVisionTower:
    """
    `tower` in the feature space prototypes were made in (their file's [`PrototypeSpace`]: the `smoothed_features`
    site and the `feature_center` μ), so a prediction compares like with like: the tower itself where it already is,
    else a tower over the same encoder with that site and centre. A tower whose own centre contradicts the file's
    (another μ, or centred features for prototypes made uncentred) is refused, naming `name` (e.g. the file).
    """
    changes = {}
    if space.smoothed_features not in (None, tower.config.smoothed_features):
        changes["smoothed_features"] = space.smoothed_features
    own = tower.config.feature_center
    if space.feature_center is None and space.smoothed_features is not None and own:
        raise ValueError(f"{name}: made on uncentred features, but the model centres its features (`feature_center` "
                         "in its smoothing config); make the prototypes with this model (`hf-fs prototypes`).")
    if space.feature_center is not None:
        if own is not None and own != space.feature_center:
            raise ValueError(f"{name}: made with a feature centre of {len(space.feature_center)} values, but the "
                             f"model centres its features with another ({len(own)} values); use prototypes made with "
                             "this model (`hf-fs prototypes` without --center).")
        changes["feature_center"] = space.feature_center
    return SmoothedVisionTower(tower.encoder, dataclasses.replace(tower.config, **changes)) if changes else tower


def load_prototype_space(path: str | os.PathLike, name: str | None = None) -> PrototypeSpace:
    """The [`PrototypeSpace`] of a prototypes file (see [`read_prototypes`])."""
    return read_prototypes(path, name)[1]


def feature_width(tower: SmoothedVisionTower, image_size: int | None = None) -> int:
    """F, the width of the (primary) unit feature of one image that [`certify_prediction`] compares with
    prototypes: one clean pass on a grey image of `image_size` (default: the model's resolution)."""
    from PIL import Image

    size = image_size or tower.family.default_image_size()
    inputs = tower.family.preprocess([Image.new("RGB", (size, size), (128, 128, 128))], image_size)
    device = tower_device(tower)
    with torch.no_grad():
        return tower.clean_unit_features(inputs.with_pixels(inputs.pixel_values.to(device)))[-1].numel()
