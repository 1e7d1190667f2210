"""APGD / PGD internals, the end-to-end targeted text attack, and the `hf-fs attack` CLI."""

import pytest
import torch

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.attacks.feature import feature_attack, run_attack
from hf_feature_smoothing.attacks.optim import apgd_checkpoints
from hf_feature_smoothing.attacks.text import target_text_attack
from hf_feature_smoothing.cli import main
from hf_feature_smoothing.runs import read_run
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model, tiny_smoothed_model


def test_apgd_checkpoints_follow_croce_hein():
    assert sorted(apgd_checkpoints(100)) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("algorithm, norm", [("apgd", "l2"), ("apgd", "linf"), ("pgd", "l2"), ("pgd", "linf")])
def test_attacks_stay_feasible_and_solve_a_linear_problem(algorithm, norm):
    """min ⟨w, δ⟩ over the ε-ball (inside [0, 1]): the optimum is −ε·w/‖w‖ (ℓ2) or −ε·sign(w) (ℓ∞)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.full((3, 8, 8), 0.5)
    w = torch.randn(image.shape, generator=generator)
    epsilon = 0.3 if norm == "l2" else 0.05
    delta = run_attack(lambda d: ((w * d).sum().item(), w), image, epsilon, norm=norm, steps=30, algorithm=algorithm,
                       step_size=None, generator=generator)
    optimum = -epsilon * (w.norm() if norm == "l2" else w.abs().sum())
    assert (delta.norm() if norm == "l2" else delta.abs().max()) <= epsilon + 1e-5
    assert ((image + delta) >= 0).all() and ((image + delta) <= 1).all()
    assert (w * delta).sum() <= 0.95 * optimum


def test_apgd_at_least_matches_pgd_on_a_tiny_tower():
    model = tiny_model("llava")
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, seed=0))
    inputs = tower.check_inputs(tiny_inputs(model)["pixel_values"])
    reference = tower.clean_unit_features(inputs)[-1]
    kwargs = dict(norm="l2", steps=15, eot_samples=0, eval_samples=0, generator=torch.Generator().manual_seed(0))
    apgd = feature_attack(tower, inputs, reference, 0.5, algorithm="apgd", **kwargs)
    pgd = feature_attack(tower, inputs, reference, 0.5, algorithm="pgd", **kwargs)
    assert apgd.cosine <= pgd.cosine + 0.02 and apgd.cosine < 0.999


@pytest.mark.parametrize("smoothed", [False, True])
def test_targeted_text_attack_lowers_the_target_loss(smoothed):
    model = tiny_smoothed_model("llava", num_samples=2, seed=0) if smoothed else tiny_model("llava")
    inputs = tiny_inputs(model)
    target = torch.tensor([11, 12])
    clean = target_text_attack(model, inputs, target, 0.0, steps=1, eval_runs=2)
    attacked = target_text_attack(model, inputs, target, 16 / 255, steps=8, eot_samples=1, eval_runs=2,
                                  generator=torch.Generator().manual_seed(0))
    assert attacked.norm <= 16 / 255 + 1e-6 and 0.0 <= attacked.success_rate <= 1.0
    assert attacked.loss < clean.loss


def test_targeted_text_attack_on_qwen_grows_the_token_type_ids():
    model = tiny_smoothed_model("qwen2_vl", num_samples=2, seed=0)
    result = target_text_attack(model, tiny_inputs(model), torch.tensor([11]), 8 / 255, steps=2, eot_samples=1,
                                eval_runs=1, algorithm="pgd")
    assert result.norm <= 8 / 255 + 1e-6


def test_attack_cli_compares_variants_resumes_and_refuses_other_parameters(image_folder, tmp_path, capsys):
    for extra in sorted(image_folder.iterdir())[2:]:
        extra.unlink()
    (image_folder / "broken.png").write_bytes(b"\x89PNG not really")
    output = tmp_path / "attack.jsonl"
    args = ["attack", "--model", "tiny-llava", "--images", str(image_folder), "--epsilon", "0.1", "0.3", "--steps", "3",
            "--eot", "2", "--eval-samples", "16", "--n", "64", "--alpha", "0.01", "--seed", "0", "--output", str(output)]
    assert main(args) == 0
    contents = read_run(output)
    params = contents.header["params"]
    assert contents.header["command"] == "attack" and params["steps"] == 3 and params["eot"] == 2
    assert params["epsilon"] == [0.1, 0.3] and params["seed"] == 0 and params["sigma"] == 0.25
    assert [r["key"] for r in contents.rows] == ["broken.png", "img0.png|plain", "img0.png|smoothed",
                                                 "img1.png|plain", "img1.png|smoothed"]
    assert contents.rows[0]["status"] == "skipped" and "UnidentifiedImageError" in contents.rows[0]["reason"]
    for record in contents.rows[1:]:
        for row in record["rows"]:
            assert row["certificate_holds"] is not False
            assert (row["fcsb"] is None) or row["smoothed"]
    printed = capsys.readouterr().out
    assert "smoothed" in printed and "FCSB" in printed
    assert main(args) == 0  # resumed: nothing redone
    assert read_run(output).rows == contents.rows
    assert main([*args, "--steps", "5"]) == 1
    assert "steps: run has 3, this command has 5" in capsys.readouterr().err


def test_seeded_attack_rows_depend_only_on_the_seed_and_the_image():
    """The rows of an image are the same whether it is attacked first or after another one (sharding and resume
    change the order), and the tower's own forward seed is restored."""
    from hf_feature_smoothing.attacks.evaluation import attack_rows
    from hf_feature_smoothing.certification import as_smoothed_tower

    tower = as_smoothed_tower(tiny_model("llava"), 0.25)
    first, second = (tower.check_inputs(tiny_inputs(tower.encoder, seed=s)["pixel_values"]) for s in (0, 1))
    kwargs = dict(norm="l2", steps=2, eot_samples=2, eval_samples=4, n=16, alpha=0.05, seed=11)
    alone = attack_rows(tower, second, [0.2], **kwargs)
    attack_rows(tower, first, [0.2], **kwargs)
    after = attack_rows(tower, second, [0.2], **kwargs)
    assert after == alone and tower.config.seed is None
    assert attack_rows(tower, second, [0.2], **{**kwargs, "seed": 12}) != alone


@pytest.mark.parametrize("step_size", [-0.1, 0.0, float("nan"), float("inf")])
def test_feature_attack_refuses_a_step_size_that_is_not_positive(step_size):
    model = tiny_model("llava")
    tower = SmoothedVisionTower(model, FeatureSmoothingConfig(sigma=0.25, seed=0))
    inputs = tower.check_inputs(tiny_inputs(model)["pixel_values"])
    reference = tower.clean_unit_features(inputs)[-1]
    with pytest.raises(ValueError, match="`step_size` must be a finite number > 0"):
        feature_attack(tower, inputs, reference, 0.5, algorithm="pgd", step_size=step_size, eot_samples=0,
                       eval_samples=0)


def test_attack_cli_records_the_dtype_its_passes_run_in(image_folder, tmp_path):
    """Without --dtype a model saved with bf16 autocast is attacked in bf16 and the header says so (it said float32);
    --dtype float32 runs, and records, float32."""
    from hf_feature_smoothing.testing_utils import tiny_smoothed_model

    for extra in sorted(image_folder.iterdir())[1:]:
        extra.unlink()
    folder = tmp_path / "bf16-model"
    tiny_smoothed_model("llava", sigma=0.25, autocast_dtype="bfloat16").save_pretrained(folder)
    args = ["attack", "--model", str(folder), "--images", str(image_folder), "--epsilon", "0.1", "--steps", "1",
            "--eot", "1", "--eval-samples", "4", "--n", "16", "--seed", "0"]
    for dtype, expected in ((None, "bfloat16"), ("float32", "float32")):
        output = tmp_path / f"attack-{expected}.jsonl"
        assert main([*args, *(["--dtype", dtype] if dtype else []), "--output", str(output)]) == 0
        assert read_run(output).header["params"]["dtype"] == expected
