"""Scale-out: `accelerate launch` with 2 CPU processes gives the rows of a single-process run; shards left by a
stopped run are merged on resume, with any number of processes; `attack` shards the same way."""

import os
import socket
import subprocess
import sys

import pytest
import torch

import hf_feature_smoothing.cli as cli
from hf_feature_smoothing.runs import Shard, read_run
from hf_feature_smoothing.runs.records import without_timing
from hf_feature_smoothing.runs.sharding import existing_shards, shard_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """Reference runs with the thread count of the launched processes (1), so floating-point sums match."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_accelerate_launch_on_2_cpu_processes_equals_a_single_process_run(image_folder, tmp_path, one_thread):
    args = ["certify", "--model", "tiny-llava", "--images", str(image_folder), "--n", "32", "--n0", "8",
            "--seed", "3"]
    sharded = tmp_path / "sharded" / "cert.jsonl"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # accelerate's `--cpu` alone starts one process (several CPU processes need mpirun); `--multi_gpu` starts them
    # with torchrun, and on a machine without visible GPUs `Shard` makes accelerate use CPU + gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
              "-m", "hf_feature_smoothing.cli"]
    result = subprocess.run([*launch, *args, "--output", str(sharded)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli.main([*args, "--output", str(tmp_path / "single.jsonl")]) == 0
    merged, single = read_run(sharded), read_run(tmp_path / "single.jsonl")
    assert merged.header["info"]["processes"] == 2 and merged.header["params"] == single.header["params"]
    assert [r["key"] for r in merged.rows] == [f"img{i}.png" for i in range(4)]  # source order
    assert [without_timing(r) for r in merged.rows] == [without_timing(r) for r in single.rows]
    assert not existing_shards(sharded)  # merged and removed
    assert "rank 1 of 2 writes" in result.stderr


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(Shard, "from_accelerate", classmethod(lambda cls, device=None: Shard(rank, world)))


def test_shards_of_a_stopped_run_are_merged_on_resume_with_another_process_count(image_folder, tmp_path,
                                                                                  monkeypatch):
    """Rank 0 of 2 finishes, rank 1 writes its shard and stops before the final merge; a single process then
    resumes: it merges the shard, certifies nothing twice, and the rows equal an uninterrupted run's."""
    args = ["attack", "--model", "tiny-llava", "--images", str(image_folder), "--epsilon", "0.2", "--steps", "2",
            "--eot", "2", "--eval-samples", "4", "--n", "16", "--alpha", "0.05", "--seed", "5"]
    out = tmp_path / "attack.jsonl"
    _as_rank(monkeypatch, 0, 2)
    assert cli.main([*args, "--output", str(out)]) == 0
    assert sorted({r["image"] for r in read_run(out).rows}) == ["img0.png", "img2.png"]  # rank 0: images 0, 2
    _as_rank(monkeypatch, 1, 2)
    assert cli.main([*args, "--output", str(out)]) == 0  # rank 1 (not main): its shard stays for the merge
    assert existing_shards(out) == [shard_path(out, 1, 2)]
    assert sorted({r["image"] for r in read_run(shard_path(out, 1, 2)).rows}) == ["img1.png", "img3.png"]
    _as_rank(monkeypatch, 0, 1)
    assert cli.main([*args, "--output", str(out)]) == 0
    assert not existing_shards(out)
    monkeypatch.undo()
    assert cli.main([*args, "--output", str(tmp_path / "straight.jsonl")]) == 0
    resumed, straight = read_run(out), read_run(tmp_path / "straight.jsonl")
    assert [r["key"] for r in resumed.rows] == [f"img{i}.png|{v}" for i in range(4) for v in ("plain", "smoothed")]
    assert [without_timing(r) for r in resumed.rows] == [without_timing(r) for r in straight.rows]


def test_a_shard_of_another_run_is_refused(image_folder, tmp_path, monkeypatch, capsys):
    args = ["certify", "--model", "tiny-llava", "--images", str(image_folder), "--n", "8", "--seed", "0"]
    out = tmp_path / "cert.jsonl"
    _as_rank(monkeypatch, 0, 2)
    assert cli.main([*args, "--output", str(out)]) == 0
    _as_rank(monkeypatch, 1, 2)
    assert cli.main([*args, "--output", str(out)]) == 0
    stray = shard_path(out, 1, 2).read_text().replace('"sigma": 0.25', '"sigma": 0.5')
    shard_path(out, 1, 2).write_text(stray)
    _as_rank(monkeypatch, 0, 1)
    assert cli.main([*args, "--output", str(out)]) == 1
    assert f"The shard {shard_path(out, 1, 2)} belongs to another run" in capsys.readouterr().err
