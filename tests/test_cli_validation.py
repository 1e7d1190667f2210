"""`hf-fs` refuses a bad value before anything is written: exit status 2, one message naming the option, the value,
the cause and the fix, no run file / lock / folder left behind, no traceback; and the one seed rule of the API."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import hf_feature_smoothing.commands.certify as certify_command
from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.certification import certify
from hf_feature_smoothing.cli import main
from hf_feature_smoothing.utils.validation import check_seed

from .toy_encoders import ToyEncoder, toy_image


TINY = ["--model", "tiny-llava", "--n", "8", "--n0", "4", "--seed", "0"]
WIDTH = 16 * 64  # tiny LLaVA: 16 patch tokens × 64 channels


def _refused(tmp_path, capsys, args, *needles, argparse_error=False):
    """Run `hf-fs certify` with `args`; it must exit with 2, print one error line holding every needle, and leave
    nothing in its output folder."""
    out = tmp_path / "out" / "run.jsonl"
    command = ["certify", *TINY, *args, "--output", str(out)]
    if argparse_error:
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        status = exit_info.value.code
    else:
        status = main(command)
    err = capsys.readouterr().err
    assert status == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert not (tmp_path / "out").exists()  # no run file, header, lock or folder
    return errors[0]


@pytest.mark.parametrize("value", ["0", "-0.5", "1", "nan"])
def test_target_cosine_out_of_the_api_range(tmp_path, capsys, value):
    _refused(tmp_path, capsys, ["--target-cosine", value], "--target-cosine", repr(value), "(0, 1)", "e.g. 0.9",
             argparse_error=True)


def test_target_radius_beyond_reach_then_a_corrected_command_starts(image_folder, tmp_path, capsys):
    _refused(tmp_path, capsys, ["--images", str(image_folder), "--sigma", "0.01", "--target-radius", "5"],
             "--target-radius 5", "unreachable at σ=0.01", "raise --sigma")
    # within reach at σ, not with 8 samples: every certificate would stop after one sample and certify nothing
    _refused(tmp_path, capsys, ["--images", str(image_folder), "--sigma", "0.01", "--target-radius", "0.001"],
             "--target-radius 0.001", "out of reach with --n 8", "S ≥ 0.916445", "Raise --n (to 91)")
    out = tmp_path / "out" / "run.jsonl"
    assert main(["certify", *TINY, "--n", "91", "--images", str(image_folder), "--sigma", "0.01", "--target-radius",
                 "0.001", "--output", str(out)]) == 0
    assert out.exists() and not (tmp_path / "out" / "run.jsonl.bak").exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert rows and all(r["n_used"] > 1 for r in rows)  # sampled, not stopped at once


def test_target_with_a_fixed_n_bound(tmp_path, capsys):
    _refused(tmp_path, capsys, ["--target-cosine", "0.5", "--bound", "bernstein"],
             "--target-cosine 0.5", "--bound bernstein", "fixed n", "Use --bound betting")


def test_target_with_prototypes_is_not_applicable(tmp_path, capsys):
    path = tmp_path / "p.safetensors"
    save_file({"prototypes": torch.randn(3, WIDTH)}, path)
    _refused(tmp_path, capsys, ["--prototypes", str(path), "--method", "margin", "--target-radius", "0.1"],
             "--target-radius 0.1", f"--prototypes {path}", "not to margin prediction certificates", "--method vote")


def test_futility_needs_a_vote_with_a_target_radius(tmp_path, capsys):
    path = tmp_path / "p.safetensors"
    save_file({"prototypes": torch.randn(3, WIDTH)}, path)
    _refused(tmp_path, capsys, ["--futility", "--target-cosine", "0.5"], "--futility",
             "give --target-radius with --prototypes (--method vote)")  # feature certificates have no futility stop
    _refused(tmp_path, capsys, ["--prototypes", str(path), "--futility"], "--futility", "give --target-radius")


@pytest.mark.parametrize("tensor, needles", [
    (torch.randn(3, 100), ("100 features per class", f"gives {WIDTH}", "recompute them")),
    (torch.randn(1, WIDTH), ("(K ≥ 2, F)", "at least two classes", "hf-fs prototypes")),
    (torch.randn(3, 4, 5), ("(K ≥ 2, F)",)),
])
def test_bad_prototype_files(image_folder, tmp_path, capsys, tensor, needles):
    path = tmp_path / "p.safetensors"
    save_file({"prototypes": tensor}, path)
    _refused(tmp_path, capsys, ["--images", str(image_folder), "--prototypes", str(path)], f"--prototypes {path}",
             *needles)


def test_unreadable_prototype_file(tmp_path, capsys):
    path = tmp_path / "p.safetensors"
    path.write_text("not safetensors")
    _refused(tmp_path, capsys, ["--prototypes", str(path)], f"--prototypes {path}", "not a readable safetensors")


@pytest.mark.parametrize("tensors, metadata, needles", [
    ({"weights": torch.randn(3, WIDTH)}, None, ("no `prototypes` tensor", "['weights']")),
    ({"prototypes": torch.randn(3, WIDTH)}, {"smoothed_features": '"logits"'}, ("'logits'", "not one of")),
    ({"prototypes": torch.randn(3, WIDTH)}, {"smoothed_features": "logits"}, ("'logits'", "not one of")),
    ({"prototypes": torch.randn(3, WIDTH), "feature_center": torch.full((WIDTH,), float("nan"))}, None,
     ("feature_center", "finite", "--center")),
])
def test_prototype_files_of_another_making_are_refused(tmp_path, capsys, tensors, metadata, needles):
    path = tmp_path / "p.safetensors"
    save_file(tensors, path, metadata=metadata)
    _refused(tmp_path, capsys, ["--prototypes", str(path)], f"--prototypes {path}", *needles)


@pytest.mark.parametrize("value", ["-1", str(2**63), str(2**64 + 5), "1.5"])
def test_seed_out_of_range(tmp_path, capsys, value):
    _refused(tmp_path, capsys, ["--seed", value], "--seed", repr(value), argparse_error=True)


def test_an_api_error_is_one_line_and_the_traceback_only_in_debug(image_folder, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise ValueError("`epsilon` must be something else; fix it.")

    monkeypatch.setattr(certify_command, "certify", refuse)
    out = tmp_path / "run.jsonl"
    assert main(["certify", *TINY, "--images", str(image_folder), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hf-fs certify: error: `epsilon` must be something else; fix it." in err and "Traceback" not in err
    assert main(["certify", *TINY, "--images", str(image_folder), "--output", str(out), "--verbosity", "debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_attack_defaults_are_the_api_defaults():
    import inspect

    from hf_feature_smoothing.attacks.evaluation import attack_rows
    from hf_feature_smoothing.cli import build_parser

    api = inspect.signature(attack_rows).parameters
    args = build_parser().parse_args(["attack"])
    assert (args.n, args.eval_samples, args.eot, args.steps, args.alpha, args.success_threshold) == (
        api["n"].default, api["eval_samples"].default, api["eot_samples"].default, api["steps"].default,
        api["alpha"].default, api["success_threshold"].default)
    assert build_parser().parse_args(["attack", "--eot", "0"]).eot == 0  # the API attacks the base encoder then
    cert = build_parser().parse_args(["certify"])
    assert cert.chunk_size is None  # the model's own chunk size (FeatureSmoothingConfig's 16 for a stock model)
    params = inspect.signature(certify).parameters
    assert (cert.n, cert.n0, cert.alpha, cert.bound, tuple(cert.epsilon), tuple(cert.tau)) == (
        params["n"].default, params["n0"].default, params["alpha"].default, params["bound"].default,
        tuple(params["epsilon"].default), tuple(params["tau"].default))


# ----- the one seed rule -----------------------------------------------------------------------------------------
def _tower():
    return SmoothedVisionTower(ToyEncoder("angle"), FeatureSmoothingConfig(sigma=0.25))


SEED_USERS = {
    "config": lambda seed: FeatureSmoothingConfig(seed=seed).seed,
    "manual_seed": lambda seed: _tower().manual_seed(seed).config.seed,
    "certify": lambda seed: certify(_tower(), toy_image(0.3), epsilon=0.1, n=4, n0=2, seed=seed)[0].seed,
}


@pytest.mark.parametrize("user", sorted(SEED_USERS))
def test_one_seed_rule(user):
    use = SEED_USERS[user]
    assert use(np.int64(7)) == 7 and use(2**63 - 1) == 2**63 - 1
    for bad in (True, 1.5, "3"):
        with pytest.raises(TypeError, match="`seed`"):
            use(bad)
    for bad in (-1, 2**63, 2**64 + 5):
        with pytest.raises(ValueError, match=r"`seed` must be a finite integer in \[0, 9223372036854775807\]"):
            use(bad)


def test_attack_rows_uses_the_seed_rule_before_any_pass():
    from hf_feature_smoothing.attacks.evaluation import attack_rows

    with pytest.raises(ValueError, match="`seed`"):
        attack_rows(None, type("One", (), {"num_images": 1})(), [0.1], seed=2**64 + 5)
    assert check_seed(None) is None and check_seed(np.uint8(3)) == 3
