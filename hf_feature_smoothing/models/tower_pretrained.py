"""`SmoothedVisionTower.from_pretrained` / `save_pretrained`: a smoothed tower as a Hub checkpoint.

Folder layout: a smoothed MLLM is saved as the smoothed model itself (its `config.json` carries the smoothing). A
stand-alone encoder (DINOv2, ViT, CLIP / SigLIP vision) or a stock MLLM keeps its stock `config.json` and weights;
the smoothing goes to `feature_smoothing.json` (a `feature_smoothing` block in a stock config would be ignored by
transformers), a booster to the `booster/` subfolder as a PEFT adapter. Every file is written atomically, with a card.
"""

import json
import os
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.hub_io import register_hub_io
from ..smoothing.towers import TOWER_FAMILIES
from ..smoothing.towers.processor import HUB_KWARGS, optional_file
from ..utils.atomic import recover_if_local
from ..utils.logging import get_logger
from ..utils.tensors import reading_safetensors
from .auto import loading_smoothed_checkpoint, smoothing_argument
from .booster_support import booster_support, booster_to_save
from .modeling_smoothed import CORRUPT_WEIGHTS_FIX, check_loaded_weights, fill_processor_settings
from .registry import smoothed_class_for


logger = get_logger(__name__)

SMOOTHING_FILE = "feature_smoothing.json"
BOOSTER_FOLDER = "booster"


def _read_smoothing_file(path, **hub) -> dict:
    file = optional_file(path, SMOOTHING_FILE, **hub)
    if file is None:
        return {}
    with open(file) as f:
        return json.load(f)


def tower_from_pretrained(cls, path, smoothing=None, **kwargs):
    """See [`SmoothedVisionTower.from_pretrained`]."""
    recover_if_local(path)
    smoothing = smoothing_argument(smoothing, kwargs)
    hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
    overrides = FeatureSmoothingConfig.overrides(smoothing)
    with loading_smoothed_checkpoint():
        config = AutoConfig.from_pretrained(path, **hub)
    if config.model_type.startswith("smoothed_"):  # a smoothed MLLM: its own tower, smoothing in config.json
        return AutoModelForImageTextToText.from_pretrained(path, smoothing=overrides or None, **kwargs).smoothed_vision_tower
    family = config.model_type
    try:
        smoothed_cls = smoothed_class_for(config)  # the smoothed MLLM class, or None for a stand-alone encoder
    except ValueError:
        raise ValueError(f"`{path}` is a `{family}` checkpoint; SmoothedVisionTower supports {sorted(TOWER_FAMILIES)}.") from None
    saved = _read_smoothing_file(path, **hub)
    embedded = saved.get("booster_config")
    if "booster" in overrides and overrides["booster"] != saved.get("booster"):
        embedded = None  # another booster replaces the saved one
    fields = {**saved, "booster_config": None, **overrides, **({"booster": None} if embedded else {})}
    booster_hub = {k: v for k, v in hub.items() if k in ("cache_dir", "token", "local_files_only", "proxies")}
    kwargs.pop("output_loading_info", None)
    if smoothed_cls is not None:  # a stock MLLM saved with a tower: load it as its smoothed type
        tower = smoothed_cls.from_pretrained(path, smoothing=fields, **kwargs).smoothed_vision_tower
    else:
        smoothing_config = FeatureSmoothingConfig.from_dict(fields)
        fill_processor_settings(smoothing_config, path, family, **hub)
        with reading_safetensors(path, CORRUPT_WEIGHTS_FIX):
            model, info = AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
        check_loaded_weights(model, info, path)
        with booster_support().applied_by_tower():
            if smoothing_config.booster:
                booster_support().load(model, smoothing_config.booster, **booster_hub)
        tower = cls(model.eval(), smoothing_config)
    if embedded:
        subfolder = os.path.join(hub.get("subfolder") or "", BOOSTER_FOLDER)
        with booster_support().applied_by_tower():
            booster_support().load(tower.encoder, path, adapter_name=embedded["adapter_name"], subfolder=subfolder,
                         revision=hub.get("revision"), **booster_hub)
        tower.config.booster = saved.get("booster")
    return tower


def _save_booster(encoder, folder: Path, smoothing: FeatureSmoothingConfig) -> dict | None:
    """The encoder's booster as a PEFT adapter in `folder/booster` (the format `load_booster` reads)."""
    support = booster_support()
    name = booster_to_save(encoder, smoothing.booster)
    if name is None:
        return None
    config = encoder.peft_config[name]
    config.smoothing = support.smoothing_record(smoothing)
    target = folder / BOOSTER_FOLDER
    target.mkdir()
    support.save_adapter(encoder, target, name)
    return {"adapter_name": name, "config": support.config_dict(config)}


def save_tower(tower, folder: str | os.PathLike, **save_kwargs) -> None:
    """The tower's files into `folder` (no card; see [`SmoothedVisionTower.save_pretrained`])."""
    encoder, smoothing = tower.encoder, tower.config
    if getattr(getattr(encoder, "config", None), "feature_smoothing", None) is smoothing:
        encoder._save_pretrained_raw(folder, **save_kwargs)  # the tower of a smoothed MLLM: the smoothed model
        return
    folder = Path(folder)
    smoothing.booster_config = _save_booster(encoder, folder, smoothing)
    state = {k.replace(".base_layer.", "."): v for k, v in encoder.state_dict().items() if booster_support().parameter_prefix not in k}
    peft_loaded = getattr(encoder, "_hf_peft_config_loaded", False)
    encoder._hf_peft_config_loaded = False  # the stock weights, not transformers' adapter-only save
    try:
        encoder.save_pretrained(str(folder), state_dict=state, **save_kwargs)
    finally:
        encoder._hf_peft_config_loaded = peft_loaded
    (folder / SMOOTHING_FILE).write_text(json.dumps(smoothing.to_dict(), indent=2, sort_keys=True) + "\n")


register_hub_io(load_tower=tower_from_pretrained, save_tower_files=save_tower)
