"""`from_pretrained` through the real Hub code path: a hand-built cache and `HF_HUB_OFFLINE=1` in a fresh process."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hf_feature_smoothing.testing_utils import TINY_FAMILIES, tiny_model

from .conftest import offline_env, populate_hub_cache


CHILD = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file
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
    if sys.argv[3] == "reload":
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

    _child(hub_cache, family, tmp_path / "smoothed", "save")
    saved = load_file(tmp_path / "smoothed" / "model.safetensors")
    stock_saved = load_file(tmp_path / "stock" / "model.safetensors")
    assert saved.keys() == stock_saved.keys()  # same Hub key layout as the stock checkpoint
    assert all(torch.equal(saved[k], stock_saved[k]) for k in saved)
    assert '"model_type": "smoothed_' in (tmp_path / "smoothed" / "config.json").read_text()

    populate_hub_cache(hub_cache, f"tiny-org/smoothed-{family}", tmp_path / "smoothed")
    _child(hub_cache, family, tmp_path / "smoothed2", "reload")
