"""Class prototypes of a nearest-class-mean cosine predictor, saved for `hf-fs certify --prototypes`."""

import json
import logging

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from hf_feature_smoothing import FeatureSmoothingConfig, SmoothedVisionTower
from hf_feature_smoothing.certification import certify_prediction
from hf_feature_smoothing.certification.prototypes import (
    certified_margins,
    class_means,
    class_prototypes,
    fit_prototypes,
    save_prototypes,
)
from hf_feature_smoothing.testing_utils import tiny_model, tiny_smoothed_model


def _images(count: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(56, 56, 3, generator=generator) * 255).to(torch.uint8).numpy())
            for _ in range(count)]


@pytest.mark.parametrize("boosted", [False, True])
def test_prototypes_are_normalised_class_means_of_unit_features(tmp_path, boosted):
    """Clean prototypes are class means of f(x) as the certificates' clean reference computes it (with a booster:
    conditioned on σ, as `clean_unit_features` is)."""
    tower = SmoothedVisionTower(tiny_model("llava"), FeatureSmoothingConfig())
    if boosted:
        import hf_feature_smoothing as hfs

        model = tiny_smoothed_model("llava", sigma=0.25)
        booster = hfs.add_booster(model, hfs.GSBConfig(sigmas=[0.25]))
        generator = torch.Generator().manual_seed(0)
        for name, param in booster.named_parameters():
            if "fs_booster_" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.05
        tower = model.smoothed_vision_tower
    images, labels = _images(6, 0), [0, 1, 2, 0, 1, 2]
    prototypes = class_prototypes(tower, images, labels, batch_size=4)
    assert prototypes.shape[0] == 3 and torch.allclose(prototypes.norm(dim=1), torch.ones(3))
    unit = torch.stack([tower.clean_unit_features(tower.family.preprocess([image]))[-1] for image in images])
    expected = torch.nn.functional.normalize(torch.stack([unit[[k, k + 3]].mean(0) for k in range(3)]), dim=1)
    assert torch.allclose(prototypes, expected, atol=1e-5)
    path = tmp_path / "protos.safetensors"
    save_prototypes(prototypes, path, class_names=["a", "b", "c"], model="tiny-llava", shots=2)
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("prototypes"), prototypes)
        assert json.loads(f.metadata()["class_names"]) == ["a", "b", "c"] and json.loads(f.metadata()["shots"]) == 2
    certificates = certify_prediction(tower, images[:2], prototypes, labels[:2], n=32, n0=8, seed=0)
    assert all(c.prediction is None or 0 <= c.prediction < 3 for c in certificates)


def test_prototypes_refuse_bad_labels():
    tower = SmoothedVisionTower(tiny_model("llava"), FeatureSmoothingConfig())
    with pytest.raises(ValueError, match="no training image"):
        class_prototypes(tower, _images(2, 1), [0, 2])
    with pytest.raises(ValueError, match="labels"):
        class_prototypes(tower, _images(2, 1), [0, -1])
    with pytest.raises(ValueError, match="one label per image"):
        class_prototypes(tower, _images(2, 1), [0])


def test_prototypes_cli_on_a_built_in_labelled_set_then_certify_predictions(tmp_path):
    from hf_feature_smoothing.assets.labelled_images import DIGITS_TRAIN
    from hf_feature_smoothing.cli import main
    from hf_feature_smoothing.runs.fingerprints import file_sha256
    from hf_feature_smoothing.runs.report import write_report

    protos = tmp_path / "digits.safetensors"
    assert main(["prototypes", "--model", "tiny-llava", "--images", "digits:train", "--shots", "2",
                 "--output", str(protos)]) == 0
    with safe_open(str(protos), "pt") as f:
        assert f.get_tensor("prototypes").shape[0] == 10
        assert json.loads(f.metadata()["source"])["name"] == "digits" and len(json.loads(f.metadata()["keys"])) == 20
    assert main(["prototypes", "--model", "tiny-llava", "--images", "digits:train", "--output",
                 str(tmp_path / "p.pt")]) == 2  # not a safetensors file: a bad option value
    out = tmp_path / "pred.jsonl"
    assert main(["certify", "--model", "tiny-llava", "--images", "digits:test", "--limit", "5", "--prototypes",
                 str(protos), "--n", "16", "--n0", "4", "--seed", "0", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    assert [r["key"] for r in rows] == [f"digits/{i}" for i in range(DIGITS_TRAIN, DIGITS_TRAIN + 5)]
    assert all(r["label"] in range(10) for r in rows)
    # `hf-fs report --radii`: certified accuracy at the radii asked for, in the summary and in model-index
    report = tmp_path / "report"
    assert main(["report", str(out), "--output-dir", str(report), "--radii", "1", "0", "0.01", "1"]) == 0
    header = (report / "summary.md").read_text().split("\n| ", 1)[1].split("\n")[0]
    assert header.startswith("certified accuracy r=0 | certified accuracy r=0.01 | certified accuracy r=1 |")
    (entry,) = yaml.safe_load((report / "model-index.yaml").read_text())["model-index"]
    metrics = [m for result in entry["results"] for m in result["metrics"]]
    values = {m["args"]["radius"]: m["value"] for m in metrics if "radius" in m["args"]}
    digest = file_sha256(protos)  # every entry names the predictor's prototypes (fitted and class-mean ones differ)
    assert f"**certify tiny-llava vote, prototypes {digest[:8]} σ=" in (report / "summary.md").read_text()
    assert all(m["args"]["prototypes_sha256"] == digest and f"prototypes {digest[:8]}" in m["name"] for m in metrics)
    assert values == {r: sum(row["correct"] and row["radius"] >= r and (r > 0 or row["prediction"] is not None)
                             for row in rows) / 5 for r in (0, 0.01, 1)}
    for bad in ("-0.5", "nan", "x"):
        with pytest.raises(SystemExit) as exit_info:
            main(["report", str(out), "--output-dir", str(report), "--radii", bad])
        assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="radii"):
        write_report([out], report, radii=[0.1, float("inf")])


def test_smoothed_prototypes_are_the_directions_of_the_smoothed_features():
    tower = SmoothedVisionTower(tiny_model("llava"), FeatureSmoothingConfig(sigma=0.5, seed=3))
    images, labels = _images(4, 2), [0, 1, 0, 1]
    smoothed = class_prototypes(tower, images, labels, num_samples=8)
    tower.manual_seed(3)
    inputs = tower.family.preprocess(images)
    unit_sum, _ = tower.monte_carlo(inputs, 8)[-1]
    per_image = torch.nn.functional.normalize(unit_sum.reshape(4, -1), dim=1)
    expected = torch.nn.functional.normalize(torch.stack([per_image[[k, k + 2]].mean(0) for k in range(2)]), dim=1)
    assert torch.allclose(smoothed, expected, atol=1e-5)
    assert not torch.allclose(smoothed, class_prototypes(tower, images, labels), atol=1e-3)  # noise matters
    with pytest.raises(ValueError, match="num_samples"):
        class_prototypes(tower, images, labels, num_samples=-1)


def test_prototypes_cli_smoothed_options_are_recorded_and_checked(tmp_path, caplog):
    from hf_feature_smoothing.cli import main

    protos = tmp_path / "smoothed.safetensors"
    command = ["prototypes", "--model", "tiny-llava", "--images", "digits:train", "--shots", "1"]
    assert main([*command, "--sigma", "0.25", "--num-samples", "2", "--output", str(protos)]) == 0
    with safe_open(str(protos), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert (meta["sigma"], meta["num_samples"], meta["seed"]) == (0.25, 2, 0)
    assert main([*command, "--num-samples", "2", "--output", str(tmp_path / "x.safetensors")]) == 2  # no --sigma
    assert not (tmp_path / "x.safetensors").exists()
    certify = ["certify", "--model", "tiny-llava", "--images", "digits:test", "--limit", "1", "--prototypes",
               str(protos), "--n", "4", "--n0", "2"]
    with caplog.at_level(logging.WARNING):  # certified at the σ they were made for: no word; at another: a warning
        assert main([*certify, "--sigma", "0.25", "--output", str(tmp_path / "same.jsonl")]) == 0
        assert "made with" not in caplog.text
        assert main([*certify, "--sigma", "0.5", "--output", str(tmp_path / "other.jsonl")]) == 0
    assert f"--prototypes {protos}: made with σ 0.25 (this run: 0.5)" in caplog.text


@pytest.mark.parametrize("features", ["vision", "projected"])
def test_prototypes_carry_their_feature_space_and_certify_certifies_in_it(features, tmp_path, capsys):
    """`--features` and `--center position`: the site and μ (per token position, from the smoothed training features)
    are saved exactly with the prototypes; `hf-fs certify --prototypes` certifies normalise(f − μ) at that site: its
    rows equal the API's certificates on a tower with that site and centre, and the header says so. A centre made
    for another tower is one clean error."""
    from hf_feature_smoothing.assets.registry import resolve_model
    from hf_feature_smoothing.certification.prototypes import load_prototype_space, load_prototypes
    from hf_feature_smoothing.cli import main
    from hf_feature_smoothing.runs import read_run
    from hf_feature_smoothing.runs.fingerprints import values_digest
    from hf_feature_smoothing.runs.images import LabelledImages

    protos = tmp_path / "centred.safetensors"
    assert main(["prototypes", "--model", "tiny-llava", "--images", "digits:train", "--shots", "1", "--sigma", "0.25",
                 "--num-samples", "2", "--center", "position", "--features", features, "--output", str(protos)]) == 0
    space = load_prototype_space(protos)
    width = load_prototypes(protos).shape[1]
    assert space.smoothed_features == features and len(space.feature_center) == width
    save_prototypes(torch.ones(2, 4), tmp_path / "plain.safetensors")
    assert load_prototype_space(tmp_path / "plain.safetensors") == type(space)(None, None)
    out = tmp_path / "pred.jsonl"
    assert main(["certify", "--model", "tiny-llava", "--images", "digits:test", "--limit", "2", "--prototypes",
                 str(protos), "--sigma", "0.25", "--n", "16", "--n0", "4", "--seed", "0", "--output", str(out)]) == 0
    run = read_run(out)
    smoothing = run.header["params"]["smoothing"]
    assert smoothing["feature_center"] == {"values": width, "digest": values_digest(space.feature_center)}
    assert smoothing["smoothed_features"] == features and all(r["centered"] for r in run.rows)
    config = FeatureSmoothingConfig(sigma=0.25, feature_center=space.feature_center, smoothed_features=features)
    tower = SmoothedVisionTower(resolve_model("tiny-llava"), config)
    images = [LabelledImages("digits:test").item(i).load() for i in range(2)]
    expected = certify_prediction(tower, images, load_prototypes(protos), [r["label"] for r in run.rows], n=16, n0=4,
                                  seed=0)
    assert [(r["p_lower"], r["radius"]) for r in run.rows] == [(c.p_lower, c.radius) for c in expected]
    # the API given the file's path certifies in its space too; given the tensor alone, in the tower's own
    plain = SmoothedVisionTower(resolve_model("tiny-llava"), FeatureSmoothingConfig(sigma=0.25))
    labels = [r["label"] for r in run.rows]
    from_path = certify_prediction(plain, images, protos, labels, n=16, n0=4, seed=0)
    assert [c.to_dict() for c in from_path] == [c.to_dict() for c in expected] and all(c.centered for c in from_path)
    assert not any(c.centered for c in certify_prediction(plain, images, load_prototypes(protos), labels, n=4, n0=4,
                                                          seed=0))
    centred_otherwise = SmoothedVisionTower(plain.encoder, FeatureSmoothingConfig(
        sigma=0.25, smoothed_features=features, feature_center=[c + 1.0 for c in space.feature_center]))
    with pytest.raises(ValueError, match=f"prototypes file {protos}: made with a feature centre of {width} values"):
        certify_prediction(centred_otherwise, images, protos, labels, n=4, n0=4)
    capsys.readouterr()
    other = tmp_path / "other.safetensors"  # a centre made for another tower: not a divisor of the row width
    save_prototypes(load_prototypes(protos), other, feature_center=[0.0] * (width - 1))
    assert main(["certify", "--model", "tiny-llava", "--images", "digits:test", "--limit", "1", "--prototypes",
                 str(other), "--output", str(tmp_path / "other.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"--prototypes {other}" in err and "feature_center" in err and "Traceback" not in err
    assert not (tmp_path / "other.jsonl").exists()


def test_clean_centred_prototypes_are_class_means_of_the_centred_features(tmp_path):
    """Without --sigma, `--center channel` prototypes are the normalised class means of normalise(g(x) − μ), g the
    raw clean feature and μ its per-channel mean over the same images (computed here by hand)."""
    from hf_feature_smoothing.assets.registry import resolve_model
    from hf_feature_smoothing.certification.prototypes import load_prototype_space, load_prototypes
    from hf_feature_smoothing.cli import main
    from hf_feature_smoothing.runs.images import LabelledImages

    protos = tmp_path / "clean.safetensors"
    assert main(["prototypes", "--model", "tiny-llava", "--images", "digits:train", "--shots", "1", "--center",
                 "channel", "--output", str(protos)]) == 0
    with safe_open(str(protos), "pt") as f:
        keys = json.loads(f.metadata()["keys"])
    source = LabelledImages("digits:train")
    items = {item.key: item for item in source.items()}
    tower = SmoothedVisionTower(resolve_model("tiny-llava"))
    with torch.no_grad():
        raw = torch.cat([tower.family.encode(tower.family.preprocess([items[k].load()]))[-1] for k in keys])
    tokens = raw.reshape(len(keys), -1, 64)  # 16 tokens × 64 channels per image
    mu = tokens.double().mean((0, 1)).float()
    unit = torch.nn.functional.normalize((tokens - mu).flatten(1), dim=1)
    expected = torch.nn.functional.normalize(torch.stack([unit[[i for i, k in enumerate(keys)
                                                                if items[k].label == c]].mean(0) for c in range(10)]),
                                             dim=1)
    torch.testing.assert_close(load_prototypes(protos), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(load_prototype_space(protos).feature_center).float(), mu, atol=1e-5,
                               rtol=0)


def test_limit_on_a_class_sorted_built_in_set_takes_every_class():
    from hf_feature_smoothing.runs.images import FirstImages, LabelledImages

    source = LabelledImages("textiles:test")
    first = [source.item(i).label for i in range(6)]
    assert first == [0, 1, 2, 0, 1, 2] and source.description["order"] == "classes interleaved"
    assert len({source.item(i).key for i in range(len(source))}) == len(source) == 300
    assert [FirstImages(source, 3).item(i).label for i in range(3)] == [0, 1, 2]


def _clustered_features(count: int, generator: torch.Generator, classes: int = 5, width: int = 64):
    """Smoothed-like features (norm 0.9) of `classes` classes that share one dominant direction, as DINOv2's do:
    class means sit at cosine ≈ 0.9 to each other, so their FS margins are tiny."""
    base = torch.Generator().manual_seed(0)
    common = torch.nn.functional.normalize(torch.randn(width, generator=base), dim=0)
    directions = torch.nn.functional.normalize(torch.randn(classes, width, generator=base), dim=1)
    labels = torch.arange(count) % classes
    features = 0.85 * common + 0.25 * directions[labels] + 0.03 * torch.randn(count, width, generator=generator)
    return 0.9 * torch.nn.functional.normalize(features, dim=1), labels


def test_fitted_prototypes_widen_the_certified_margin_on_held_out_features():
    generator = torch.Generator().manual_seed(1)
    (train, train_labels), (test, test_labels) = (_clustered_features(n, generator) for n in (100, 500))
    means = class_means(train, train_labels.tolist())
    fitted = fit_prototypes(train, train_labels.tolist(), steps=100)
    assert torch.equal(fitted, fit_prototypes(train, train_labels.tolist(), steps=100))  # deterministic
    assert fitted.shape == means.shape and torch.allclose(fitted.norm(dim=1), torch.ones(5))
    mean_margin, fitted_margin = (certified_margins(test, test_labels, t) for t in (means, fitted))
    assert (fitted_margin > 0).float().mean() >= (mean_margin > 0).float().mean()  # no accuracy lost
    assert fitted_margin.median() > 1.5 * mean_margin.median(), (fitted_margin.median(), mean_margin.median())
    with pytest.raises(ValueError, match="Classes \\[5\\] have no training image"):
        fit_prototypes(train, train_labels.tolist(), num_classes=6)


def test_prototypes_cli_fits_to_the_margin_and_records_the_recipe(tmp_path, capsys):
    from hf_feature_smoothing.cli import main

    protos = tmp_path / "fitted.safetensors"
    command = ["prototypes", "--model", "tiny-llava", "--images", "digits:train", "--shots", "2", "--output",
               str(protos)]
    assert main([*command, "--fit"]) == 2 and not protos.exists()  # fitting needs the σ to certify
    assert "--fit" in capsys.readouterr().err
    assert main([*command, "--fit", "--sigma", "0.25", "--num-samples", "2"]) == 0
    with safe_open(str(protos), "pt") as f:
        assert f.get_tensor("prototypes").shape[0] == 10 and json.loads(f.metadata()["recipe"]) == "fit_prototypes"
        assert json.loads(f.metadata()["sigma"]) == 0.25
