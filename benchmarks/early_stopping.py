"""Early stopping of answer certificates on real data: a sequential `hf-fs certify-answer` run (`--target-radius`)
against the fixed-n run of the same images, model, booster, σ, n0, α and seed (at the same n, or a larger n for a
larger target). The sequential run stops an image's sampling once its anytime-valid bound certifies the target radius
("target") or can no longer reach it within n ("unreachable"), and with `--futility` once its upper confidence
sequence shows the target out of reach ("futile"); the table compares certified accuracy at the target, the copies
drawn and the seconds spent.

    hf-fs certify-answer --model llava-dinov2-smollm2 --candidates digits --dtype bfloat16 \\
        --booster llava-dinov2-smollm2-gsb --images digits:test --limit 100 --sigma 0.5 --n 500 --n0 16 \\
        --alpha 0.001 --seed 0 --target-radius 0.5 \\
        --output benchmarks/early_stopping/digits-answers-gsb-sigma0.5-target0.5-bfloat16.jsonl
    python benchmarks/early_stopping.py

The r = 1.0 run (n <= 4000, futility stops, float32 on a CPU without native bf16) against the same bf16 fixed cell:

    hf-fs certify-answer --model llava-dinov2-smollm2 --candidates digits --booster llava-dinov2-smollm2-gsb \\
        --images digits:test --limit 100 --sigma 0.5 --n0 16 --alpha 0.001 --seed 0 --n 4000 \\
        --target-radius 1.0 --futility \\
        --output benchmarks/early_stopping/digits-answers-gsb-sigma0.5-target1.0-n4000-futility-float32.jsonl
    python benchmarks/early_stopping.py --allow-difference dtype --table benchmarks/early_stopping_target1.md \\
        --sequential benchmarks/early_stopping/digits-answers-gsb-sigma0.5-target1.0-n4000-futility-float32.jsonl

Rows are matched by image key; only images in both runs count. The table goes to `--table` (+ `.json`)."""

import argparse
import json
import statistics
from pathlib import Path

from hf_feature_smoothing.runs import read_run
from hf_feature_smoothing.statistics.aggregates import wilson_interval
from hf_feature_smoothing.utils.atomic import write_atomically


SEQUENTIAL = "benchmarks/early_stopping/digits-answers-gsb-sigma0.5-target0.5-bfloat16.jsonl"
FIXED = "benchmarks/prediction_runs/digits-vote-answers-gsb-sigma0.5-bfloat16.jsonl"
SHARED = ("model", "booster", "model_weights", "candidates_digest", "sigma", "n0", "alpha", "seed", "dtype", "bound",
          "method")  # what both runs must share for the comparison to mean anything (n, the budget, may differ)


def certified(row: dict, radius: float) -> bool:
    return row["status"] == "ok" and bool(row["correct"]) and row["radius"] >= radius


def copies(row: dict) -> int:
    """Noisy copies drawn for the certificate: the n0 that choose the answer and the n_used that bound it."""
    return row["n0"] + row["n_used"]


def effective_params(run) -> dict:
    """The header's parameters, a `None` (left to the model, e.g. `dtype`) resolved to the value every row records."""
    params = dict(run.header["params"])
    for key in SHARED:
        values = {row.get(key) for row in run.rows}
        if params.get(key) is None and len(values) == 1:
            params[key] = values.pop()
    return params


def compare(sequential: dict, fixed: dict, allowed: tuple[str, ...] = ()) -> dict:
    """The comparison's numbers (JSON-ready) from the two runs' contents. `allowed` names parameters of `SHARED`
    that may differ (only `dtype`: the same model computed in another precision); the result and its title say
    which did."""
    seq_params, fixed_params = effective_params(sequential), effective_params(fixed)
    differ = {k: (seq_params.get(k), fixed_params.get(k)) for k in SHARED if seq_params.get(k) != fixed_params.get(k)}
    refused = {k: v for k, v in differ.items() if k not in allowed}
    if refused:
        hint = " (pass --allow-difference dtype to compare precisions)" if set(refused) == {"dtype"} else ""
        raise SystemExit(f"the runs differ in {refused} (sequential, fixed): they do not certify the same thing"
                         f"{hint}.")
    target = seq_params["target_radius"]
    if target is None or fixed_params.get("target_radius") is not None:
        raise SystemExit("give a sequential run (--target-radius) and a fixed-n run, in that order.")
    by_key = {r["key"]: r for r in fixed.rows}
    pairs = [(r, by_key[r["key"]]) for r in sequential.rows if r["key"] in by_key]
    if not pairs:
        raise SystemExit("the runs share no image.")
    result = {"params": {k: seq_params[k] for k in SHARED if k not in differ}, "target_radius": target,
              "images": len(pairs), "futility": bool(seq_params.get("futility")), "differ": differ}
    for name, run, rows in (("sequential", sequential, [s for s, _ in pairs]), ("fixed", fixed, [f for _, f in pairs])):
        hardware = run.header.get("info", {}).get("hardware")  # recorded since this benchmark; seconds need it
        hits = sum(certified(r, target) for r in rows)
        result[name] = {
            "n": rows[0]["n"],
            "certified_at_target": hits / len(rows),
            "interval": wilson_interval(hits, len(rows)),
            "copies_mean": statistics.fmean(copies(r) for r in rows),
            "copies_median": statistics.median(copies(r) for r in rows),
            "seconds_median": statistics.median(r["elapsed_s"] for r in rows),
            "measured_on": (f"{hardware['cpu']} {hardware.get('cpu_capability', '')}".strip()
                            + f", {hardware['threads']} threads") if hardware else "not recorded",
            "stops": {stop: sum(r.get("stop") == stop for r in rows) for stop in sorted({r.get("stop") for r in rows})},
        }
    for stop in result["sequential"]["stops"]:
        chosen = [(s, f) for s, f in pairs if s.get("stop") == stop]
        result["sequential"][f"copies_median_{stop}"] = statistics.median(copies(s) for s, _ in chosen)
    result["only_sequential"] = sum(certified(s, target) and not certified(f, target) for s, f in pairs)
    result["only_fixed"] = sum(certified(f, target) and not certified(s, target) for s, f in pairs)
    return result


def table(result: dict, sequential: str, fixed: str) -> str:
    p = result["params"]
    futility = " (and futility stops)" if result.get("futility") else ""
    title = (f"Early stopping at target radius {result['target_radius']:g}{futility}: `{p['model']}` + "
             f"`{p['booster']}`, "
             f"σ = {p['sigma']}, n0 = {p['n0']}, α = {p['alpha']}, seed {p['seed']}, {p['bound']} bound"
             + (f", {p['dtype']}" if "dtype" in p else "")
             + f"; {result['images']} images in both runs (`{sequential}` against `{fixed}`).")
    differ = result.get("differ", {})
    if differ:
        title += " The runs differ in " + ", ".join(f"{k} (sequential {a}, fixed {b})" for k, (a, b) in differ.items())
        title += ": the same model computed in two precisions, each certificate valid for its own."
    head = ("| run | n (most estimation copies) | certified correct at r = target (95% Wilson) "
            "| copies / image (mean, median) | s / certificate (median) | measured on | stops |")
    lines = [title, "", head, "|---|---|---|---|---|---|---|"]
    for name in ("sequential", "fixed"):
        r = result[name]
        low, high = r["interval"]
        stops = ", ".join(f"{stop}: {count}" for stop, count in r["stops"].items())
        lines.append(f"| {name} | {r['n']} | {r['certified_at_target']:.2f} [{low:.2f}, {high:.2f}] "
                     f"| {r['copies_mean']:.0f}, {r['copies_median']:.0f} | {r['seconds_median']:.1f} "
                     f"| {r['measured_on']} | {stops} |")
    per_stop = ", ".join(f"{k.removeprefix('copies_median_')}: {v:.0f}" for k, v in result["sequential"].items()
                         if k.startswith("copies_median_"))
    footer = (f"Sequential copies per image (median) by stop: {per_stop}. Certified at the target by one run only: "
              f"{result['only_sequential']} (sequential), {result['only_fixed']} (fixed). Seconds are wall time per "
              "row (a row that ran while the job was paused counts the pause: medians only); copies do not depend on the machine, "
              "seconds do.")
    return "\n".join([*lines, "", footer]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", default=SEQUENTIAL, help="a certify-answer run with --target-radius")
    parser.add_argument("--fixed", default=FIXED, help="the fixed-n certify-answer run of the same images")
    parser.add_argument("--table", default="benchmarks/early_stopping.md", help="markdown table (+ .json)")
    parser.add_argument("--allow-difference", action="append", choices=["dtype"], default=[],
                        help="a parameter the runs may differ in, stated in the table (only dtype: the same model "
                             "computed in another precision)")
    args = parser.parse_args()
    runs = [read_run(path) for path in (args.sequential, args.fixed)]
    for path, run in zip((args.sequential, args.fixed), runs):
        if run.header is None or run.header["command"] != "certify-answer":
            parser.error(f"{path} is not a certify-answer run file.")
    result = compare(*runs, allowed=tuple(args.allow_difference))
    text = table(result, args.sequential, args.fixed)
    write_atomically(args.table, text)
    write_atomically(Path(args.table).with_suffix(".json"), json.dumps(result, indent=1))
    print(text)


if __name__ == "__main__":
    main()
