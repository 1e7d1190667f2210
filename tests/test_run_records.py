"""Run files: header, strict JSON, torn last line, corrupt lines (reported with file and line, `--repair`), locks."""

import json
import signal
import subprocess
import sys
import time

import pytest

from hf_feature_smoothing.cli import main
from hf_feature_smoothing.runs import Run, RunError, load_run, read_run
from hf_feature_smoothing.runs.locking import RunLock
from hf_feature_smoothing.runs.records import RowWriter, encode_lines, make_header


PARAMS = {"model": "m", "sigma": 0.25, "seed": 3}


def _file(path, rows, tail=b""):
    header = make_header("certify", PARAMS)
    rows = [{"status": "ok", "run": header["run"], **r} for r in rows]
    path.write_bytes(encode_lines(header, rows) + tail)
    return header


def test_a_torn_last_line_is_dropped_and_logged(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    _file(path, [{"key": "a"}, {"key": "b"}], tail=b'{"key": "c", "stat')
    contents = load_run(path)
    assert [r["key"] for r in contents.rows] == ["a", "b"]
    assert "torn last line" in caplog.text
    assert path.read_bytes().endswith(b"\n") and len(read_run(path).rows) == 2  # rewritten without it


@pytest.mark.parametrize("garbage, reason", [
    (b"not json at all", "line 3: not valid JSON"),
    (b"\x89PNG\r\n\x1a\x00\x00binary", "line 3: not UTF-8 text"),
    (b'{"key": "x", "status": "ok", "run": "0123456789ab"}', "line 3: row 'x' belongs to run '0123456789ab'"),
    (b'{"key": "a", "status": "ok", "run": "RUN"}', "line 3: duplicate row for 'a' (first at line 2)"),
    (b'{"key": "y", "status": "ok", "run": "RUN", "score": NaN}', "line 3: not valid JSON (non-standard JSON constant"),
    (b"[1, 2]", "line 3: not a row"),
])
def test_a_corrupt_line_anywhere_is_reported_with_file_and_line(tmp_path, garbage, reason):
    path = tmp_path / "r.jsonl"
    header = _file(path, [{"key": "a"}, {"key": "b"}])
    lines = path.read_bytes().split(b"\n")
    lines.insert(2, garbage.replace(b"RUN", header["run"].encode()))  # between the two rows
    path.write_bytes(b"\n".join(lines))
    original = path.read_bytes()
    with pytest.raises(RunError, match="--repair") as error:
        load_run(path)
    assert str(path) in str(error.value) and reason in str(error.value)
    assert path.read_bytes() == original  # refused: nothing touched
    contents = load_run(path, repair=True)
    assert [r["key"] for r in contents.rows] == ["a", "b"]  # every valid row kept
    assert (tmp_path / "r.jsonl.corrupt").read_bytes() == lines[2] + b"\n"  # the bad line, byte for byte
    assert [r["key"] for r in read_run(path).rows] == ["a", "b"] and not read_run(path).bad


def test_cli_repair_moves_bad_lines_and_finishes_the_run(image_folder, tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    args = ["certify", "--model", "tiny-llava", "--n", "16", "--n0", "4", "--seed", "0", "--images",
            str(image_folder), "--output", str(out)]
    assert main(args) == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], lines[1], "garbage {", lines[3], lines[4]]) + "\n")  # row 2 lost to garbage
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{out} has 1 line(s) that are not valid rows: line 3: not valid JSON" in err
    assert main([*args, "--repair"]) == 0
    assert (tmp_path / "run.jsonl.corrupt").read_text() == "garbage {\n"
    rows = read_run(out).rows
    assert sorted(r["key"] for r in rows) == [f"img{i}.png" for i in range(4)]  # img1 redone, nothing else
    assert json.loads(out.read_text().splitlines()[1]) == json.loads(lines[1])


def test_a_file_without_a_run_header_is_refused(image_folder, tmp_path, capsys):
    out = tmp_path / "old.jsonl"
    out.write_text('{"key": "img0.png", "score": 0.9}\n')  # written by an older hf-fs: parameters unknown
    assert main(["certify", "--model", "tiny-llava", "--n", "8", "--images", str(image_folder), "--output",
                 str(out)]) == 1
    assert f"{out} line 1: not an hf-fs run header" in capsys.readouterr().err
    assert main(["certify", "--model", "tiny-llava", "--n", "8", "--images", str(image_folder), "--output",
                 str(out), "--overwrite"]) == 0  # as the message says: a new run, the old file kept aside
    assert (tmp_path / "old.jsonl.bak").read_text() == '{"key": "img0.png", "score": 0.9}\n'
    assert len(read_run(out).rows) == 4


def test_rows_are_strict_json_or_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    header = _file(path, [])
    writer = RowWriter(path, header)
    with pytest.raises(RunError, match="NaN or inf"):
        writer.append({"key": "a", "status": "ok", "run": header["run"], "score": float("nan")})
    writer.close()
    assert read_run(path).rows == []


def test_a_second_writer_fails_fast_naming_the_file_and_the_holder(image_folder, tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    args = ["certify", "--model", "tiny-llava", "--n", "5000", "--images", str(image_folder), "--seed", "0",
            "--output", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "hf_feature_smoothing.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not out.exists():
            time.sleep(0.02)
        start = time.time()
        assert main(args) == 1
        assert time.time() - start < 10  # fails fast, without loading the model or waiting
        err = capsys.readouterr().err
        assert f"{out} is being written by another run (lock {out}.lock is held by: pid {first.pid}" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    keys = [r["key"] for r in read_run(out).rows]
    assert len(keys) == len(set(keys))  # the second writer added nothing


def test_locks_are_exclusive_within_a_process_too_and_released(tmp_path):
    path = tmp_path / "r.jsonl"
    with RunLock(path):
        with pytest.raises(RunError, match="is being written by another run"):
            RunLock(path).acquire()
    RunLock(path).acquire().release()  # free again


def test_a_symlinked_output_is_written_through_and_keeps_its_lock(tmp_path):
    """A rewrite (here: dropping a torn last line) goes to the file the link names, the link stays a link, and a
    second writer by either name is refused while the first holds the run."""
    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    _file(real, [{"key": "a"}], tail=b'{"key": "b", "sta')
    link.symlink_to(real)
    with Run(link, "certify") as run:
        run.lock().open(dict(PARAMS))
        assert link.is_symlink() and real.read_bytes().endswith(b"\n") and run.done == {"a"}
        for name in (link, real):
            with Run(name, "certify") as second, pytest.raises(RunError, match="is being written by another run"):
                second.lock()
        run.append({"key": "b", "index": 1, "status": "ok"})
        run.finish()
    assert [r["key"] for r in read_run(real).rows] == ["a", "b"] and link.is_symlink()


def test_overwrite_never_replaces_an_earlier_backup(tmp_path):
    out = tmp_path / "r.jsonl"
    for sigma in (0.1, 0.2, 0.3):
        with Run(out, "certify", overwrite=True) as run:
            run.lock().open({"sigma": sigma, "seed": 1})
            run.finish()
    sigmas = [read_run(p).header["params"]["sigma"] for p in (out, tmp_path / "r.jsonl.bak.1", tmp_path / "r.jsonl.bak")]
    assert sigmas == [0.3, 0.2, 0.1]


def test_run_resolves_the_seed_once_and_refuses_other_commands(tmp_path):
    out = tmp_path / "r.jsonl"
    with Run(out, "certify") as run:
        run.lock().open({"sigma": 0.1, "seed": None}, resolve={"seed": lambda: 1234})
        run.append({"key": "a", "index": 0, "status": "ok"})
        run.finish()
    with Run(out, "certify") as run:
        run.lock().open({"sigma": 0.1, "seed": None}, resolve={"seed": lambda: 999})
        assert run.params["seed"] == 1234 and run.done == {"a"}
        run.finish()
    with Run(out, "attack") as run, pytest.raises(RunError, match="holds a `certify` run, not `attack`"):
        run.lock().open({"sigma": 0.1, "seed": 1234})
