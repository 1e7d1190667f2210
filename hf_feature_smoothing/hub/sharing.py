"""Sharing certified checkpoints: model cards whose `model-index` carries the certificates, atomic saving, push."""

import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from ..booster.layer import booster_layers
from ..booster.loading import record_smoothing, save_booster_adapter
from ..certification.certificates import answers_label, measured_radii, prototypes_label, sequential_label
from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.hub_io import register_hub_io
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..statistics.advisories import advisories_for
from ..statistics.aggregates import REPORT_RADII, certified_accuracy, certified_cosine
from ..utils.atomic import atomic_directory, write_atomically
from ..utils.logging import get_logger
from ..utils.names import shared_name
from ..version import __version__


logger = get_logger(__name__)
TEMPLATE = Path(__file__).parent / "model_card_templates" / "certified_model.md"
TAGS = ["hf-feature-smoothing", "certified-robustness", "feature-space-smoothing"]


def certificate_kind(row: dict) -> str:
    """`"answer"` ([`AnswerCertificate`]), `"prediction"` ([`PredictionCertificate`]) or `"feature"`."""
    return "answer" if "answer" in row else "prediction" if "prediction" in row else "feature"


def check_one_setting(rows: list[dict]) -> None:
    """Refuse certificate dicts of more than one kind or setting: one aggregate (a card entry, a metric) is one
    certified function, sampled one way."""
    kinds = {certificate_kind(r) for r in rows}
    if len(kinds) > 1:
        raise ValueError(f"Mix of {' and '.join(sorted(kinds))} certificates: share one kind per call.")
    if len({(r.get("sigma"), r.get("n"), r.get("n0"), r.get("alpha"), r.get("bound"), r.get("target_cosine"),
             r.get("target_radius"), r.get("method"), r.get("candidates_digest"), r.get("prompt_digest"),
             r.get("booster_digest"), r.get("booster"), r.get("model"), r.get("dtype"), r.get("centered"), r.get("reference"),
             r.get("alpha_split"), r.get("noise_space"), r.get("prototypes_sha256"), bool(r.get("futility")))
            for r in rows}) > 1 or len(
            {r["prototypes_digest"] for r in rows if r.get("prototypes_digest")}) > 1:  # older rows have none
        raise ValueError("Certificates differ in σ, n, n0, α, bound, method, sequential target or futility stop, "
                         "compute dtype, centring, reference, α split, noise space, prototypes, booster, or (answers) "
                         "the candidates, prompt or model: aggregate one setting at a time.")


def _as_dicts(certificates) -> list[dict]:
    rows = [c if isinstance(c, dict) else c.to_dict() for c in certificates or []]
    check_one_setting(rows)
    if {certificate_kind(r) for r in rows} & {"answer", "prediction"} and any(r.get("label") is None for r in rows):
        raise ValueError("Certified accuracy needs each certificate's reference label: pass `labels=` to "
                         "`certify_prediction` or `label=` to `certify_answer`, or add `label` (the index of the "
                         "correct class or candidate) to every certificate's dict (`hf-fs` rows carry it).")
    for advisory, count in Counter(a for r in rows for a in advisories_for(r)).items():
        logger.warning(f"{count} of {len(rows)} certificates are affected by `{advisory.name}`: {advisory.summary}")
    return rows


def certificate_eval_results(certificates, dataset_name: str, dataset_type: str | None = None,
                             task_type: str = "image-feature-extraction",
                             radii: Sequence[float] = REPORT_RADII) -> list[EvalResult]:
    """`model-index` entries for a list of [`FeatureCertificate`] (certified cosine at each of their ε, mean S_low,
    abstain rate), [`PredictionCertificate`] or [`AnswerCertificate`] (certified accuracy at each of `radii`, up to the
    target radius of sequential ones; their default `task_type` is image classification, visual question answering for
    answers). Every entry's `metric_args` states σ, ε or r, n, α, the bound, the noise space and, where the
    certificates carry them, the seed, compute dtype, resolution and centring; feature entries the reference;
    prediction and answer entries the method (`"margin"` / `"vote"`, margin entries the α split) and n0, answer entries
    the candidate answers (texts and digest), the prompt digest and the booster, and name the candidates' and booster's
    digests; prediction entries state the predictor's `prototypes_digest` (of the prototypes tensor) and, for rows read
    by [`group_runs`], `prototypes_sha256` (of the `--prototypes` file in their run's header), and name it shortened
    (the file's digest where there is one). Sequential certificates (stopped at `target_cosine` / `target_radius`) say
    so in every entry's name ("sequential, target …, n ≤ N"; ", futility stop" with `futility`) and `metric_args`
    (the targets, `futility`, `n` as the most samples and the mean `n_used`)."""
    rows = _as_dicts(certificates)
    if not rows:
        return []
    first = rows[0]
    kind = certificate_kind(first)
    args = {"sigma": first["sigma"], "n": first["n"], "alpha": first["alpha"], "bound": first["bound"],
            "noise_space": first["noise_space"], "num_images": len(rows)}
    args.update({key: first[key] for key in ("dtype", "centered") if key in first})  # one value: `_as_dicts`
    for key in ("seed", "resolution"):  # each row's own; distinct values listed if they differ
        values = [r[key] for r in rows if key in r]
        if values:
            values = [list(v) if isinstance(v, tuple) else v for v in values]  # YAML-safe
            distinct = [v for i, v in enumerate(values) if v not in values[:i]]
            args[key] = distinct[0] if len(distinct) == 1 else distinct
    setting = f"σ={first['sigma']}"
    if kind != "feature":
        args.update(method=first.get("method", "margin"), n0=first.get("n0"))
        if args["method"] == "margin" and "alpha_split" in first:  # one value: `_as_dicts`
            args["alpha_split"] = first["alpha_split"]
        setting += f", {args['method']}"
        digest = next((r["prototypes_digest"] for r in rows if r.get("prototypes_digest")), None)  # one: `_as_dicts`
        if digest:
            args["prototypes_digest"] = digest
        if first.get("prototypes_sha256"):  # one value: `_as_dicts`; two predictors' entries never share a name
            args["prototypes_sha256"] = first["prototypes_sha256"]
        named = first.get("prototypes_sha256") or digest  # the prototypes file's digest, else the tensor's
        if named:
            setting += f", {prototypes_label(named)}"
    if kind == "answer":
        args.update({key: first[key] for key in ("candidates", "candidates_digest", "prompt_digest", "booster_digest",
                                                 "base_classifier")})
        args["booster"] = shared_name(first["booster"])  # the digest identifies the weights
        setting += f", {answers_label(first)}"  # one value each: `_as_dicts`
    elif first.get("booster"):  # a feature or prediction run of a boosted model (`hf-fs report` adds its --booster)
        args["booster"] = shared_name(first["booster"])
        setting += f", booster {args['booster']}"
    if task_type == "image-feature-extraction" and kind != "feature":  # the default names the feature task
        task_type = "visual-question-answering" if kind == "answer" else "image-classification"
    sequential = sequential_label(first)
    if sequential:
        args.update(sequential=True, target_cosine=first.get("target_cosine"),
                    target_radius=first.get("target_radius"), futility=bool(first.get("futility")),
                    mean_n_used=sum(r.get("n_used") or r["n"] for r in rows) / len(rows))
        setting += f", {sequential}"
    common = dict(task_type=task_type, dataset_type=dataset_type or dataset_name, dataset_name=dataset_name)
    results = []
    if kind != "feature":
        radii = measured_radii(first, radii)  # a sequential run's: up to its target radius
        accuracy = certified_accuracy([r[kind] for r in rows], [r["label"] for r in rows],
                                      [r["radius"] for r in rows], radii)
        what = "certified answer accuracy" if kind == "answer" else "certified accuracy"
        for r in radii:
            value = accuracy[f"certified_accuracy@{r:g}"]
            results.append(EvalResult(**common, metric_type="certified_accuracy", metric_value=value,
                                      metric_name=f"{what} @ r={r:g} ({setting})",
                                      metric_args={**args, "radius": r}))
    else:
        epsilons = first["epsilon"]
        cosine = certified_cosine([r["score_lower"] for r in rows], [r["sigma"] for r in rows], epsilons)
        for eps in epsilons:
            results.append(EvalResult(**common, metric_type="certified_cosine",
                                      metric_value=cosine[f"certified_cosine@{eps:g}"],
                                      metric_name=f"certified cosine (FCSB) @ ε={eps:g} ({setting})",
                                      metric_args={**args, "epsilon": eps, "reference": first["reference"]}))
        results.append(EvalResult(**common, metric_type="gaussian_robustness_score_lower",
                                  metric_value=sum(r["score_lower"] for r in rows) / len(rows),
                                  metric_name=f"mean S_low ({setting})", metric_args=args))
    results.append(EvalResult(**common, metric_type="abstain_rate", metric_value=sum(
        bool(r["abstain"]) if kind == "feature" else r[kind] is None for r in rows) / len(rows),
        metric_name=f"abstain rate ({setting})", metric_args=args))
    return results


def attack_eval_results(table: Sequence[dict], params: dict, dataset_name: str,
                        task_type: str = "visual-question-answering") -> list[EvalResult]:
    """`model-index` entries for an end-to-end attack table (one row per variant × attack × budget, as written by
    `benchmarks/llava_headline.py`: `variant`, `mode`, `norm`, `epsilon`, `images`, `accuracy`, `success` and their
    95% bootstrap intervals). Each entry's `metric_args` states the variant, the attack, its budget and norm, and the
    attack and smoothing parameters in `params` (σ, n, steps, EOT draws, ...)."""
    results = []
    for row in table:
        budget = "clean" if row["mode"] == "clean" else (
            f"linf {round(row['epsilon'] * 255)}/255" if row["norm"] == "linf" else f"l2 {row['epsilon']:g}")
        args = {**params, "variant": row["variant"], "attack": row["mode"], "norm": row["norm"],
                "epsilon": row["epsilon"], "num_images": row["images"]}
        common = dict(task_type=task_type, dataset_type=dataset_name, dataset_name=dataset_name)
        name = f"{row['variant']}, {row['mode']}" + ("" if row["mode"] == "clean" else f", {budget}")
        results.append(EvalResult(**common, metric_type="accuracy", metric_value=row["accuracy"],
                                  metric_name=f"answer accuracy ({name})",
                                  metric_args={**args, "ci95": list(row["accuracy_ci"])}))
        if row["mode"] != "clean":
            results.append(EvalResult(**common, metric_type="attack_success_rate", metric_value=row["success"],
                                      metric_name=f"attack success rate ({name})",
                                      metric_args={**args, "ci95": list(row["success_ci"])}))
    return results


def _results_table(results: list[EvalResult]) -> str:
    if not results:
        return "No certificates were attached when this card was written (`certificates=` in `save_pretrained`)."
    lines = ["| metric | value | σ | n | α |", "|---|---|---|---|---|"]
    for r in results:
        a = r.metric_args
        n = f"≤ {a['n']} (sequential)" if a.get("sequential") else a["n"]
        lines.append(f"| {r.metric_name} | {r.metric_value:.4f} | {a['sigma']} | {n} | {a['alpha']} |")
    return "\n".join(lines)


def build_model_card(
    repo_id: str,
    *,
    base_model: str | None = None,
    smoothing: FeatureSmoothingConfig | dict | None = None,
    certificates: Sequence | None = None,
    dataset_name: str = "custom images",
    dataset_type: str | None = None,
    booster: bool = False,
    model_class: str = "AutoModelForImageTextToText",
    tags: Sequence[str] | None = None,
    extra_results: Sequence[EvalResult] = (),
    extra_markdown: str = "",
) -> ModelCard:
    """A model card for a smoothed model (`booster=False`) or a booster adapter (`booster=True`) from the package
    template, with the certificates in `model-index`; `extra_results` (e.g. [`attack_eval_results`]) are added to
    `model-index` and `extra_markdown` (e.g. the attack table) is appended to the card."""
    results = certificate_eval_results(certificates, dataset_name, dataset_type)
    if booster:
        snippet = (f"import hf_feature_smoothing  # registers the booster method with PEFT\n"
                   f"from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, \"{repo_id}\")")
        title, library = f"Gaussian Smoothness Booster: {repo_id}", "peft"
        description = ("A Gaussian Smoothness Booster (GSB) adapter: a noise-conditioned residual feature mapper that "
                       "raises the Gaussian robustness score of a frozen vision tower. Only the booster weights are "
                       "in `adapter_model.safetensors`.")
    elif model_class == "SmoothedVisionTower":
        snippet = (f"from hf_feature_smoothing import SmoothedVisionTower\n"
                   f"tower = SmoothedVisionTower.from_pretrained(\"{repo_id}\")")
        title, library = f"Certified smoothed vision encoder: {repo_id}", "transformers"
        description = "A vision encoder whose features are certified by Feature-space Smoothing (FS)."
    else:
        snippet = (f"import hf_feature_smoothing  # registers the smoothed model types\n"
                   f"from transformers import {model_class}\nmodel = {model_class}.from_pretrained(\"{repo_id}\")")
        title, library = f"Certified smoothed model: {repo_id}", "transformers"
        description = "A vision-language model whose image features are certified by Feature-space Smoothing (FS)."
    config = FeatureSmoothingConfig.from_dict(smoothing or {}) if smoothing is not None else None
    if config is not None:
        booster_cell = config.booster or "—"
        if config.booster_config is not None:
            booster_cell = f"{config.booster or 'adapter'} (`{config.booster_config['adapter_name']}`, in the weights)"
        table = "| σ | n (forward samples, `num_samples`) | seed | smoothed features | booster |\n|---|---|---|---|---|\n"
        table += (f"| {config.sigma} | {config.num_samples} | {config.seed} | {config.smoothed_features} | "
                  f"{booster_cell} |\n\nThe complete smoothing configuration (`feature_smoothing`), as saved:\n\n"
                  f"```json\n{json.dumps(config.to_dict(), indent=1, sort_keys=True)}\n```")
    else:
        table = "σ is chosen when the booster is used (`FeatureSmoothingConfig(sigma=...)`); see the certificates."
    rows = _as_dicts(certificates)
    card_data = ModelCardData(
        library_name=library, base_model=base_model,
        tags=list(dict.fromkeys([*TAGS, *(["gsb", "peft"] if booster else []), *(tags or [])])),
        model_name=repo_id.split("/")[-1], eval_results=(results + list(extra_results)) or None,
    )
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), title=title, description=description, load_snippet=snippet,
        noise_space=rows[0]["noise_space"] if rows else "pixel [0,1], l2", smoothing_table=table,
        certificates_text=certificates_text(rows), results_table=_results_table(results),
        dataset_name=dataset_name, library_version=__version__,
    )
    if extra_markdown:
        card.text = card.text.rstrip("\n") + "\n\n" + extra_markdown.strip("\n") + "\n"
    return card


def certificates_text(rows: list[dict]) -> str:
    """The card's statement of what its certificates (of one kind and setting) guarantee: the reference of feature
    certificates (`f(x)`, or the direction v of an n0-sample estimate of f̂(x)), the certified prediction or answer of
    the others."""
    first = rows[0] if rows else {"reference": "clean", "bound": "empirical Bernstein"}
    kind, bound = certificate_kind(first), first["bound"]
    if kind == "feature":
        if first.get("reference") == "clean":
            quantity, where = "cos(f̂(x'), f(x))", "f(x) is the clean feature"
        else:
            quantity, where = "cos(f̂(x'), v)", ("v is the direction of f̂(x) estimated from n0 noisy copies drawn "
                                                 "apart from the n that bound the score (`reference=\"smoothed\"`)")
        centred = " f is the feature centred on μ before normalising (`feature_center`)." if first.get("centered") else ""
        return (f"For every perturbation with ‖x' − x‖₂ ≤ ε (pixel [0, 1] units), {quantity} ≥ "
                f"FCSB = 2Φ(Φ⁻¹(S_low) − ε/σ) − 1, where {where} and S_low is a one-sided (1 − α) lower confidence "
                f"bound ({bound}) on the Gaussian robustness score from n noisy samples.{centred} Certified cosine is "
                "averaged over images with abstentions (S_low ≤ 1/2) and vacuous bounds counted as 0. The certificates "
                "are about the exact smoothed encoder f̂; the model's forward pass uses an estimate of it from "
                "`num_samples` noisy copies.")
    what = ("the model's answer among the candidate answers (its answer on one noisy copy x + δ, the base classifier)"
            if kind == "answer" else "the few-shot cosine predictor's class (its prototypes named in each entry)")
    how = ("Cohen et al.'s vote certificate: the top class chosen on n0 copies, a one-sided (1 − α) lower bound "
           f"p̲_A ({bound}) on its probability from n others, radius σ·Φ⁻¹(p̲_A)" if first.get("method", "margin") == "vote"
           else f"the FS margin certificate of the smoothed features' cosine scores ({bound} bounds at level α)")
    return (f"Each certificate certifies {what}: for every perturbation with ‖x' − x‖₂ ≤ r (pixel [0, 1] units) the "
            f"smoothed prediction stays the same, with r from {how}. Certified accuracy at r counts the images whose "
            "certified prediction is correct with a radius ≥ r; abstentions count as wrong.")


def write_card_atomically(card: ModelCard, directory: str | os.PathLike) -> Path:
    """Write `README.md` into `directory` atomically ([`~utils.atomic.write_atomically`]): a crash never leaves half
    a card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return write_atomically(directory / "README.md", str(card))


def _smoothing_and_kind(model) -> tuple[FeatureSmoothingConfig | None, bool, str | None, str]:
    """(live smoothing config, is a booster, base model name, class to load it with) of what is saved."""
    from peft import PeftModel

    if isinstance(model, SmoothedVisionTower):
        base = model.encoder
        name = getattr(getattr(base, "config", None), "_name_or_path", None) or None
        return model.config, False, name, "SmoothedVisionTower"
    booster = isinstance(model, PeftModel)
    base = model.get_base_model() if booster else model
    smoothing = getattr(getattr(base, "smoothed_vision_tower", None), "config", None)
    name = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    return smoothing, booster, name, "AutoModelForImageTextToText"


def _save_raw(model, folder: Path, **save_kwargs) -> None:
    """The model's own files (no card) into `folder`: a smoothed model's config and full weights, a booster
    `PeftModel`'s adapter (with the smoothing it runs under recorded in `adapter_config.json`), a tower's files."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        for config in model.peft_config.values():
            if hasattr(config, "smoothing"):
                record_smoothing(config, model)
        model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    elif hasattr(model, "_save_pretrained_raw"):
        model._save_pretrained_raw(folder, **save_kwargs)
    elif getattr(model, "_hf_peft_config_loaded", False) and booster_layers(model):
        # a stand-alone model with a booster placed in place (`load_booster`): its adapter, the files transformers'
        # adapter-only `save_pretrained` writes (which from transformers 5.24 on requires an unreleased peft)
        active = booster_layers(model)[0].active_adapters
        if len(active) != 1:
            raise ValueError(f"The model has {len(active)} active boosters {active}; save one at a time.")
        record_smoothing(model.peft_config[active[0]], model)
        save_booster_adapter(model, folder, active[0])
    else:
        model.save_pretrained(folder, **save_kwargs)


def save_certified(model, save_directory: str | os.PathLike, *, certificates: Sequence | None = None,
                   repo_id: str | None = None, dataset_name: str = "custom images", dataset_type: str | None = None,
                   tags: Sequence[str] | None = None, safe_serialization: bool = True, push_to_hub: bool = False,
                   api: HfApi | None = None, **save_kwargs) -> Path:
    """
    Save a smoothed model, a booster `PeftModel` or a `SmoothedVisionTower` with a model card carrying
    `certificates` in its `model-index`, **atomically**: everything is written into a temporary sibling folder that
    then replaces `save_directory` in one step (a crash leaves the previous checkpoint or the new one, never a mix;
    files of the previous folder the save does not own, e.g. a processor, are kept). The card is generated from the
    live smoothing config after the weights are written. Returns the folder.

    With `push_to_hub=True` the finished folder is uploaded (see [`upload_certified_folder`]); `repo_id` (default:
    the folder name), `commit_message`, `commit_description`, `private`, `token`, `revision` and `create_pr` go to
    the upload, `api` replaces `HfApi(token=token)`.
    """
    if not safe_serialization:
        raise ValueError("`safe_serialization=False` is not supported: hf_feature_smoothing writes safetensors only "
                         "(pickled `.bin` weights can run code when loaded).")
    upload = {k: save_kwargs.pop(k) for k in ("commit_message", "commit_description", "private", "token",
                                              "revision", "create_pr") if k in save_kwargs}
    if save_kwargs.pop("is_main_process", True) is False:
        return Path(save_directory)
    smoothing, booster, base_model, model_class = _smoothing_and_kind(model)
    with atomic_directory(save_directory) as folder:
        _save_raw(model, folder, **save_kwargs)
        card = build_model_card(repo_id or Path(save_directory).name, base_model=base_model, smoothing=smoothing,
                                certificates=certificates, dataset_name=dataset_name, dataset_type=dataset_type,
                                booster=booster, tags=tags, model_class=model_class)
        card.save(folder / "README.md")
    if push_to_hub:
        upload_certified_folder(save_directory, repo_id or Path(save_directory).name, api=api, **upload)
    return Path(save_directory)


def upload_certified_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str | None = None,
                            commit_description: str | None = None, private: bool | None = None,
                            token: str | None = None, revision: str | None = None, create_pr: bool = False,
                            api: HfApi | None = None, create_repo: bool = True):
    """Create `repo_id` if needed (and the `revision` branch) and upload `folder` in one commit."""
    api = api or HfApi(token=token)
    if create_repo:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, create_pr=create_pr,
                             commit_message=commit_message or "Upload certified checkpoint (hf_feature_smoothing)",
                             commit_description=commit_description)


def push_certified_to_hub(model, repo_id: str, *, certificates: Sequence | None = None,
                          dataset_name: str = "custom images", dataset_type: str | None = None,
                          commit_message: str | None = None, commit_description: str | None = None,
                          private: bool | None = None, token: str | None = None, revision: str | None = None,
                          create_pr: bool = False, max_shard_size: int | str = "50GB", tags: Sequence[str] | None = None,
                          safe_serialization: bool = True, api: HfApi | None = None, **deprecated):
    """
    Save a smoothed model, booster or tower with its certified card to a temporary folder and upload it in one
    commit; the stock `push_to_hub` arguments keep their meaning (`max_shard_size` and `safe_serialization` for the
    save; `tags` are added to the card). `api` (default `HfApi(token=token)`) is the only thing that talks to the
    network: pass your own (a custom `endpoint`, or a test double) to redirect it.
    """
    from peft import PeftModel

    deprecated.pop("use_temp_dir", None)
    if deprecated:
        raise TypeError(f"push_to_hub() got unexpected keyword arguments {sorted(deprecated)}.")
    api = api or HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as parent:
        folder = Path(parent) / "checkpoint"
        kwargs = {} if isinstance(model, PeftModel) else {"max_shard_size": max_shard_size}
        save_certified(model, folder, certificates=certificates, repo_id=repo_id, dataset_name=dataset_name,
                       dataset_type=dataset_type, tags=tags, safe_serialization=safe_serialization, **kwargs)
        return upload_certified_folder(folder, repo_id, commit_message=commit_message,
                                       commit_description=commit_description, revision=revision,
                                       create_pr=create_pr, api=api, create_repo=False)


__all__ = ["build_model_card", "certificate_eval_results", "push_certified_to_hub", "save_certified",
           "upload_certified_folder", "write_card_atomically"]


register_hub_io(save_with_card=save_certified, push_with_card=push_certified_to_hub)
