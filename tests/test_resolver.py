"""Issue 19: one class decision (`models.registry.smoothed_class_for`, `models.loading.load_smoothed`) and one alias
registry (`assets.registry`) behind the CLI, the Auto `smoothing=` path and `SmoothedVisionTower.from_pretrained`."""

import pytest
import torch
import transformers as tf

import hf_feature_smoothing as hfs
from hf_feature_smoothing.assets.registry import BOOSTER_ALIASES, MODEL_ALIASES, resolve_booster_path, resolve_model
from hf_feature_smoothing.cli import load_model, resolve_booster
from hf_feature_smoothing.models.loading import load_smoothed
from hf_feature_smoothing.models.registry import smoothed_class_for
from hf_feature_smoothing.runs import RunError
from hf_feature_smoothing.testing_utils import TINY_FAMILIES, tiny_model


def _bert_dir(tmp_path):
    tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def test_cli_auto_and_tower_paths_resolve_a_checkpoint_to_the_same_class(tmp_path):
    tiny_model("llava").save_pretrained(tmp_path / "stock")
    expected = hfs.SMOOTHED_MODEL_CLASSES["llava"]
    assert smoothed_class_for(tf.AutoConfig.from_pretrained(tmp_path / "stock")) is expected
    cli = load_model(str(tmp_path / "stock"))
    auto = tf.AutoModelForImageTextToText.from_pretrained(tmp_path / "stock", smoothing={})
    tower = hfs.SmoothedVisionTower.from_pretrained(tmp_path / "stock")
    resolved = resolve_model(str(tmp_path / "stock"))
    assert type(cli) is type(auto) is type(tower.encoder) is type(resolved) is expected
    assert not cli.training and not resolved.training


def test_standalone_encoder_resolves_to_a_tower(tmp_path):
    torch.manual_seed(0)
    tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   image_size=28, patch_size=14)).save_pretrained(tmp_path / "dinov2")
    assert smoothed_class_for(tf.AutoConfig.from_pretrained(tmp_path / "dinov2")) is None
    tower = load_smoothed(tmp_path / "dinov2", {"sigma": 0.3})
    assert isinstance(tower, hfs.SmoothedVisionTower) and tower.config.sigma == 0.3
    assert isinstance(load_model(str(tmp_path / "dinov2")), hfs.SmoothedVisionTower)


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    bert = _bert_dir(tmp_path)
    with pytest.raises(ValueError, match=r"`bert`.*llava.*dinov2"):
        load_smoothed(bert)
    with pytest.raises(RunError, match=r"--model .*cannot load it \(ValueError: .*`bert`.*llava"):
        load_model(str(bert))
    # the Auto path and the tower path keep their own messages
    with pytest.raises(ValueError, match="`smoothing=` needs a model type with a smoothed class"):
        tf.AutoModelForImageTextToText.from_pretrained(bert, smoothing={})
    with pytest.raises(ValueError, match="`bert` checkpoint.*supports"):
        hfs.SmoothedVisionTower.from_pretrained(bert)


def test_unknown_alias_names_the_built_in_ones():
    with pytest.raises(ValueError, match=r"tiny-nope.*dinov2-s14.*llava-dinov2-smollm2.*tiny-llava"):
        resolve_model("tiny-nope")
    with pytest.raises(RunError, match=r"--model tiny-nope: cannot load it .*tiny-qwen2_vl"):
        load_model("tiny-nope")


def test_aliases_are_listed_once():
    assert {"dinov2-s14", "llava-dinov2-smollm2"} | {f"tiny-{f}" for f in TINY_FAMILIES} == set(MODEL_ALIASES)
    assert set(BOOSTER_ALIASES) == {"llava-dinov2-smollm2-gsb"}
    shipped = resolve_booster("llava-dinov2-smollm2-gsb")
    assert shipped == resolve_booster_path("llava-dinov2-smollm2-gsb") == str(BOOSTER_ALIASES["llava-dinov2-smollm2-gsb"][1])
    assert resolve_booster("org/gsb") == "org/gsb" and resolve_booster(None) is None


def test_tiny_alias_is_the_stock_model_unless_smoothing_is_given():
    assert type(resolve_model("tiny-llava")) is tf.LlavaForConditionalGeneration
    smoothed = resolve_model("tiny-llava", smoothing_config={"sigma": 0.2})
    assert type(smoothed) is hfs.SmoothedLlavaForConditionalGeneration and smoothed.smoothing_config.sigma == 0.2
