"""Fuzz-style properties of `hf-fs`, one family of inputs per kind of issue: for every bad input, (1) exit status 2
and one error line naming the option, never a traceback; (2) nothing written (no run file, header, lock, folder or
output); (3) state unchanged, so the corrected command then works without `--overwrite`. And no silent result:
unfinished runs are reported as such, sequential runs are labelled, options that do not apply are refused; locks
hold on the file whatever its name; file names that are not UTF-8 do not stop a run."""

import json
import os
import random

import pytest
import torch
import yaml
from safetensors.torch import save_file

from hf_feature_smoothing.cli import main
from hf_feature_smoothing.runs import Run, RunError, read_run
from hf_feature_smoothing.runs.locking import RunLock


TINY = ["--model", "tiny-llava", "--n", "8", "--n0", "4", "--seed", "0"]
WIDTH = 16 * 64  # tiny LLaVA: 16 patch tokens × 64 channels


def _run(argv, capsys) -> tuple[int, str, str]:
    """`hf-fs argv` in process → (exit status, stdout, stderr); argparse's SystemExit is an exit status too."""
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _assert_refused(status, err, *needles):
    assert status == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"


def _certify(folder, out, *extra):
    return ["certify", *TINY, "--images", str(folder), "--output", str(out), *extra]


# ----- 1. every input validated before any file, header or lock ------------------------------------------------
def _prototypes(tmp_path, rows, width):
    path = tmp_path / f"p{rows}x{width}.safetensors"
    save_file({"prototypes": torch.randn(rows, width)}, path)
    return str(path)


def _adapter(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    return str(folder)


BAD_CERTIFY = {  # name -> (extra args given tmp_path, needles of the one error line)
    "target cosine 0 (the API's (0, 1))": (lambda t: ["--target-cosine", "0"], ["--target-cosine", "(0, 1)"]),
    "target cosine 1": (lambda t: ["--target-cosine", "1"], ["--target-cosine", "(0, 1)"]),
    "target radius beyond reach": (lambda t: ["--sigma", "0.01", "--target-radius", "5"],
                                   ["--target-radius 5", "unreachable"]),
    "target with a fixed-n bound": (lambda t: ["--target-cosine", "0.5", "--bound", "hoeffding"],
                                    ["--bound hoeffding", "betting"]),
    "prototypes of the wrong width": (lambda t: ["--prototypes", _prototypes(t, 3, 100)],
                                      ["--prototypes", "100 features per class", f"gives {WIDTH}"]),
    "prototypes of one class": (lambda t: ["--prototypes", _prototypes(t, 1, WIDTH)], ["--prototypes", "K ≥ 2"]),
    "target with prototypes": (lambda t: ["--prototypes", _prototypes(t, 3, WIDTH), "--target-cosine", "0.5"],
                               ["--target-cosine 0.5", "--prototypes"]),
    "epsilon with prototypes": (lambda t: ["--prototypes", _prototypes(t, 3, WIDTH), "--epsilon", "0.1"],
                                ["--epsilon 0.1", "--prototypes", "drop"]),
    "reference with prototypes": (lambda t: ["--prototypes", _prototypes(t, 3, WIDTH), "--reference", "clean"],
                                  ["--reference clean", "--prototypes"]),
    "vote without prototypes": (lambda t: ["--method", "vote"], ["--method vote", "--prototypes"]),
    "selection samples with the clean reference": (lambda t: ["--reference", "clean"],
                                                   ["--n0 4", "--reference clean", "no selection samples"]),
    "sigma beyond the noise rule": (lambda t: ["--sigma", "5000"], ["--sigma", "5000", "(0, 1000]"]),
    "vote with a fixed-n bound": (lambda t: ["--prototypes", _prototypes(t, 3, WIDTH), "--method", "vote", "--bound",
                                             "hoeffding"], ["--bound hoeffding", "--method vote", "betting"]),
    "vote target beyond reach": (lambda t: ["--prototypes", _prototypes(t, 3, WIDTH), "--method", "vote", "--sigma",
                                            "0.01", "--target-radius", "5"], ["--target-radius 5", "out of reach"]),
    "--split with --images": (lambda t: ["--split", "test"], ["--split test", "--dataset", "drop it"]),
    "missing relative model folder": (lambda t: ["--model", "./nope"], ["--model ./nope", "does not exist"]),
    "missing absolute model folder": (lambda t: ["--model", str(t / "nope")], ["--model", "does not exist"]),
    "adapter as --model": (lambda t: ["--model", _adapter(t)], ["--model", "booster adapter", "--booster"]),
    "missing image folder": (lambda t: ["--images", str(t / "nowhere")], ["--images", "not a folder"]),
    "output not .jsonl": (lambda t: ["--output", str(t / "out" / "run.json")], ["--output", ".jsonl"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CERTIFY))
def test_bad_certify_input_writes_nothing_and_the_corrected_command_runs(case, image_folder, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)  # `./nope` is relative to here
    extra, needles = BAD_CERTIFY[case]
    out = tmp_path / "out" / "run.jsonl"
    status, _, err = _run([*_certify(image_folder, out, "--limit", "1"), *extra(tmp_path)], capsys)
    _assert_refused(status, err, *needles)
    assert not (tmp_path / "out").exists()  # no run file, header, lock or folder
    status, _, err = _run(_certify(image_folder, out, "--limit", "1"), capsys)  # no --overwrite needed
    assert status == 0, err
    assert len(read_run(out).rows) == 1


BAD_CERTIFY_ANSWER = {  # name -> (args, needles of the one error line); each is refused before anything is written
    "one candidate": (["--candidates", "yes"], ["--candidates yes", "at least two"]),
    "answers as text without a question": (["--candidates", "yes", "no"], ["--question", "required"]),
    "labels beyond the candidates": (["--candidates", "yes", "no", "--question", "Q?", "--limit", "5"],
                                     ["--candidates yes no", "2 answers", "label"]),
    "textile images with the digit answers": (["--images", "textiles:test"],
                                              ["--candidates digits", "10 answers", "3 classes",
                                               "--candidates textiles"]),
    "a stand-alone encoder": (["--model", "dinov2-s14", "--images", "skimage"], ["--model dinov2-s14", "LLaVA"]),
    "a target out of reach": (["--model", "tiny-llava", "--images", "skimage", "--sigma", "0.01", "--target-radius",
                               "5"], ["--target-radius 5", "out of reach"]),
    "--futility without a target": (["--futility"], ["--futility", "give --target-radius"]),
    "a model without a processor": (["--model", "tiny-llava", "--images", "skimage"],
                                    ["--model tiny-llava", "no processor"]),
    "--image-size (the processor's)": (["--image-size", "64"], ["--image-size"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CERTIFY_ANSWER))
def test_bad_certify_answer_input_writes_nothing(case, tmp_path, capsys):
    args, needles = BAD_CERTIFY_ANSWER[case]
    out = tmp_path / "out" / "answers.jsonl"
    status, _, err = _run(["certify-answer", "--images", "digits:test", "--limit", "1", "--n", "4", "--n0", "2",
                           *args, "--output", str(out)], capsys)
    if case.startswith("--image-size"):  # not an option of this command: argparse's own one-line error
        assert status == 2 and "unrecognized arguments: --image-size" in err and "Traceback" not in err
    else:
        _assert_refused(status, err, *needles)
    assert not (tmp_path / "out").exists()


NUMERIC_OPTIONS = ["--sigma", "--n", "--n0", "--alpha", "--epsilon", "--tau", "--target-cosine", "--target-radius",
                   "--seed", "--chunk-size", "--limit", "--image-size", "--max-image-pixels"]
JUNK = ["nan", "inf", "-inf", "-1", "0x10", "", " ", "1e999", "abc", "1,5", "--", "2**64", "1.5.2", "-0.0e0", "∞"]


def test_random_junk_in_numeric_options_is_one_clean_error(tmp_path, capsys):
    """Property over random junk: whatever the option and value, a refusal is exit 2, one line naming the option, no
    traceback, nothing written (values argparse accepts, like `-0.0e0` for --epsilon, are not junk: skipped)."""
    generator = random.Random(0)
    out = tmp_path / "out" / "run.jsonl"
    refused = 0
    for _ in range(40):
        option, value = generator.choice(NUMERIC_OPTIONS), generator.choice(JUNK)
        try:
            main(["certify", *TINY, "--output", str(out), option, value, "--images", str(tmp_path / "none")])
        except SystemExit as exit_info:
            err = capsys.readouterr().err
            assert exit_info.code == 2 and "Traceback" not in err and option in err, (option, value, err)
            refused += 1
        else:  # the value parsed: the missing --images folder is the one error, still before anything is written
            err = capsys.readouterr().err
            assert "Traceback" not in err and "--images" in err, (option, value, err)
        assert not (tmp_path / "out").exists(), (option, value)
    assert refused > 20


# ----- `hf-fs prototypes`: labels, classes, splits, output folder -----------------------------------------------
def _dataset(tmp_path, name, labels, features=None):
    import datasets
    import numpy as np
    from PIL import Image

    images = [Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)) for i in range(len(labels))]
    data = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    data = data.cast_column("image", datasets.Image())
    data.save_to_disk(tmp_path / name)
    return str(tmp_path / name)


def _empty_dataset(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": [], "label": []}, features=features).save_to_disk(tmp_path / "empty")
    return str(tmp_path / "empty")


def _below_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    return tmp_path / "file"


BAD_PROTOTYPES = {  # name -> (source args given tmp_path, output given tmp_path, needles)
    "a class with no image": (lambda t: ["--dataset", _dataset(t, "gap", [0, 2, 0])], None,
                              ["--label-column label", "classes [1]", "no image"]),
    "negative labels": (lambda t: ["--dataset", _dataset(t, "neg", [0, -1, 1])], None, ["label -1", "class indices"]),
    "string labels": (lambda t: ["--dataset", _dataset(t, "str", ["cat", "dog", "cat"])], None,
                      ["label 'cat'", "class_encode_column"]),
    "float labels": (lambda t: ["--dataset", _dataset(t, "float", [0.0, 1.5, 1.0])], None, ["label 0.0", "float"]),
    "an empty split": (lambda t: ["--dataset", _empty_dataset(t)], None, ["--dataset", "empty"]),
    "a single class": (lambda t: ["--dataset", _dataset(t, "one", [0, 0, 0])], None, ["single class"]),
    "an output folder below a file": (lambda t: ["--dataset", _dataset(t, "good", [0, 1, 0])],
                                      lambda t: _below_a_file(t) / "sub" / "p.safetensors",
                                      ["--output", "is a file", "cannot be made"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PROTOTYPES))
def test_bad_prototypes_input_writes_nothing(case, tmp_path, capsys):
    source, output, needles = BAD_PROTOTYPES[case]
    (tmp_path / "out").mkdir()
    out = output(tmp_path) if output else tmp_path / "out" / "p.safetensors"
    status, _, err = _run(["prototypes", "--model", "tiny-llava", *source(tmp_path), "--output", str(out)], capsys)
    _assert_refused(status, err, *needles)
    assert not any((tmp_path / "out").iterdir()) and not out.exists()
    assert out.parent == tmp_path / "out" or not out.parent.exists()  # no folder created either


def test_prototypes_of_a_good_set_into_a_new_folder(tmp_path, capsys):
    """A missing output folder is created (as `certify` does, and as the default `outputs/` needs), once every check
    has passed."""
    out = tmp_path / "new" / "folder" / "p.safetensors"
    status, _, err = _run(["prototypes", "--model", "tiny-llava", "--dataset", _dataset(tmp_path, "ok", [0, 1, 1]),
                           "--output", str(out)], capsys)
    assert status == 0 and out.exists(), err


def test_certify_output_below_a_file_is_refused(image_folder, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    status, _, err = _run(_certify(image_folder, tmp_path / "file" / "run.jsonl"), capsys)
    _assert_refused(status, err, "--output", "is a file")


# ----- 2. no silent result: unfinished runs, sequential runs -----------------------------------------------------
@pytest.fixture
def finished_run(image_folder, tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    status, _, err = _run(_certify(image_folder, out), capsys)
    assert status == 0, err
    return out


def _report(out, capsys) -> tuple[str, str, dict | None]:
    report = out.parent / "report"
    status, printed, err = _run(["report", str(out), "--output-dir", str(report)], capsys)
    assert status == 0 and "Traceback" not in err, err
    index = report / "model-index.yaml"
    return printed, (report / "summary.md").read_text(), yaml.safe_load(index.read_text()) if index.exists() else None


def _stopped(out):
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-2]))  # two images left to do


def _torn(out):
    out.write_bytes(out.read_bytes()[:-25])  # the last row cut off mid-line


@pytest.mark.parametrize("state, damage", [("stopped", _stopped), ("torn", _torn), ("running", None)])
def test_report_of_an_unfinished_run_says_so_and_gives_no_card_metrics(finished_run, capsys, state, damage):
    printed, summary, index = _report(finished_run, capsys)
    assert "finished, 4/4 rows" in printed and "finished, 4/4 rows" in summary and index is not None
    if damage is not None:
        damage(finished_run)
        lock = None
    else:
        lock = RunLock(finished_run).acquire()  # a live writer
    try:
        printed, summary, index = _report(finished_run, capsys)
    finally:
        if lock is not None:
            lock.release()
    done = {"stopped": 2, "torn": 3, "running": 4}[state]
    for text in (printed, summary):
        assert f"{state}, {done}/4 rows" in text and "UNFINISHED" in text, text
        assert "finished, " not in text
    assert index is None  # no card-ready metrics, and the earlier report's are removed


def test_sequential_runs_are_labelled_in_summary_table_card_and_model_index(image_folder, tmp_path, capsys):
    out = tmp_path / "seq.jsonl"
    status, printed, err = _run(_certify(image_folder, out, "--epsilon", "0", "--target-cosine", "0.5",
                                         "--sigma", "0.5", "--n", "32"), capsys)  # 8 cannot reach S ≥ 0.75
    assert status == 0, err
    rows = read_run(out).rows
    assert "sequential, target FCSB ≥ 0.5, n ≤ 32" in printed and "n used" in printed
    for row in rows:  # the n each row actually used is printed, not the most allowed
        line = next(line for line in printed.splitlines() if line.startswith(row["key"]))
        assert f" {row['n_used']} " in line and row["stop"] in line
    printed, summary, index = _report(out, capsys)
    assert "sequential, target FCSB ≥ 0.5, n ≤ 32" in summary and "mean n used" in summary
    results = index["model-index"][0]["results"]
    for result in results:
        metric = result["metrics"][0]
        assert "sequential, target FCSB ≥ 0.5, n ≤ 32" in metric["name"]
        assert metric["args"]["sequential"] is True and metric["args"]["target_cosine"] == 0.5
    from hf_feature_smoothing.hub.sharing import _results_table, certificate_eval_results

    assert "≤ 32 (sequential)" in _results_table(certificate_eval_results(rows, "images"))


# ----- 4. locks hold on the file, not the name --------------------------------------------------------------------
def _names(tmp_path, out, how):
    if how == "symlink":
        link = tmp_path / "link.jsonl"
        link.symlink_to(out)
        return str(link)
    if how == "relative":
        os.chdir(out.parent / "sub")
        return os.path.join("..", out.name)
    link = tmp_path / "hard.jsonl"
    os.link(out, link)
    return str(link)


@pytest.mark.parametrize("how", ["symlink", "relative", "hardlink"])
def test_a_second_writer_by_another_name_is_refused(finished_run, tmp_path, capsys, monkeypatch, how,
                                                    image_folder):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    _stopped(finished_run)  # work left to do, so a second writer would add rows
    before = finished_run.read_bytes()
    with Run(finished_run, "certify") as first:
        first.lock()
        other = _names(tmp_path, finished_run, how)
        status, _, err = _run(_certify(image_folder, other), capsys)
        assert status == 1 and "is being written by another run" in err and "Traceback" not in err, err
    assert finished_run.read_bytes() == before  # nothing added by the second writer
    status, _, err = _run(_certify(image_folder, other), capsys)  # the lock is free again: resumes, no duplicates
    assert status == 0, err
    keys = [row["key"] for row in read_run(finished_run).rows]
    assert sorted(keys) == [f"img{i}.png" for i in range(4)]


def test_lock_identity_survives_a_hard_link_made_after_the_run_started(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("")
    with RunLock(path):
        os.link(path, tmp_path / "h.jsonl")
        with pytest.raises(RunError, match="is being written by another run"):
            RunLock(tmp_path / "h.jsonl").acquire()


def test_lock_identity_follows_an_atomic_rewrite(tmp_path):
    """A resumed run rewrites its file atomically (a new inode): the identity lock moves to it, so a hard link made
    after the rewrite is guarded; `is_held` sees the writer by either name."""
    path = tmp_path / "r.jsonl"
    with Run(path, "certify").lock() as run:
        run.open({"a": 1})
        run.append({"key": "x", "status": "ok"})
        run.finish()
    with Run(path, "certify").lock() as run:
        run.open({"a": 1})
        run._rewrite(path.read_bytes())  # what a merge or repair does: the same rows, a new inode
        os.link(path, tmp_path / "h.jsonl")
        with pytest.raises(RunError, match="is being written by another run"):
            RunLock(tmp_path / "h.jsonl").acquire()
        assert RunLock(tmp_path / "h.jsonl").is_held() and RunLock(path).is_held()
    assert not RunLock(tmp_path / "h.jsonl").is_held()


# ----- file names that are not UTF-8 ------------------------------------------------------------------------------
@pytest.mark.skipif(os.name == "nt" or os.uname().sysname == "Darwin", reason="needs a filesystem of raw bytes")
def test_a_file_name_that_is_not_utf8_is_kept_with_an_escaped_key(image_folder, tmp_path, capsys, caplog):
    os.rename(image_folder / "img1.png", os.path.join(os.fsencode(image_folder), b"caf\xe9.png"))
    out = tmp_path / "run.jsonl"
    status, printed, err = _run(_certify(image_folder, out), capsys)
    assert status == 0, err
    text = out.read_bytes().decode("utf-8")  # valid UTF-8, valid JSON on every line
    keys = [json.loads(line)["key"] for line in text.splitlines()[1:]]
    assert sorted(keys) == ["caf\\xe9.png", "img0.png", "img2.png", "img3.png"]
    assert "caf\\xe9.png is not valid UTF-8" in caplog.text
    status, _, err = _run(_certify(image_folder, out), capsys)  # a rerun resumes: nothing redone, nothing stops
    assert status == 0 and "4 rows already done" in caplog.text, err
    assert [row["key"] for row in read_run(out).rows] == keys
    printed, summary, _ = _report(out, capsys)
    assert "finished, 4/4 rows" in summary


# ----- wrong blame ------------------------------------------------------------------------------------------------
def test_report_of_a_file_that_is_not_a_run_gives_report_advice(tmp_path, capsys):
    path = tmp_path / "notes.jsonl"
    path.write_text("hello\n")
    status, _, err = _run(["report", str(path)], capsys)
    assert status == 1 and "Traceback" not in err and "--overwrite" not in err and "hf-fs certify" in err, err


@pytest.mark.skipif(os.name == "nt" or os.uname().sysname == "Darwin", reason="needs a filesystem of raw bytes")
def test_an_images_folder_whose_name_is_not_utf8(image_folder, tmp_path, capsys):
    folder = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"imgs\xff"))
    os.rename(image_folder, folder)
    out = tmp_path / "run.jsonl"
    status, _, err = _run(_certify(folder, out, "--limit", "2"), capsys)
    assert status == 0 and "Traceback" not in err, err
    header = json.loads(out.read_bytes().decode("utf-8").splitlines()[0])
    assert header["params"]["source"]["path"].endswith("imgs\\xff")
