"""Model cards with certificates in `model-index`, offline `evaluate` metric, and the (isolated) push path."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.hf_api import RepoUrl

import hf_feature_smoothing as hfs
from hf_feature_smoothing.certification import certify, certify_prediction
from hf_feature_smoothing.hub.sharing import build_model_card, certificate_eval_results
from hf_feature_smoothing.statistics.aggregates import certified_accuracy, certified_cosine
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_smoothed_model

from .toy_encoders import ToyEncoder, toy_images


@pytest.fixture(scope="module")
def certified():
    model = tiny_smoothed_model("llava", num_samples=2, seed=0)
    inputs = tiny_inputs(model, num_images=2)
    return model, certify(model, inputs["pixel_values"], n=64, epsilon=[0.05, 0.1], alpha=0.01, bound="bernstein",
                              reference="clean")


def test_save_pretrained_writes_a_card_whose_model_index_parses_back(certified, tmp_path):
    model, certificates = certified
    model.save_pretrained(tmp_path, certificates=certificates, dataset_name="tiny random images")
    assert {"README.md", "config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    card = ModelCard.load(tmp_path / "README.md")
    results = {r.metric_name: r for r in card.data.eval_results}
    expected = certified_cosine([c.score_lower for c in certificates], [c.sigma for c in certificates], [0.05, 0.1])
    fcsb = results["certified cosine (FCSB) @ ε=0.05 (σ=0.25)"]
    assert fcsb.metric_value == pytest.approx(expected["certified_cosine@0.05"])
    assert fcsb.metric_args == {"sigma": 0.25, "n": 64, "alpha": 0.01, "bound": "bernstein",
                                "noise_space": "pixel [0,1], l2", "num_images": 2, "epsilon": 0.05,
                                "reference": "clean", "seed": certificates[0].seed, "dtype": "float32",
                                "resolution": [56, 56], "centered": False}
    assert len({c.seed for c in certificates}) == 1  # one call, one seed: stated once
    assert "from_pretrained(" in card.text and "hf-feature-smoothing" in card.data.tags
    assert "cos(f̂(x'), f(x)) ≥ FCSB" in card.text and "(bernstein)" in card.text  # `reference="clean"`, as made


def test_the_card_states_what_each_kind_of_certificate_certifies(certified):
    model, certificates = certified
    smoothed = [dict(c.to_dict(), reference="smoothed") for c in certificates]
    text = build_model_card("org/x", certificates=smoothed).text
    assert "cos(f̂(x'), v) ≥ FCSB" in text and "direction of f̂(x) estimated from n0" in text
    answer = {"sigma": 0.5, "n": 200, "n0": 16, "alpha": 0.001, "bound": "betting", "noise_space": "pixel [0,1], l2",
              "method": "vote", "answer": 3, "label": 3, "radius": 0.6, "candidates": ["A 3", "A 4"],
              "candidates_digest": "c" * 16, "prompt_digest": "p" * 16, "booster": None, "booster_digest": None,
              "base_classifier": "argmax"}
    text = build_model_card("org/x", certificates=[answer]).text
    assert "answer among the candidate answers" in text and "σ·Φ⁻¹(p̲_A)" in text and "FCSB" not in text


def test_prediction_certificates_become_certified_accuracy():
    rows = [{"prediction": 1, "label": 1, "radius": 0.3, "sigma": 0.25, "n": 100, "alpha": 0.001, "bound": "bernstein",
             "noise_space": "pixel [0,1], l2"},
            {"prediction": None, "label": 0, "radius": 0.0, "sigma": 0.25, "n": 100, "alpha": 0.001,
             "bound": "bernstein", "noise_space": "pixel [0,1], l2"}]
    results = {r.metric_args.get("radius"): r.metric_value for r in certificate_eval_results(rows, "toy")
               if r.metric_type == "certified_accuracy"}
    assert results == {0.0: 0.5, 0.05: 0.5, 0.1: 0.5, 0.25: 0.5, 0.5: 0.0, 1.0: 0.0}


def test_answer_and_vote_certificates_name_their_method_candidates_and_targets():
    base = {"sigma": 0.5, "n": 200, "n0": 16, "alpha": 0.001, "bound": "betting", "noise_space": "pixel [0,1], l2",
            "method": "vote", "target_radius": 0.5}
    answers = [{**base, "answer": 3, "label": 3, "radius": 0.6, "candidates": ["A 3", "A 4"],
                "candidates_digest": "c" * 16, "prompt_digest": "p" * 16, "booster": "/home/me/gsb",
                "booster_digest": "b" * 16, "base_classifier": "argmax", "n_used": 120},
               {**base, "answer": None, "label": 4, "radius": 0.0, "candidates": ["A 3", "A 4"],
                "candidates_digest": "c" * 16, "prompt_digest": "p" * 16, "booster": "/home/me/gsb",
                "booster_digest": "b" * 16, "base_classifier": "argmax", "n_used": 200}]
    results = certificate_eval_results(answers, "digits", radii=(0.5, 1.0))
    by_name = {r.metric_name: r for r in results}
    setting = "σ=0.5, vote, answers cccccccc, booster bbbbbbbb, sequential, target radius ≥ 0.5, n ≤ 200"
    at_half = by_name[f"certified answer accuracy @ r=0.5 ({setting})"]
    # past the target radius sampling stopped: no accuracy is reported there (it would count those stops as failures)
    assert [r.metric_args.get("radius") for r in results if r.metric_type == "certified_accuracy"] == [0.5]
    assert at_half.metric_value == 0.5 and at_half.task_type == "visual-question-answering"
    assert at_half.metric_args["candidates"] == ["A 3", "A 4"] and at_half.metric_args["booster"] == "gsb"
    assert at_half.metric_args["mean_n_used"] == 160 and at_half.metric_args["n0"] == 16
    assert by_name[f"abstain rate ({setting})"].metric_value == 0.5
    plain = [{**a, "booster": None, "booster_digest": None} for a in answers]  # the same answers without a booster
    assert certificate_eval_results(plain, "digits", radii=(0.5,))[0].metric_name == (
        f"certified answer accuracy @ r=0.5 ({setting.replace('booster bbbbbbbb', 'no booster')})")
    votes = [{k: v for k, v in a.items() if k not in ("answer", "candidates_digest", "booster", "booster_digest")}
             | {"prediction": a["answer"]} for a in answers]
    (vote, _) = certificate_eval_results(votes, "d", radii=(0.5,))
    assert vote.metric_name == "certified accuracy @ r=0.5 (σ=0.5, vote, sequential, target radius ≥ 0.5, n ≤ 200)"
    assert vote.task_type == "image-classification" and vote.metric_value == 0.5
    with pytest.raises(ValueError, match="Mix of answer and prediction"):
        certificate_eval_results([answers[0], votes[1]], "d")
    with pytest.raises(ValueError, match="prototypes"):  # two predictors are never pooled into one entry
        certificate_eval_results([{**votes[0], "prototypes_sha256": "a" * 64}, {**votes[1], "prototypes_sha256": "b" * 64}],
                                 "d")
    with pytest.raises(ValueError, match="prototypes"):  # the API's certificates name their prototypes tensor
        certificate_eval_results([{**votes[0], "prototypes_digest": "a" * 16}, {**votes[1], "prototypes_digest": "b" * 16}],
                                 "d")
    (named, _) = certificate_eval_results([votes[0], {**votes[1], "prototypes_digest": "a" * 16}], "d", radii=(0.5,))
    assert "prototypes aaaaaaaa" in named.metric_name and named.metric_args["prototypes_digest"] == "a" * 16


def test_certify_prediction_names_its_prototypes():
    """The digest of the prototypes tensor (shape and values) is in every prediction certificate, so two predictors'
    certificates made through the API are never pooled."""
    encoder = ToyEncoder("sign")
    tower = hfs.SmoothedVisionTower(encoder, hfs.FeatureSmoothingConfig(sigma=0.25))
    prototypes = torch.stack([encoder.u.data, -encoder.u.data])
    digests = {method: {c.prototypes_digest for c in certify_prediction(tower, toy_images([0.1, 0.2]), prototypes,
                                                                          n0=4, n=8, seed=0, method=method)}
               for method in ("vote", "margin")}
    assert digests["vote"] == digests["margin"] and len(digests["vote"]) == 1 and None not in digests["vote"]
    (other,) = certify_prediction(tower, toy_images([0.1]), prototypes.flip(0), n0=4, n=8, seed=0)
    assert {other.prototypes_digest} != digests["vote"]


def test_mixed_settings_are_refused(certified):
    _, certificates = certified
    other = dict(certificates[0].to_dict(), sigma=0.5)
    with pytest.raises(ValueError, match="differ in σ"):
        build_model_card("org/x", certificates=[certificates[1], other])
    for change in ({"dtype": "bfloat16"}, {"centered": True}, {"reference": "smoothed"},  # never pooled
                   {"noise_space": "processed, l2"}):
        with pytest.raises(ValueError, match="compute dtype, centring, reference"):
            build_model_card("org/x", certificates=[certificates[1], dict(certificates[0].to_dict(), **change)])


class RecordingApi:
    """Stands in for `HfApi`: the upload path is isolated, nothing leaves the machine."""

    def __init__(self, target):
        self.target, self.calls, self.kwargs = target, [], {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id))
        self.kwargs["create_repo"] = kwargs
        return RepoUrl(f"https://hub.invalid/{repo_id}", endpoint="https://hub.invalid")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id))
        self.kwargs["create_branch"] = kwargs

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        self.calls.append(("upload_folder", repo_id))
        self.kwargs["upload_folder"] = kwargs
        shutil.copytree(folder_path, self.target)
        return "commit"


def test_push_to_hub_uploads_weights_config_and_certified_card(certified, tmp_path):
    model, certificates = certified
    api = RecordingApi(tmp_path / "uploaded")
    assert model.push_to_hub("org/certified-llava", certificates=certificates, api=api) == "commit"
    assert api.calls == [("create_repo", "org/certified-llava"), ("upload_folder", "org/certified-llava")]
    files = set(os.listdir(tmp_path / "uploaded"))
    assert {"README.md", "config.json", "model.safetensors"} <= files and not any(f.endswith(".bin") for f in files)
    card = ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert card.data.model_name == "certified-llava" and card.data.eval_results
    assert 'from_pretrained("org/certified-llava")' in card.text
    config = json.loads((tmp_path / "uploaded" / "config.json").read_text())
    assert config["feature_smoothing"]["sigma"] == 0.25


def test_booster_card_and_push(tmp_path):
    from hf_feature_smoothing.hub.sharing import push_certified_to_hub

    peft_model = hfs.add_booster(tiny_smoothed_model("llava", num_samples=2))
    api = RecordingApi(tmp_path / "uploaded")
    push_certified_to_hub(peft_model, "org/gsb", api=api)
    assert sorted(os.listdir(tmp_path / "uploaded")) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors"]
    card = ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert card.data.library_name == "peft" and "PeftModel.from_pretrained(base_model, \"org/gsb\")" in card.text


def test_evaluate_metric_loads_offline_and_matches_summary(tmp_path):
    code = (
        "import hf_feature_smoothing.metrics as m, json\n"
        "c = m.load('certified_robustness', 'cosine')\n"
        "c.add_batch(score_lower=[0.9, 0.4, 0.7], sigma=[0.25, 0.25, 0.5])\n"
        "a = m.load('certified_robustness', 'accuracy')\n"
        "print(json.dumps([c.compute(epsilons=[0.0, 0.1]), a.compute(prediction=[1, -1], label=[1, 0], radius=[0.2, 0.0],"
        " radii=[0.0, 0.3]), m.accuracy_inputs([{'answer': 1, 'label': 1, 'radius': 0.2},"
        " {'answer': None, 'label': 0, 'radius': 0.0}])]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    cosine, accuracy, answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers == {"prediction": [1, -1], "label": [1, 0], "radius": [0.2, 0.0]}  # answer rows, as the metric reads
    assert cosine == certified_cosine([0.9, 0.4, 0.7], [0.25, 0.25, 0.5], [0.0, 0.1])
    assert cosine["certified_cosine@0"] == pytest.approx((0.8 + 0.0 + 0.4) / 3)
    assert accuracy == certified_accuracy([1, None], [1, 0], [0.2, 0.0], [0.0, 0.3]) == {
        "certified_accuracy@0": 0.5, "certified_accuracy@0.3": 0.0, "abstain_rate": 0.5}


def test_accuracy_inputs_refuse_what_has_no_accuracy():
    from hf_feature_smoothing.metrics import accuracy_inputs

    with pytest.raises(ValueError, match="certificate 1 has no `label`"):
        accuracy_inputs([{"prediction": 0, "label": 0, "radius": 0.1}, {"prediction": 1, "label": None, "radius": 0}])
    with pytest.raises(ValueError, match="feature certificate"):
        accuracy_inputs([{"score_lower": 0.9, "sigma": 0.25}])
    with pytest.raises(ValueError, match="row 0 .* is `skipped`"):
        accuracy_inputs([{"key": "a.png", "status": "skipped", "reason": "not an image"}])
    with pytest.raises(ValueError, match="differ in σ"):  # two settings are two numbers, as in `model-index`
        accuracy_inputs([{"prediction": 0, "label": 0, "radius": 0.1, "sigma": 0.25},
                         {"prediction": 0, "label": 0, "radius": 0.1, "sigma": 0.5}])
    stopped = [{"answer": 1, "label": 1, "radius": 0.26, "target_radius": 0.25, "stop": "target"}] * 4
    with pytest.raises(ValueError, match="target radius 0.25: pass the radii"):
        accuracy_inputs(stopped)
    with pytest.raises(ValueError, match=r"\[0.5\] lies beyond the certificates' target radius 0.25"):
        accuracy_inputs(stopped, epsilon=[0, 0.25, 0.5])
    assert accuracy_inputs(stopped, epsilon=[0, 0.25])["epsilon"] == [0.0, 0.25]
    assert "epsilon" not in accuracy_inputs([{"prediction": 0, "label": 0, "radius": 0.1}])  # as before


def test_no_pickle_loading_in_the_package():
    import pathlib

    root = pathlib.Path(hfs.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path, line)
    assert torch.__version__  # torch ≥ 2.6 defaults torch.load to weights_only=True as well


def test_push_to_hub_takes_the_stock_arguments(certified, tmp_path):
    model, certificates = certified
    api = RecordingApi(tmp_path / "uploaded")
    model.push_to_hub("org/x", certificates=certificates, commit_message="msg", commit_description="desc", private=True,
                      tags=["my-tag"], max_shard_size="300KB", safe_serialization=True, revision="dev", create_pr=True,
                      api=api)
    assert api.calls == [("create_repo", "org/x"), ("create_branch", "org/x"), ("upload_folder", "org/x")]
    assert api.kwargs["create_repo"]["private"] is True and api.kwargs["create_branch"]["branch"] == "dev"
    assert {k: api.kwargs["upload_folder"][k] for k in ("commit_message", "commit_description", "revision",
                                                         "create_pr")} == {
        "commit_message": "msg", "commit_description": "desc", "revision": "dev", "create_pr": True}
    files = set(os.listdir(tmp_path / "uploaded"))
    assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 1
    card = ModelCard.load(tmp_path / "uploaded" / "README.md")
    assert "my-tag" in card.data.tags and card.data.eval_results
    with pytest.raises(ValueError, match="safe_serialization"):
        model.push_to_hub("org/x", safe_serialization=False, api=RecordingApi(tmp_path / "never"))


def test_save_pretrained_push_to_hub_uploads_the_folder_with_its_card(certified, tmp_path):
    model, certificates = certified
    api = RecordingApi(tmp_path / "uploaded")
    model.save_pretrained(tmp_path / "local", certificates=certificates, push_to_hub=True, repo_id="org/y",
                          commit_message="first", api=api)
    assert api.calls == [("create_repo", "org/y"), ("upload_folder", "org/y")]
    assert api.kwargs["upload_folder"]["commit_message"] == "first"
    local, uploaded = (tmp_path / "local" / "README.md").read_text(), (tmp_path / "uploaded" / "README.md").read_text()
    assert local == uploaded and 'from_pretrained("org/y")' in uploaded and "certified cosine" in uploaded


def test_attack_table_goes_into_model_index_and_the_card(certified, tmp_path):
    from hf_feature_smoothing.hub.sharing import attack_eval_results, write_card_atomically

    table = [
        {"variant": "plain", "mode": "clean", "norm": "linf", "epsilon": 0.0, "images": 30, "accuracy": 0.9,
         "accuracy_ci": (0.8, 1.0), "success": 0.0, "success_ci": (0.0, 0.0)},
        {"variant": "smoothed", "mode": "targeted", "norm": "linf", "epsilon": 8 / 255, "images": 30,
         "accuracy": 0.7, "accuracy_ci": (0.5, 0.85), "success": 0.1, "success_ci": (0.0, 0.2)},
    ]
    params = {"sigma": 0.12, "num_samples": 8, "steps": 10}
    extra = attack_eval_results(table, params, "digits")
    assert [r.metric_type for r in extra] == ["accuracy", "accuracy", "attack_success_rate"]
    assert extra[-1].metric_args["sigma"] == 0.12 and extra[-1].metric_args["ci95"] == [0.0, 0.2]
    model, certificates = certified
    card = build_model_card("org/m", smoothing=model.smoothing_config, certificates=certificates, dataset_name="d",
                            extra_results=extra, extra_markdown="## Under attack\n\n| a | b |")
    write_card_atomically(card, tmp_path)
    loaded = ModelCard.load(tmp_path / "README.md")
    types = [r.metric_type for r in loaded.data.eval_results]
    assert "certified_cosine" in types and types.count("attack_success_rate") == 1
    assert loaded.text.rstrip().endswith("| a | b |")


@pytest.mark.parametrize("given, shared", [("/home/me/gsb", "gsb"), ("./outputs/gsb/", "gsb"), ("runs/a/gsb", "gsb"),
                                           ("C:\\boosters\\gsb", "gsb"), ("~/gsb", "gsb"), ("org/gsb", "org/gsb"),
                                           ("llava-dinov2-smollm2-gsb", "llava-dinov2-smollm2-gsb"), (None, None)])
def test_run_titles_and_cards_name_a_booster_alike_without_machine_paths(tmp_path, given, shared):
    """A local booster folder reads as its last part (its digest identifies it), a Hub id or alias as given, in the
    report's run title and in the card's `metric_args` alike."""
    from hf_feature_smoothing.runs.report import RunGroup

    params = {"model": "m", "booster": given, "sigma": 0.5, "n": 8, "alpha": 0.01, "method": "vote",
              "candidates_digest": "c" * 16}
    title = RunGroup("certify-answer", params, [tmp_path], []).label
    assert title.startswith(f"certify-answer m + {shared} vote" if given else "certify-answer m vote")
    row = {"sigma": 0.5, "n": 8, "n0": 2, "alpha": 0.01, "bound": "betting", "noise_space": "pixel [0,1], l2",
           "method": "vote", "answer": 1, "label": 1, "radius": 0.1, "candidates": ["A 1", "A 2"],
           "candidates_digest": "c" * 16, "prompt_digest": "p" * 16, "booster": given,
           "booster_digest": "b" * 16 if given else None, "base_classifier": "argmax"}
    assert certificate_eval_results([row], "digits", radii=(0.1,))[0].metric_args["booster"] == shared
