"""Write the model card of the smoothed real-weight LLaVA (`model_cards/llava-dinov2-smollm2-fs/README.md`) from
finished runs, with the library's card builder: the feature certificates of an `hf-fs certify` run and the attack
table of `benchmarks/llava_headline.py` both go into `model-index`. Nothing is recomputed.

    hf-fs certify --model llava-dinov2-smollm2 --images digits:test --limit 30 --sigma 0.12 --n 256 --seed 0 \
        --output benchmarks/llava_certify.jsonl
    python benchmarks/llava_headline.py ...            # writes benchmarks/llava_headline.summary.json
    python benchmarks/llava_model_card.py

    python benchmarks/llava_model_card.py --certify-run benchmarks/llava_gsb_certify.jsonl \
        --output-dir model_cards/llava-dinov2-smollm2-fs-gsb --protocol-table benchmarks/llava_protocol.md

With a booster (`hf-fs certify ... --booster llava-dinov2-smollm2-gsb`), the card describes the smoothed + boosted
model: its `model-index` holds the certificates of that run and the attack rows of the `smoothed+gsb` variant at the
same σ with the same booster (plus the plain model's, the baseline); every row's arguments are its own run's.

`--prediction-runs` adds answer certificates (`hf-fs certify-answer` runs: certified answer accuracy per radius) and
prediction certificates of a cosine predictor (`hf-fs certify --prototypes` runs) to `model-index` and a table to the
card, each with its own σ, n, α, method and candidate set; a run of another σ or booster than the card's, or an
unfinished one, is refused.
"""

import argparse
import json
from pathlib import Path

from prediction_certificates import RADII  # the benchmark table's radii (this folder)

from hf_feature_smoothing import FeatureSmoothingConfig
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import REPO_ID, llava_checkpoint
from hf_feature_smoothing.hub.sharing import (
    attack_eval_results,
    build_model_card,
    certificate_eval_results,
    write_card_atomically,
)
from hf_feature_smoothing.runs.records import read_run
from hf_feature_smoothing.runs.report import group_runs, state_lines, summary_lines


WEAK_ATTACK_NOTE = (
    "**Read these rows as upper bounds on robustness.** They were measured with 10 APGD steps and one forward pass "
    "(8 noise draws) per gradient; stronger attacks (100 steps, EOT over ≥ 32 draws, worst case over an ensemble) "
    "succeed more often against the smoothed models (`benchmarks/RESULTS.md`, the field's attack protocol). "
    "The `model-index` attack rows carry their step and EOT settings.")


DATASET_TYPES = {"digits": "sklearn-digits", "textiles": "conformal-clip-data-textiles"}


def prediction_results(paths: list[str], card_params: dict) -> tuple[list, list[str]]:
    """`model-index` entries and summary tables of finished answer / prediction certificate runs made at the card's σ
    with its booster (anything else would describe another model than the card's)."""
    results, tables = [], []
    for group in group_runs(paths, group_by_params=True):
        if group.kind not in ("answer", "prediction"):
            raise SystemExit(f"{group.paths[0]}: a {group.kind} run; --prediction-runs takes `hf-fs certify-answer` "
                             f"and `hf-fs certify --prototypes` runs.")
        for key in ("model", "model_weights", "sigma", "booster"):
            if group.params.get(key) != card_params.get(key):
                raise SystemExit(f"{group.paths[0]}: {key} {group.params.get(key)!r}, but the card describes "
                                 f"{key} {card_params.get(key)!r}.")
        if not group.finished:
            raise SystemExit(f"{group.paths[0]}: unfinished ({state_lines(group)[0]}); finish it first.")
        task = "visual-question-answering" if group.kind == "answer" else "image-classification"
        source = group.rows[0].get("source") or {}  # rows carry their run's source (pooled runs may differ)
        dataset = f"{source.get('name', 'images')}, {source.get('split', '')} ({len(group.rows)} images)"
        results += certificate_eval_results([r for r in group.rows if r.get("label") is not None], dataset,
                                            dataset_type=DATASET_TYPES.get(source.get("name"), "images"),
                                            task_type=task, radii=RADII)
        tables.append("\n".join(summary_lines(group, radii=RADII)))
    return results, tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--certify-run", default="benchmarks/llava_certify.jsonl", help="`hf-fs certify` run file")
    parser.add_argument("--attacks", default="benchmarks/llava_headline.summary.json",
                        help="summary written by benchmarks/llava_headline.py")
    parser.add_argument("--attack-table", default="benchmarks/llava_headline.md", help="its markdown table")
    parser.add_argument("--protocol-table", default="",
                        help="table of benchmarks/llava_protocol.py (the field's protocol) measured on this card's "
                             "variant and σ, e.g. benchmarks/llava_protocol.md for the σ = 0.5 GSB card")
    parser.add_argument("--prediction-runs", nargs="*", default=[],
                        help="finished `hf-fs certify-answer` / `hf-fs certify --prototypes` run files at this card's "
                             "σ and booster (e.g. from benchmarks/prediction_certificates.py)")
    parser.add_argument("--output-dir", default="model_cards/llava-dinov2-smollm2-fs", help="where README.md goes")
    args = parser.parse_args()

    run = read_run(args.certify_run)
    rows = [r for r in run.rows if r.get("status") == "ok"]
    if not rows or run.bad:
        raise SystemExit(f"{args.certify_run}: {len(rows)} certificates, {len(run.bad)} bad lines; finish or repair it.")
    params = run.header["params"]
    booster = params.get("booster")
    summary = json.loads(Path(args.attacks).read_text())
    run_params = {r["run"]: r["params"] for r in summary["runs"]}
    variant = "smoothed+gsb" if booster else "smoothed"
    attacks = [r for r in summary["table"] if r["variant"] == "plain" or (
        r["variant"] == variant and r["sigma"] == params["sigma"] and r["booster"] == booster)]
    smoothed = [r for r in attacks if r["variant"] == variant]
    if not smoothed:
        raise SystemExit(f"No `{variant}` attack rows at σ={params['sigma']} (booster {booster}) in {args.attacks}: the "
                         "card must describe the smoothing its certificates were made with.")
    num_samples = {r["num_samples"] for r in smoothed}
    if len(num_samples) != 1:
        raise SystemExit(f"The `{variant}` attack rows mix n = {sorted(num_samples)}; the card describes one smoothing.")
    weights = json.loads((Path(llava_checkpoint()) / "config.json").read_text()).get("dtype", "float32")
    smoothing = FeatureSmoothingConfig(sigma=params["sigma"], num_samples=num_samples.pop(), booster=booster,
                                       autocast_dtype=None if params["dtype"] == weights else params["dtype"])
    extra = [result for run_id in dict.fromkeys(r["run"] for r in attacks)
             for result in attack_eval_results([r for r in attacks if r["run"] == run_id], run_params[run_id],
                                               "sklearn-digits")]
    predictions, extra_tables = prediction_results(args.prediction_runs, params)
    extra += predictions
    table = Path(args.attack_table).read_text()
    markdown = (f"## End-to-end attacks on the generated answer\n\n{WEAK_ATTACK_NOTE}\n\n{table}")
    if extra_tables:
        markdown += "\n## Certified answers and predictions\n\n" + "\n\n".join(extra_tables) + "\n"
    if args.protocol_table and Path(args.protocol_table).exists():
        markdown += (f"\n## Under the field's attack protocol (`benchmarks/llava_protocol.py`)\n\n"
                     f"{Path(args.protocol_table).read_text()}")
    card = build_model_card(
        f"{REPO_ID}-fs" + ("-gsb" if booster else ""), base_model=REPO_ID, smoothing=smoothing, certificates=rows,
        dataset_name=f"scikit-learn digits, held-out ({len(rows)} images)", dataset_type="sklearn-digits",
        tags=["llava", "dinov2", "smollm2"] + (["gaussian-smoothness-booster"] if booster else []),
        extra_results=extra, extra_markdown=markdown,
    )
    path = write_card_atomically(card, args.output_dir)
    print(f"card: {path}")


if __name__ == "__main__":
    main()
