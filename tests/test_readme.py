"""The README's Python snippets run as written: offline, each in a fresh namespace, against a hand-built Hub cache
whose `llava-hf/llava-1.5-7b-hf` is a tiny random LLaVA with a real (transformers 5) processor."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_feature_smoothing.testing_utils import tiny_model

from .conftest import offline_env, populate_hub_cache


README = Path(__file__).parent.parent / "README.md"
RUNNER = textwrap.dedent(
    """
    import sys, time
    for index, path in enumerate(sys.argv[1:]):
        code, start = open(path).read(), time.perf_counter()
        exec(compile(code, f"README snippet {index}", "exec"), {"__name__": "__main__"})
        print(f"snippet {index} OK in {time.perf_counter() - start:.1f}s", flush=True)
    """
)


def readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow  # ≈ 25 s: a training run and three certifications on a tiny model
def test_readme_snippets_run_offline(tmp_path, hub_cache):
    from tokenizers import Tokenizer, models
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    snippets = readme_snippets()
    assert len(snippets) >= 3 and any("GSBTrainer" in s for s in snippets) and any("certificates=" in s for s in snippets)
    stock = tmp_path / "stock"
    tiny_model("llava").save_pretrained(stock)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1},
                                                                                    unk_token="<unk>")))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14).save_pretrained(stock)
    populate_hub_cache(hub_cache, "llava-hf/llava-1.5-7b-hf", stock)
    files = []
    for index, code in enumerate(snippets):
        files.append(tmp_path / f"snippet{index}.py")
        files[-1].write_text(code)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, "-c", RUNNER, *map(str, files)], env=offline_env(hub_cache), cwd=work,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count(" OK in ") == len(snippets), result.stdout
    assert (work / "certified-llava" / "README.md").exists() and (work / "smoothed-llava-gsb" / "config.json").exists()
