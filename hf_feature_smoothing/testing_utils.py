"""Tiny random-weight models built from configs (no download), for tests, benchmarks and the offline demo."""

import torch
import transformers as tf

from .smoothing.towers import ImageInputs


TINY_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IMAGE_TOKEN_ID, VISION_START_ID, VISION_END_ID, VIDEO_TOKEN_ID = 999, 997, 998, 996


def _text_config(family: str) -> dict:
    config = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llava":
        return config
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if family == "qwen3_vl":
        return dict(config, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True))
    return dict(config, rope_parameters=rope)


def tiny_config(family: str, image_size: int = 56) -> tf.PreTrainedConfig:
    """Config of a tiny random MLLM of `family` (`"llava"`, `"qwen2_vl"`, `"qwen2_5_vl"` or `"qwen3_vl"`)."""
    if family == "llava":
        vision = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=image_size, patch_size=14, projection_dim=32)
        return tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**_text_config(family)),
                              image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                              vision_feature_select_strategy="default")
    ids = dict(image_token_id=IMAGE_TOKEN_ID, vision_start_token_id=VISION_START_ID,
               vision_end_token_id=VISION_END_ID, video_token_id=VIDEO_TOKEN_ID)
    common = dict(depth=2, hidden_size=64, num_heads=4, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision = dict(common, embed_dim=64, mlp_ratio=2, patch_size=14)
        return tf.Qwen2VLConfig(text_config=_text_config(family), vision_config=vision, **ids)
    if family == "qwen2_5_vl":
        vision = dict(common, intermediate_size=128, out_hidden_size=64, patch_size=14, window_size=56,
                      fullatt_block_indexes=[1])
        return tf.Qwen2_5_VLConfig(text_config=_text_config(family), vision_config=vision, **ids)
    if family == "qwen3_vl":
        vision = dict(common, intermediate_size=128, out_hidden_size=64, patch_size=16, num_position_embeddings=256,
                      deepstack_visual_indexes=[0, 1])
        return tf.Qwen3VLConfig(text_config=_text_config(family), vision_config=vision, **ids)
    raise ValueError(f"`family` must be one of {TINY_FAMILIES}, got {family!r}.")


def tiny_model(family: str, seed: int = 0, image_size: int = 56) -> tf.PreTrainedModel:
    """A tiny random stock MLLM of `family`, in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family, image_size)
    model_cls = tf.AutoModelForImageTextToText._model_mapping[type(config)]
    return model_cls(config).eval()


def tiny_inputs(model: torch.nn.Module, num_images: int = 1, seed: int = 0, text: tuple[int, ...] = (5, 6, 7)) -> dict:
    """Processor-like inputs for `model` (stock or smoothed): `input_ids`, `attention_mask`, `pixel_values` (and
    `image_grid_thw` for Qwen), images drawn uniformly in [0, 1] pixel space and normalised with the family's
    mean/std. Random images are fine for random weights."""
    from .smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
    from .smoothing.towers import get_tower_family

    generator = torch.Generator().manual_seed(seed)
    config = model.config
    adapter = get_tower_family(model, FeatureSmoothingConfig())
    if hasattr(config, "vision_feature_layer"):  # llava
        size, patch = config.vision_config.image_size, config.vision_config.patch_size
        image = torch.rand(num_images, 3, size, size, generator=generator)
        like = ImageInputs(torch.zeros(num_images, 3, size, size))
        tokens = [IMAGE_TOKEN_ID] * (size // patch) ** 2
        ids = [[1, *tokens, *text] for _ in range(num_images)]
        return dict(input_ids=torch.tensor(ids), attention_mask=torch.ones(len(ids), len(ids[0]), dtype=torch.long),
                    pixel_values=adapter.from_image(image, like))
    vision = config.vision_config
    side = 4  # 4x4 patches per image, 2x2 merged tokens
    channels, temporal, patch = 3, vision.temporal_patch_size, vision.patch_size
    grid = torch.tensor([[1, side, side]] * num_images)
    image = torch.rand(num_images * side * side, channels, patch, patch, generator=generator)
    like = ImageInputs(torch.zeros(num_images * side * side, channels * temporal * patch * patch), grid)
    per_image = [VISION_START_ID, *[IMAGE_TOKEN_ID] * (side * side // 4), VISION_END_ID]
    ids = [[1, *(per_image * num_images), *text]]
    input_ids = torch.tensor(ids)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).long(),
                pixel_values=adapter.from_image(image, like), image_grid_thw=grid)


def tiny_smoothed_model(family: str, weights_seed: int = 0, image_size: int = 56, **smoothing) -> tf.PreTrainedModel:
    """A tiny stock model of `family` (weights from `weights_seed`) wrapped as its smoothed model type; `smoothing`
    are `FeatureSmoothingConfig` fields."""
    from .models import SMOOTHED_MODEL_CLASSES
    from .smoothing.configuration_feature_smoothing import FeatureSmoothingConfig

    stock = tiny_model(family, weights_seed, image_size)
    cls = SMOOTHED_MODEL_CLASSES[family]
    config = cls.config_class(**stock.config.to_dict(), feature_smoothing=FeatureSmoothingConfig(**smoothing).to_dict())
    model = cls(config).eval()
    model.load_state_dict(stock.state_dict())
    return model
