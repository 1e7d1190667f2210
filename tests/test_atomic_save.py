"""`save_pretrained` over a good checkpoint, killed with SIGKILL at every step of the save: the folder always loads
and is wholly the previous checkpoint or wholly the new one (config, weights and card agree); the next save leaves
no temporary folder behind."""

import json
import os
import random
import signal
import threading
import time

import pytest
import torch
import tqdm.auto
import tqdm.std
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import hf_feature_smoothing.utils.atomic as atomic
from hf_feature_smoothing.testing_utils import tiny_smoothed_model


def _set_version(model, version: int) -> None:
    """Version k: σ = k / 10 in the config (and card), and k in one weight."""
    model.smoothing_config.sigma = version / 10
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float(version)


def _version(folder) -> int:
    """The version of the checkpoint in `folder`; config, weights, card and the loaded model must all agree."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder)  # first: it rolls back a rename-interrupted swap
    config = round(json.loads((folder / "config.json").read_text())["feature_smoothing"]["sigma"] * 10)
    weights = int(load_file(folder / "model.safetensors")["language_model.lm_head.weight"][0, 0])
    card = ModelCard.load(folder / "README.md").text
    assert f"| {config / 10} |" in card, "the card belongs to another save"
    assert round(model.smoothing_config.sigma * 10) == config == weights == int(model.lm_head.weight[0, 0])
    return config


def _in_child(action, timeout: float = 120.0) -> bool:
    """Run `action` in a forked child; True if the child died of SIGKILL."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            action()
        finally:
            os._exit(0)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the saving child hung")
        time.sleep(0.01)


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_call(module, name: str, call: int = 1, after: bool = False):
    """Patch `module.name` so that its `call`-th call kills the process (before or after doing its work)."""
    original, calls = getattr(module, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call and not after:
            _die()
        result = original(*args, **kwargs)
        if calls[0] == call and after:
            _die()
        return result

    setattr(module, name, patched)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.") and
                  not p.name.endswith(".lock"))


KILL_POINTS = {
    "while writing the weights": lambda: _kill_on_call(__import__("transformers").modeling_utils, "safe_save_file"),
    "before the card": lambda: _kill_on_call(ModelCard, "save"),
    "before the swap": lambda: _kill_on_call(atomic, "_swap_in"),
    "after the swap": lambda: _kill_on_call(atomic, "_exchange", after=True),
    "while deleting the old folder": lambda: _kill_on_call(atomic.shutil, "rmtree"),
    "between the two renames (no renameat2)": lambda: (
        setattr(atomic, "_exchange", lambda a, b: False), _kill_on_call(atomic.os, "rename", call=1, after=True)),
}


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_smoothed_model("llava", num_samples=2, seed=0)
    folder = tmp_path / "ckpt"
    _set_version(model, 1)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5]}')  # not the save's own file
    return model, folder


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_at_every_step_leaves_old_or_new(point, checkpoint):
    model, folder = checkpoint

    def save_version_2():
        KILL_POINTS[point]()
        _set_version(model, 2)
        model.save_pretrained(folder)

    assert _in_child(save_version_2), f"the child was not killed {point}"
    version = _version(folder)  # loads (a rename-interrupted swap is rolled back by the loader)
    assert version in (1, 2)
    if point in ("after the swap", "while deleting the old folder"):
        assert version == 2
    elif point != "between the two renames (no renameat2)":
        assert version == 1
    assert (folder / "preprocessor_config.json").exists()

    _set_version(model, 3)  # the restarted save cleans up and completes
    model.save_pretrained(folder)
    assert _version(folder) == 3 and _leftovers(folder) == []
    assert (folder / "preprocessor_config.json").read_text() == '{"image_mean": [0.5, 0.5, 0.5]}'


def test_kill_at_random_times_during_repeated_saves(checkpoint, monkeypatch):
    model, folder = checkpoint
    rng = random.Random(0)
    # tqdm's default lock holds a multiprocessing semaphore shared with forked children: a child killed while it
    # holds it would block this process's next progress bar forever. A thread lock is the child's own copy.
    for bar in {tqdm.std.tqdm, tqdm.auto.tqdm}:
        monkeypatch.setattr(bar, "_lock", threading.RLock(), raising=False)
    for round_ in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            try:
                for version in range(2, 1000):
                    _set_version(model, 2 + version % 2)
                    model.save_pretrained(folder)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.3, 1.5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert _version(folder) in (1, 2, 3), round_
    _set_version(model, 4)
    model.save_pretrained(folder)
    assert _version(folder) == 4 and _leftovers(folder) == []


def test_a_failing_save_leaves_the_checkpoint_untouched(checkpoint, monkeypatch):
    model, folder = checkpoint
    monkeypatch.setattr(ModelCard, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    _set_version(model, 2)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder)
    assert _version(folder) == 1 and _leftovers(folder) == []


def test_one_atomic_file_write_and_lock_convention(tmp_path):
    from hf_feature_smoothing.utils.atomic import folder_lock, write_atomically
    from hf_feature_smoothing.utils.locking import lock_path

    target = tmp_path / "out.jsonl"
    write_atomically(target, b"old\n")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"old\n"
    assert write_atomically(target, "new ü\n") == target and target.read_text(encoding="utf-8") == "new ü\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary file left
    assert lock_path(target) == tmp_path / "out.jsonl.lock"  # run files: the user-visible lock
    assert lock_path(tmp_path / "ckpt", hidden=True) == tmp_path / ".ckpt.lock"  # folders: hidden beside them
    assert folder_lock(tmp_path / "ckpt").lock_file == str(tmp_path / ".ckpt.lock")
