import json
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file

from hf_feature_smoothing.cli import main
from hf_feature_smoothing.runs.records import JsonlRecords


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_certify_folder_writes_rows_and_plot(image_folder, tmp_path, capsys):
    out = tmp_path / "out" / "cert.jsonl"
    assert main(["certify", "--model", "tiny-qwen2_vl", "--images", str(image_folder), "--n", "64",
                 "--output", str(out)]) == 0
    rows = _rows(out)
    assert [r["key"] for r in rows] == [f"img{i}.png" for i in range(4)]
    assert all(r["sigma"] == 0.12 and r["n"] == 64 and r["noise_space"].startswith("pixel") for r in rows)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "S_low" in capsys.readouterr().out


def test_prediction_mode_plots_certified_accuracy(image_folder, tmp_path):
    prototypes = tmp_path / "protos.safetensors"
    save_file({"prototypes": torch.randn(3, 16 * 64)}, prototypes)  # tiny LLaVA: 16 patch tokens × 64
    out = tmp_path / "pred.jsonl"
    main(["certify", "--model", "tiny-llava", "--images", str(image_folder), "--prototypes", str(prototypes),
          "--n", "64", "--n0", "16", "--output", str(out)])
    rows = _rows(out)
    assert len(rows) == 4 and all("radius" in r and "prediction" in r for r in rows)
    assert out.with_suffix(".png").exists()


def test_records_drop_a_cut_off_row_and_keep_the_rest(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a", "v": 1}\n{"key": "b", "v": 2}\n{"key": "c", "v"')
    records = JsonlRecords(path)
    assert records.done == {"a", "b"}
    records.append({"key": "c", "v": 3})
    assert [r["key"] for r in _rows(path)] == ["a", "b", "c"]


def test_killed_run_resumes_without_redoing_or_losing_rows(image_folder, tmp_path):
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "hf_feature_smoothing.cli", "certify", "--model", "tiny-llava", "--images",
           str(image_folder), "--n", "6000", "--chunk-size", "64", "--output", str(out)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or not out.read_text().count("\n")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = out.read_text().splitlines()
    assert 1 <= len(before) < 4, "kill the run after its first row"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = out.read_text().splitlines()
    assert after[: len(before)] == before  # finished rows untouched, not redone
    assert sorted(json.loads(line)["key"] for line in after) == [f"img{i}.png" for i in range(4)]
