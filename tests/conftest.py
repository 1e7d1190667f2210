import os
import shutil
from pathlib import Path

import pytest
import torch


# the cores shared out among pytest-xdist's workers (`-n auto`: one per core), at most 2 threads each
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
# and as many for the processes a test starts (children inherit the environment): no more threads than cores
os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


def populate_hub_cache(cache_dir: Path, repo_id: str, src_dir: Path, repo_type: str = "model") -> None:
    """Hand-build a Hub cache entry (refs/main → snapshots/<commit>) so `from_pretrained(repo_id)` resolves it with
    `HF_HUB_OFFLINE=1`: the real Hub code path, no network."""
    commit = "0" * 40
    repo = cache_dir / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src_dir, repo / "snapshots" / commit, dirs_exist_ok=True)


@pytest.fixture
def hub_cache(tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    return cache


@pytest.fixture
def image_folder(tmp_path):
    """Four random 40×50 RGB PNGs in a folder."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(40, 50, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def offline_env(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "home")}


def assert_pgd_never_beats_the_certificate(tower, inputs, reference, epsilons, certificate,
                                           protocol_apgd_steps: int = 0) -> None:
    """EOT-PGD at every ε with a non-vacuous FCSB stays at or above it; at least one ε is checked. With
    `protocol_apgd_steps`, the protocol's feature attack too (benchmarks/llava_protocol.py: APGD on the feature at
    the language model's input, EOT over 4 passes × n draws), for that many steps at the largest certified ε."""
    from hf_feature_smoothing.attacks import apgd_feature_attack, pgd_feature_attack

    certified = [(epsilon, bound) for epsilon, bound in zip(epsilons, certificate.fcsb) if bound is not None]
    assert certified, certificate
    for epsilon, bound in certified:
        attack = pgd_feature_attack(tower, inputs, reference, epsilon, steps=4, eot_samples=4, eval_samples=48,
                                    generator=torch.Generator().manual_seed(0))
        assert attack.cosine >= bound, (epsilon, attack.cosine, bound)
    if protocol_apgd_steps:
        epsilon, bound = certified[-1]
        strong = apgd_feature_attack(tower, inputs, reference, epsilon, steps=protocol_apgd_steps,
                                     eot_samples=4 * tower.config.num_samples, eval_samples=48,
                                     generator=torch.Generator().manual_seed(0))
        assert strong.cosine >= bound, ("protocol APGD", epsilon, strong.cosine, bound)
