"""`hf-fs report`: tables, plots and `model-index` metrics from finished runs, nothing recomputed; runs with other
parameters are refused unless grouped by them."""

import json
import shutil

import pytest
import yaml

import hf_feature_smoothing.cli as cli
import hf_feature_smoothing.commands.certify as certify_command
from hf_feature_smoothing.runs import read_run
from hf_feature_smoothing.statistics.aggregates import certified_cosine


def _certify(folder, out, *extra):
    assert cli.main(["certify", "--model", "tiny-llava", "--n", "48", "--n0", "4", "--alpha", "0.2", "--images", str(folder),
                     "--output", str(out), "--epsilon", "0", "0.05", *extra]) == 0


@pytest.fixture
def two_runs(image_folder, tmp_path):
    """The same parameters on two folders (and two fresh seeds): poolable."""
    other = tmp_path / "other"
    shutil.copytree(image_folder, other)
    _certify(image_folder, tmp_path / "a.jsonl")
    _certify(other, tmp_path / "b.jsonl")
    return tmp_path / "a.jsonl", tmp_path / "b.jsonl"


def test_report_pools_runs_without_recomputing(two_runs, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("report must not certify anything")

    monkeypatch.setattr(certify_command, "certify", refuse)
    monkeypatch.setattr(certify_command, "certify_prediction", refuse)
    report = tmp_path / "report"
    assert cli.main(["report", *map(str, two_runs), "--output-dir", str(report), "--dataset-name", "photos"]) == 0
    rows = read_run(two_runs[0]).rows + read_run(two_runs[1]).rows
    expected = certified_cosine([r["score_lower"] for r in rows], [r["sigma"] for r in rows], [0.0, 0.05])
    card = yaml.safe_load((report / "model-index.yaml").read_text())
    metrics = {m["type"] + str(m["args"].get("epsilon", "")): m for m in card["model-index"][0]["results"][0]["metrics"]}
    assert metrics["certified_cosine0.05"]["value"] == pytest.approx(expected["certified_cosine@0.05"])
    assert 0 < expected["certified_cosine@0.05"] < expected["certified_cosine@0"]
    assert metrics["certified_cosine0.05"]["args"]["num_images"] == 8  # both folders, pooled
    assert card["model-index"][0]["results"][0]["dataset"]["name"] == "photos"
    assert (report / "group0.png").read_bytes()[:4] == b"\x89PNG"
    summary = (report / "summary.md").read_text()
    assert "8 images, 0 skipped" in summary and "certified cosine ε=0.05" in summary
    assert summary in capsys.readouterr().out


def test_a_boosted_feature_run_names_its_booster_in_the_report_and_the_index(two_runs, tmp_path):
    """The booster is part of the certified function: a feature run of a boosted model says so in its title and in
    every `model-index` entry, so its numbers never read as the base model's."""
    from hf_feature_smoothing.runs.report import write_report

    lines = two_runs[0].read_text().splitlines()
    header = json.loads(lines[0])
    header["params"]["booster"] = "/home/me/my-gsb"
    two_runs[0].write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    summary = write_report([two_runs[0]], tmp_path / "boosted")
    assert "certify tiny-llava + my-gsb σ=" in summary
    card = yaml.safe_load((tmp_path / "boosted" / "model-index.yaml").read_text())
    metrics = card["model-index"][0]["results"][0]["metrics"]
    assert all(m["args"]["booster"] == "my-gsb" and "booster my-gsb" in m["name"] for m in metrics)


def test_report_refuses_mixed_parameters_unless_grouped(two_runs, image_folder, tmp_path, capsys):
    _certify(image_folder, tmp_path / "c.jsonl", "--sigma", "0.5")
    runs = [*map(str, two_runs), str(tmp_path / "c.jsonl")]
    assert cli.main(["report", *runs, "--output-dir", str(tmp_path / "r1")]) == 1
    assert "sigma: run has 0.25, this run has 0.5" in capsys.readouterr().err
    assert cli.main(["report", *runs, "--output-dir", str(tmp_path / "r2"), "--group-by-params"]) == 0
    summary = (tmp_path / "r2" / "summary.md").read_text()
    assert "σ=0.25" in summary and "σ=0.5" in summary and "8 images" in summary and "4 images" in summary
    card = yaml.safe_load((tmp_path / "r2" / "model-index.yaml").read_text())
    sigmas = {m["args"]["sigma"] for result in card["model-index"][0]["results"] for m in result["metrics"]}
    assert sigmas == {0.25, 0.5}
    # groups whose entries would share names (n is in the args, not the names): no index rather than a mixed one
    _certify(image_folder, tmp_path / "d.jsonl", "--n", "64")
    assert cli.main(["report", str(two_runs[0]), str(tmp_path / "d.jsonl"), "--output-dir", str(tmp_path / "r2"),
                     "--group-by-params"]) == 0  # one folder, σ = 0.25 twice: n = 48 and 64
    summary = (tmp_path / "r2" / "summary.md").read_text()
    assert "model-index: not written: " in summary and "metric names repeat" in summary
    assert not (tmp_path / "r2" / "model-index.yaml").exists()  # the earlier report's index is gone, not kept


def test_one_model_index_never_holds_two_models():
    from huggingface_hub import EvalResult

    from hf_feature_smoothing.runs.report import index_refusal

    entry = EvalResult(task_type="image-classification", dataset_type="digits", dataset_name="digits",
                       metric_type="certified_accuracy", metric_value=1.0, metric_name="certified accuracy @ r=0.25")
    assert index_refusal([entry], {"org/A"}) is None
    assert "2 models (org/A, org/B)" in index_refusal([entry, entry], {"org/A", "org/B"})
    assert "metric names repeat" in index_refusal([entry, entry], {"org/A"})


def test_report_of_an_attack_run(image_folder, tmp_path, capsys):
    out = tmp_path / "attack.jsonl"
    assert cli.main(["attack", "--model", "tiny-llava", "--images", str(image_folder), "--epsilon", "0.2",
                     "--steps", "1", "--eot", "1", "--eval-samples", "2", "--n", "8", "--alpha", "0.1", "--seed", "0",
                     "--output", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| plain | 0.2 |" in printed and "| smoothed | 0.2 |" in printed
    assert (tmp_path / "attack-report" / "group0.png").exists()
    assert not (tmp_path / "attack-report" / "model-index.yaml").exists()  # attacks are not certificates


def _as_if_made_by(path, version: str, n: int) -> None:
    """Rewrite a run's rows as a run of `version` with n estimation samples would have written them."""
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    for row in rows:
        row["versions"]["hf_feature_smoothing"], row["n"], row["n_used"] = version, n, n
    path.write_text("\n".join([lines[0], *map(json.dumps, rows)]) + "\n")


@pytest.mark.parametrize("version, n, warned", [("0.1.0", 8192, True), ("0.1.0", 4096, False),
                                                ("0.2.0", 40_000, False)])
def test_report_warns_on_rows_of_a_version_with_a_known_defect(image_folder, tmp_path, capsys, caplog, version, n,
                                                                warned):
    """Betting bounds of 0.1.0 from more than 4096 samples are invalid: the report says so, in its output and the
    summary file, counting the rows; rows of other versions, or from at most 4096 samples, pass silently."""
    run = tmp_path / "a.jsonl"
    _certify(image_folder, run)
    _as_if_made_by(run, version, n)
    assert cli.main(["report", str(run), "--output-dir", str(tmp_path / "r")]) == 0
    printed, summary = capsys.readouterr().out, (tmp_path / "r" / "summary.md").read_text()
    for text in (printed, summary, caplog.text):
        assert ("WARNING (betting-carry): 4 of 4 rows are affected" in text) is warned
        assert ("recompute them with >= 0.2.0" in text) is warned


def test_advisories_read_the_certificate_record():
    from hf_feature_smoothing.statistics.advisories import BETTING_CARRY, advisories_for

    record = {"versions": {"hf_feature_smoothing": "0.1.0"}, "bound": "betting", "n": 10_000, "n_used": 10_000}
    assert advisories_for(record) == [BETTING_CARRY]
    assert advisories_for({**record, "n_used": 300}) == []  # a sequential run that stopped early
    assert advisories_for({**record, "bound": "bernstein"}) == []
    assert advisories_for({**record, "versions": {"hf_feature_smoothing": "0.2.0"}}) == []
    prediction = {"versions": {"hf_feature_smoothing": "0.1.0"}, "bound": "betting", "n": 5000}  # no n_used
    assert advisories_for(prediction) == [BETTING_CARRY]


def test_accuracy_plot_and_summary_count_the_same_labelled_rows(tmp_path, monkeypatch):
    """An unlabelled row is left out of certified accuracy, in the summary and in the plot alike (it is neither right
    nor wrong)."""
    import hf_feature_smoothing.runs.plotting as plotting
    from hf_feature_smoothing.runs.report import RunGroup, plot_group, summary_lines

    base = {"sigma": 0.25, "n": 10, "alpha": 0.01, "status": "ok", "source": None}
    rows = [{**base, "key": "a", "prediction": 1, "label": 1, "correct": True, "radius": 0.3},
            {**base, "key": "b", "prediction": 0, "label": None, "correct": None, "radius": 0.4}]
    group = RunGroup("certify", {"prototypes": {"sha256": "f" * 64}, "n": 10, "sigma": 0.25}, [tmp_path], rows)
    plotted = []
    monkeypatch.setattr(plotting, "plot_certified_accuracy", lambda rows, path: plotted.append(rows))
    assert plot_group(group, tmp_path / "plot.png") and plotted == [rows[:1]]
    table = summary_lines(group, radii=(0.25,))
    assert "1 labelled" in table[0] and table[-1] == "| 1.0000 | 0.0000 |"


def test_a_sequential_run_reports_no_accuracy_beyond_its_target_radius(tmp_path):
    """A certificate that stopped at its target radius certifies at least the target, no more was sampled: accuracy
    past the target would count those stops as failures, so the summary leaves those radii out and says why."""
    from hf_feature_smoothing.runs.report import RunGroup, summary_lines

    params = {"n": 200, "n0": 16, "sigma": 0.5, "method": "vote", "target_radius": 0.5}
    base = {"sigma": 0.5, "n": 200, "alpha": 0.01, "status": "ok", "source": None}
    rows = [{**base, "key": "a", "answer": 1, "label": 1, "correct": True, "radius": 0.52, "stop": "target",
             "n_used": 60},
            {**base, "key": "b", "answer": 0, "label": 0, "correct": True, "radius": 0.3, "stop": "unreachable",
             "n_used": 150}]
    group = RunGroup("certify-answer", params, [tmp_path], rows)
    lines = summary_lines(group, radii=(0.25, 0.5, 1.0))
    assert lines[2] == "| certified accuracy r=0.25 | certified accuracy r=0.5 | abstain rate |"
    assert lines[4] == "| 1.0000 | 0.5000 | 0.0000 |"
    assert lines[-1] == "\nNot reported at r = 1: beyond the target radius 0.5, where sampling stopped."
    fixed = RunGroup("certify-answer", {**params, "target_radius": None}, [tmp_path], rows)
    assert "certified accuracy r=1 |" in summary_lines(fixed, radii=(0.25, 0.5, 1.0))[2]
