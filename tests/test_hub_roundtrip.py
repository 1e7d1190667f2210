"""`from_pretrained` through the real Hub code path: a hand-built cache and `HF_HUB_OFFLINE=1` in a fresh process."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hf_feature_smoothing.testing_utils import TINY_FAMILIES, tiny_inputs, tiny_model

from .conftest import offline_env, populate_hub_cache


CHILD = textwrap.dedent(
    """
    import os, shutil, sys, torch
    from pathlib import Path
    from transformers import AutoModelForImageTextToText
    import hf_feature_smoothing as hfs
    from hf_feature_smoothing.models import SMOOTHED_MODEL_CLASSES
    from hf_feature_smoothing.testing_utils import tiny_inputs

    family, out_dir = sys.argv[1], sys.argv[2]
    cls = SMOOTHED_MODEL_CLASSES[family]
    smoothing = hfs.FeatureSmoothingConfig(sigma=0.12, num_samples=3, seed=7)
    model, info = cls.from_pretrained(f"tiny-org/{family}", smoothing=smoothing, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched: lm_head is not re-initialised
    assert model.smoothing_config.sigma == 0.12 and model.smoothing_config.image_mean == [0.1, 0.2, 0.3]
    model.save_pretrained(out_dir)
    # publish what was saved as tiny-org/smoothed-<family> (as `populate_hub_cache` does), then reload it
    repo = Path(os.environ["HF_HUB_CACHE"]) / f"models--tiny-org--smoothed-{family}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(out_dir, repo / "snapshots" / ("0" * 40))
    again = AutoModelForImageTextToText.from_pretrained(f"tiny-org/smoothed-{family}")
    assert type(again) is cls, type(again)
    assert again.smoothing_config == model.smoothing_config
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after reload"
    inputs = tiny_inputs(model)
    with torch.no_grad():
        model.smoothed_vision_tower._generators.clear()
        x = model(**inputs).logits
        y = again(**inputs).logits
    assert torch.equal(x, y)
    print("OK")
    """
)


def _child(cache, *args):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)], env=offline_env(cache), capture_output=True, text=True
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_wrap_stock_checkpoint_save_and_reload_offline(family, tmp_path, hub_cache):
    stock = tiny_model(family)
    stock.save_pretrained(tmp_path / "stock")
    (tmp_path / "stock" / "preprocessor_config.json").write_text('{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.3, 0.3]}')
    populate_hub_cache(hub_cache, f"tiny-org/{family}", tmp_path / "stock")

    _child(hub_cache, family, tmp_path / "smoothed")  # wrap, save, publish to the cache, reload
    saved = load_file(tmp_path / "smoothed" / "model.safetensors")
    stock_saved = load_file(tmp_path / "stock" / "model.safetensors")
    assert saved.keys() == stock_saved.keys()  # same Hub key layout as the stock checkpoint
    assert all(torch.equal(saved[k], stock_saved[k]) for k in saved)
    assert '"model_type": "smoothed_' in (tmp_path / "smoothed" / "config.json").read_text()


def _cache_revision(cache_dir, repo_id: str, src_dir, revision: str, commit: str, subfolder: str = "") -> None:
    """Add `src_dir` to the hand-built cache as snapshot `commit` (under `subfolder`), reachable as `revision`."""
    import shutil

    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    shutil.copytree(src_dir, repo / "snapshots" / commit / subfolder, dirs_exist_ok=True)


CONTRACT_CHILD = textwrap.dedent(
    """
    import sys, torch
    from peft import AutoPeftModel
    from transformers import AutoModelForImageTextToText
    import hf_feature_smoothing as hfs
    from hf_feature_smoothing.testing_utils import tiny_inputs

    expected = torch.load(sys.argv[1], weights_only=True)

    def logits(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.smoothed_vision_tower.manual_seed(0)
        with torch.no_grad():
            return model(**tiny_inputs(base)).logits

    # a booster repo alone: AutoPeftModel rebuilds the base (no import_allowlist) and restores the smoothing
    peft_model = AutoPeftModel.from_pretrained("tiny-org/gsb")
    base = peft_model.get_base_model()
    assert type(base) is hfs.SmoothedLlavaForConditionalGeneration, type(base)
    assert base.smoothing_config.sigma == 0.12 and base.smoothing_config.image_mean == [0.1, 0.2, 0.3]
    assert torch.equal(logits(peft_model), expected)
    # the smoothed + boosted checkpoint reloads with its booster, no booster repo needed
    full = AutoModelForImageTextToText.from_pretrained("tiny-org/smoothed-gsb")
    assert torch.equal(logits(full), expected)
    # smoothing= through the Auto class on a stock repo; statistics nested in processor_config.json
    auto = AutoModelForImageTextToText.from_pretrained("tiny-org/llava", smoothing={"sigma": 0.3})
    assert type(auto) is hfs.SmoothedLlavaForConditionalGeneration and auto.smoothing_config.sigma == 0.3
    assert auto.smoothing_config.image_mean == [0.1, 0.2, 0.3]
    # subfolder= and a revision other than main, with smoothing=, on every entry point
    for load in (hfs.SmoothedLlavaForConditionalGeneration.from_pretrained, AutoModelForImageTextToText.from_pretrained):
        model = load("tiny-org/multi", subfolder="sub", revision="v1", smoothing={"seed": 4})
        assert model.smoothing_config.image_mean == [0.7, 0.7, 0.7] and model.smoothing_config.seed == 4
    cfg = hfs.SmoothedLlavaConfig.from_pretrained("tiny-org/smoothed-gsb")
    again = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained("tiny-org/smoothed-gsb", config=cfg,
                                                                      smoothing={"num_samples": 2})
    assert again.smoothing_config.num_samples == 2 and again.smoothing_config.seed == 0
    tower = hfs.SmoothedVisionTower.from_pretrained("tiny-org/multi", subfolder="sub", revision="v1")
    assert tower.config.image_mean == [0.7, 0.7, 0.7]
    print("OK")
    """
)


def test_booster_auto_peft_subfolder_and_revision_offline(tmp_path, hub_cache):
    import json

    import hf_feature_smoothing as hfs

    stock = tmp_path / "stock"
    tiny_model("llava").save_pretrained(stock)
    (stock / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.3, 0.3]}, "processor_class": "x"}))
    model = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(
        stock, smoothing={"sigma": 0.12, "num_samples": 3, "seed": 0})
    peft_model = hfs.add_booster(model, hfs.GSBConfig(sigmas=[0.12]))
    generator = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "fs_booster_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    peft_model.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"  # as if the base had come from the Hub
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "tiny-org/llava"}))
    model.smoothed_vision_tower.manual_seed(0)
    with torch.no_grad():
        torch.save(peft_model(**tiny_inputs(model)).logits, tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "full")  # the base model, booster inside

    other = tmp_path / "other"
    tiny_model("llava").save_pretrained(other)
    (other / "preprocessor_config.json").write_text('{"image_mean": [0.7, 0.7, 0.7], "image_std": [0.2, 0.2, 0.2]}')
    populate_hub_cache(hub_cache, "tiny-org/llava", stock)
    populate_hub_cache(hub_cache, "tiny-org/gsb", tmp_path / "adapter")
    populate_hub_cache(hub_cache, "tiny-org/smoothed-gsb", tmp_path / "full")
    populate_hub_cache(hub_cache, "tiny-org/multi", stock)  # main: other statistics, no subfolder
    _cache_revision(hub_cache, "tiny-org/multi", other, "v1", "1" * 40, subfolder="sub")
    result = subprocess.run([sys.executable, "-c", CONTRACT_CHILD, str(tmp_path / "expected.pt")],
                            env=offline_env(hub_cache), capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
