"""Gaussian Smoothness Booster: identity at init, PEFT save/load (local and offline Hub), mismatch errors, training."""

import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch
from peft import PeftConfig, PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainingArguments

import hf_feature_smoothing as hfs
from hf_feature_smoothing.booster import GSBMapper, GSBTrainer, booster_layers, booster_noise_level
from hf_feature_smoothing.testing_utils import TINY_FAMILIES, tiny_config, tiny_inputs, tiny_smoothed_model

from .conftest import offline_env, populate_hub_cache


def _image_inputs(model) -> dict:
    inputs = tiny_inputs(model)
    return {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}


def _smoothed(model, **images) -> torch.Tensor:
    model.smoothed_vision_tower._generators.clear()
    return model.smoothed_vision_tower(**images)[0]


def _randomise(model) -> None:
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "fs_booster_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05


def _trained_booster(tmp_path, family="llava", **config):
    model = tiny_smoothed_model(family, num_samples=3, seed=0)
    peft_model = hfs.add_booster(model, hfs.GSBConfig(sigmas=[0.25], **config))
    _randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    return model, peft_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_untrained_booster_is_identity_and_trained_one_changes_features(family):
    model = tiny_smoothed_model(family, num_samples=3, seed=0)
    images = _image_inputs(model)
    plain = _smoothed(model, **images)
    peft_model = hfs.add_booster(model)
    assert torch.equal(_smoothed(model, **images), plain)
    _randomise(peft_model)
    assert not torch.allclose(_smoothed(model, **images), plain)
    with peft_model.disable_adapter():
        assert torch.equal(_smoothed(model, **images), plain)


def test_mapper_is_identity_at_zero_noise_and_conditioned_on_sigma():
    mapper = GSBMapper(16, 32)
    for param in mapper.parameters():
        torch.nn.init.normal_(param, std=0.1)
    z = torch.randn(3, 5, 16)
    assert torch.equal(mapper(z, 0.0), z)
    assert not torch.allclose(mapper(z, 0.25), z)
    assert not torch.allclose(mapper(z, 0.25), mapper(z, 0.5))


def test_smoothing_conditions_booster_on_its_sigma_and_restores_it():
    model = tiny_smoothed_model("llava", num_samples=3, seed=0)
    hfs.add_booster(model)
    seen = []
    layer = booster_layers(model)[0]
    layer.register_forward_pre_hook(lambda m, args: seen.append(m.noise_level))
    with torch.no_grad():
        model(**tiny_inputs(model))
    assert len(seen) == 2 and set(seen) == {0.25} and layer.noise_level == 0.0  # copy #1, then copies 2..n batched
    with booster_noise_level(model, 0.5):
        assert layer.noise_level == 0.5
    assert layer.noise_level == 0.0


def test_an_interrupted_smoothed_call_leaves_no_booster_conditioned(monkeypatch):
    """An exception between the tower's pre-hook (which conditions the booster on σ) and its last feature site (which
    restores it) must not leave the booster acting on σ: the next call, smoothed or not, starts from the clean state."""
    model = tiny_smoothed_model("llava", num_samples=3, seed=0)
    hfs.add_booster(model)
    layer, tower = booster_layers(model)[0], model.smoothed_vision_tower

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(tower, "monte_carlo", interrupted)
        with pytest.raises(KeyboardInterrupt):
            model(**tiny_inputs(model))
    assert layer.noise_level == 0.25  # left behind by the interruption
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(m.noise_level))
    tower.enabled = False
    with torch.no_grad():
        model(**tiny_inputs(model))
    assert seen == [0.0] and layer.noise_level == 0.0  # the unsmoothed call ran the booster unconditioned
    tower.enabled, seen[:] = True, []
    with torch.no_grad():
        model(**tiny_inputs(model))
    assert set(seen) == {0.25} and layer.noise_level == 0.0


def test_a_seed_edited_in_the_config_gives_the_noise_of_a_tower_made_with_it():
    model = tiny_smoothed_model("llava", num_samples=3, seed=0)
    images = _image_inputs(model)
    with torch.no_grad():
        model.smoothed_vision_tower(**images)  # draws from seed 0's stream
        model.smoothing_config.seed = 1
        edited = model.smoothed_vision_tower(**images)[0]
        fresh = tiny_smoothed_model("llava", num_samples=3, seed=1).smoothed_vision_tower(**images)[0]
    assert torch.equal(edited, fresh)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_adapter_save_load_is_bit_exact(family, tmp_path):
    model, peft_model = _trained_booster(tmp_path, family)
    inputs = tiny_inputs(model)
    model.smoothed_vision_tower._generators.clear()
    with torch.no_grad():
        expected = model(**inputs).logits
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all(".fs_booster_" in k for k in saved)  # only booster weights
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "adapter"), hfs.GSBConfig)

    for load in ("peft", "transformers"):
        fresh = tiny_smoothed_model(family, num_samples=3, seed=0)
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter") if load == "peft" else hfs.load_booster(
            fresh, tmp_path / "adapter")
        fresh.smoothed_vision_tower._generators.clear()
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, expected), load


def test_mismatched_adapter_fails_clearly(tmp_path):
    _trained_booster(tmp_path, "llava")
    other_family = tiny_smoothed_model("qwen2_vl")
    with pytest.raises(ValueError, match="built for `llava` towers but the model is a `qwen2_vl`"):
        PeftModel.from_pretrained(other_family, tmp_path / "adapter")
    config = tiny_config("llava")
    config.vision_config.hidden_size = 96
    config.vision_config.intermediate_size = 128
    wider = hfs.SmoothedLlavaForConditionalGeneration(hfs.SmoothedLlavaConfig(**config.to_dict()))
    with pytest.raises(ValueError, match="`feature_dim`=64 does not match .* 96"):
        hfs.load_booster(wider, tmp_path / "adapter")


CHILD = textwrap.dedent(
    """
    import sys, torch
    from peft import PeftModel
    import hf_feature_smoothing as hfs
    from hf_feature_smoothing.models import SMOOTHED_MODEL_CLASSES
    from hf_feature_smoothing.testing_utils import tiny_inputs

    expected = torch.load(sys.argv[1], weights_only=True)
    smoothing = hfs.FeatureSmoothingConfig(num_samples=3, seed=0, booster="tiny-org/gsb-adapter")
    model = SMOOTHED_MODEL_CLASSES["llava"].from_pretrained("tiny-org/llava", smoothing=smoothing)
    base = SMOOTHED_MODEL_CLASSES["llava"].from_pretrained("tiny-org/llava", smoothing={"num_samples": 3, "seed": 0})
    peft_model = PeftModel.from_pretrained(base, "tiny-org/gsb-adapter")
    with torch.no_grad():
        for m in (model, peft_model):
            m.smoothed_vision_tower._generators.clear()
            assert torch.equal(m(**tiny_inputs(m)).logits, expected)
    print("OK")
    """
)


def test_booster_loads_from_offline_hub_cache(tmp_path, hub_cache):
    model, _ = _trained_booster(tmp_path, purifier=True, mapper_mixing="attention")  # the strongest variant
    model.smoothed_vision_tower._generators.clear()
    with torch.no_grad():
        torch.save(model(**tiny_inputs(model)).logits, tmp_path / "expected.pt")
    stock = tiny_smoothed_model("llava")
    hfs.SmoothedVisionTower  # the stock checkpoint is a plain LLaVA: remove the smoothing config before saving
    stock.smoothed_vision_tower.remove()
    from hf_feature_smoothing.testing_utils import tiny_model

    tiny_model("llava").save_pretrained(tmp_path / "stock")
    populate_hub_cache(hub_cache, "tiny-org/llava", tmp_path / "stock")
    populate_hub_cache(hub_cache, "tiny-org/gsb-adapter", tmp_path / "adapter")
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "expected.pt")], env=offline_env(hub_cache),
                            capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def _dataset(num: int = 8, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    smooth = [np.kron(rng.integers(0, 255, (6, 7, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(num)]
    return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in smooth]})


def _args(tmp_path, steps, **kw) -> TrainingArguments:
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-3,
                             use_cpu=True, report_to=[], seed=0, **kw)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_trainer_trains_only_the_booster_and_raises_the_score(family, tmp_path):
    model = tiny_smoothed_model(family, num_samples=3, seed=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = hfs.add_booster(model, hfs.GSBConfig(sigmas=[0.25]))
    trainer = GSBTrainer(peft_model, _args(tmp_path, 30, logging_steps=1), train_dataset=_dataset(), image_size=56,
                         noise_samples=4, lambda_stats=0.0)
    trainer.train()
    history = [h for h in trainer.state.log_history if "gsb_score" in h]
    assert np.mean([h["gsb_score"] for h in history[-5:]]) > np.mean([h["gsb_score"] for h in history[:5]]) + 0.01
    after = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "fs_booster_" not in k}
    assert after.keys() == frozen.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
    trainer.save_model(str(tmp_path / "out"))
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(".fs_booster_mapper." in k for k in saved) and not (tmp_path / "out" / "training_args.bin").exists()


def test_trainer_refuses_model_without_booster_and_leaked_gradients(tmp_path):
    model = tiny_smoothed_model("llava", num_samples=2)
    with pytest.raises(ValueError, match="has no booster"):
        GSBTrainer(model, _args(tmp_path, 1), train_dataset=_dataset())
    peft_model = hfs.add_booster(model)
    trainer = GSBTrainer(peft_model, _args(tmp_path, 1), train_dataset=_dataset(), image_size=56)
    next(model.model.vision_tower.parameters()).requires_grad_(True)  # a tower weight upstream of the booster leaks in
    with pytest.raises(RuntimeError, match="Only the booster's trainable parts"):
        trainer.train()


def test_trainer_resumes_from_adapter_checkpoint(tmp_path):
    config = {"purifier": {"width": 8, "depth": 3}, "mapper_mixing": "conv"}  # every part of the strongest variant
    peft_model = hfs.add_booster(tiny_smoothed_model("llava", num_samples=2, seed=0), hfs.GSBConfig(**config))
    args = _args(tmp_path, 4, save_strategy="steps", save_steps=2)
    GSBTrainer(peft_model, args, train_dataset=_dataset(), image_size=56).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists()
    resumed = hfs.add_booster(tiny_smoothed_model("llava", num_samples=2, seed=0), hfs.GSBConfig(**config))
    trainer = GSBTrainer(resumed, _args(tmp_path, 4), train_dataset=_dataset(), image_size=56)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    final = load_file(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors")
    weights = {k: v for k, v in resumed.state_dict().items() if "fs_booster_" in k}
    assert len(weights) == len(final)
    for key, value in weights.items():  # same data, crops, σ, noise and optimizer state: the same booster
        torch.testing.assert_close(value, final[key.replace(".default.", ".")])


def test_trainer_on_a_booster_placed_in_place_saves_and_resumes_its_adapter(tmp_path):
    """`inject_booster` (PEFT's `inject_adapter_in_model`, no `PeftModel`): checkpoints are the adapter files, written
    without transformers' adapter integration (which needs an unreleased peft on transformers >= 5.24)."""
    from hf_feature_smoothing.booster import inject_booster

    model = inject_booster(tiny_smoothed_model("llava", num_samples=2, seed=0), hfs.GSBConfig(), "gsb")
    GSBTrainer(model, _args(tmp_path, 2, save_strategy="steps", save_steps=1), train_dataset=_dataset(),
               image_size=56).train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert saved and all(k.startswith("base_model.model.") and ".fs_booster_mapper." in k for k in saved)
    assert PeftConfig.from_pretrained(checkpoint).sigmas == hfs.GSBConfig().sigmas
    fresh = tiny_smoothed_model("llava", num_samples=2, seed=0)
    hfs.load_booster(fresh, checkpoint)  # the checkpoint is a booster `load_booster` reads
    resumed = inject_booster(tiny_smoothed_model("llava", num_samples=2, seed=0), hfs.GSBConfig(), "gsb")
    trainer = GSBTrainer(resumed, _args(tmp_path, 2), train_dataset=_dataset(), image_size=56)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 2
