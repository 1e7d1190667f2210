"""Reports from runs, without recomputing anything: summary tables, plots and `model-index` metrics. Each run's state
(finished, stopped, torn, running) and its rows done / expected are part of every report; only finished runs give
card-ready metrics."""

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..certification.arguments import RADIUS, check_values
from ..certification.certificates import measured_radii, prototypes_label, sequential_label
from ..statistics.advisories import advisories_for
from ..statistics.aggregates import REPORT_RADII, certified_accuracy, certified_cosine
from ..utils.atomic import write_atomically
from ..utils.errors import RunError
from ..utils.locking import RunLock
from ..utils.logging import get_logger
from ..utils.names import shared_name
from .records import RunContents, describe_differences, dumps, read_run
from .sharding import existing_shards


logger = get_logger(__name__)
# parameters that say *which* images were certified, or how the noise was drawn, not what a row means: runs that
# differ only in these can be pooled into one aggregate (a row is a valid certificate whatever they are)
POOLABLE = ("source", "seed", "device")


REPORT_ADVICE = "Pass the .jsonl files written by `hf-fs certify` / `hf-fs attack`."


@dataclass
class RunState:
    """Where one run file stands: `state` is `"running"` (a live writer holds its lock), `"torn"` (its last line is
    incomplete: a writer was killed mid-row), `"stopped"` (fewer rows than images, or shards of a stopped
    multi-process run left) or `"finished"`; `done` counts its rows (skipped ones included), `expected` the images
    of its source (`None` for run files written before it was recorded)."""

    path: Path
    state: str
    done: int
    expected: int | None

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    def describe(self) -> str:
        expected = "?" if self.expected is None else self.expected
        return f"{self.path}: {self.state}, {self.done}/{expected} rows"


def run_state(contents: RunContents) -> RunState:
    """The [`RunState`] of a read run file (its lock and its shards' locks are tried, never taken)."""
    info = (contents.header or {}).get("info", {})
    per_image = info.get("rows_per_image", 1)  # attack runs: one row per variant, one `skipped` row for them all
    done = sum(per_image if row["status"] == "skipped" else 1 for row in contents.rows)
    path, expected = contents.path, info.get("expected_rows")
    shards = existing_shards(path)
    if any(RunLock(p).is_held() for p in [path, *shards]):
        state = "running"
    elif contents.torn:
        state = "torn"
    elif shards or (expected is not None and done < expected):
        state = "stopped"
    else:
        state = "finished"
    return RunState(path, state, done, expected)


def run_kind(header: dict) -> str:
    """`"feature"` (certified cosine), `"prediction"` or `"answer"` (certified accuracy) or `"attack"`."""
    by_command = {"attack": "attack", "certify-answer": "answer"}
    if header["command"] in by_command:
        return by_command[header["command"]]
    return "prediction" if header["params"].get("prototypes") else "feature"


@dataclass
class RunGroup:
    """Rows of one or more runs that share every parameter outside [`POOLABLE`]."""

    command: str
    params: dict
    paths: list[Path] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    advisories: Counter = field(default_factory=Counter)  # known defect (`Advisory`) → rows it affects
    states: list[RunState] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Every run of the group is finished (its aggregates are final)."""
        return all(state.finished for state in self.states)

    @property
    def kind(self) -> str:
        return run_kind({"command": self.command, "params": self.params})

    @property
    def label(self) -> str:
        """`certify <model> σ=… n=… α=…`, with the booster (`+ <booster>`), the method and the prototypes' digest for
        prediction runs and the candidates' digest for answer runs (two predictors or answer settings of one model
        read apart in a report or card); a local model or booster folder by its last part (`utils.names.shared_name`)."""
        p = self.params
        sequential = sequential_label(p)
        n = f"({sequential})" if sequential else f"n={p.get('n')}"
        predictor = f" + {shared_name(p['booster'])}" if p.get("booster") else ""
        if self.kind == "prediction":
            digest = _prototypes_sha256(p)
            predictor += f" {p.get('method', 'margin')}" + (f", {prototypes_label(digest)}" if digest else "")
        elif self.kind == "answer":
            predictor += f" vote, answers {str(p.get('candidates_digest'))[:8]}"
        return f"{self.command} {shared_name(p.get('model'))}{predictor} σ={p.get('sigma')} {n} α={p.get('alpha')}"


def _prototypes_sha256(params: dict) -> str | None:
    """The digest of a prediction run's `--prototypes` file (its predictor), from the run's parameters."""
    return (params.get("prototypes") or {}).get("sha256")


def _aggregate_params(header: dict) -> dict:
    return {k: v for k, v in header["params"].items() if k not in POOLABLE}


def index_refusal(results: list, models: set[str]) -> str | None:
    """Why the groups' `model-index` entries cannot go into one card (None when they can): entries of several models
    (a card's index is one model's), or two entries of one name (groups that differ in a parameter the names do not
    state, such as n, α, the bound or the dtype: a reader could not tell the numbers apart)."""
    if len(models) > 1:
        return (f"the groups are runs of {len(models)} models ({', '.join(sorted(models))}), and a card's index is "
                "one model's; report each model's runs on their own.")
    names = Counter((r.task_type, r.dataset_name, r.metric_name) for r in results)
    repeated = [name for name, count in names.items() if count > 1]
    if repeated:
        return (f"{len(repeated)} metric names repeat across the groups (e.g. {repeated[0][2]!r}): the groups differ "
                "in parameters the names do not state (n, α, bound, dtype, …); report each setting on its own.")
    return None


def group_runs(paths: list[str | os.PathLike], group_by_params: bool = False) -> list[RunGroup]:
    """
    Read run files and pool their rows: runs with the same command and parameters (outside [`POOLABLE`]) form one
    group; runs with other parameters raise a [`RunError`] naming the differences, unless `group_by_params`,
    which makes one group per parameter set. An image (source and key) in several pooled runs counts once. Rows
    carry their run's image `source` and, for prediction runs, `prototypes_sha256` (the predictor they certify).
    """
    groups: list[RunGroup] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise RunError(f"{path}: no such run file.")
        contents = read_run(path, advice=REPORT_ADVICE)
        if contents.header is None:
            raise RunError(f"{path}: empty, not a run file.")
        if contents.bad:
            bad = contents.bad[0]
            raise RunError(f"{path} line {bad.number}: {bad.reason}; repair it first (`hf-fs {contents.header['command']} "
                           f"... --output {path} --repair`).")
        header = contents.header
        params = _aggregate_params(header)
        group = next((g for g in groups if g.command == header["command"] and g.params == params), None)
        if group is None:
            if groups and not group_by_params:
                first = groups[0]
                differences = describe_differences({"command": first.command, **first.params},
                                                   {"command": header["command"], **params})
                raise RunError(f"{path} was made with other parameters than {first.paths[0]}: "
                               f"{'; '.join(differences).replace('this command', 'this run')}. Pass --group-by-params "
                               f"for one aggregate per parameter set.")
            group = RunGroup(header["command"], params)
            groups.append(group)
        group.paths.append(path)
        group.states.append(run_state(contents))
        seen = {(dumps(r.get("source")), r["key"]) for r in group.rows + group.skipped}
        source = header["params"].get("source")
        digest = _prototypes_sha256(header["params"])  # prediction runs: the predictor they certify
        stated = {"source": source, **({"prototypes_sha256": digest} if digest else {})}
        for row in contents.rows:
            identity = (dumps(source), row["key"])
            if identity in seen:
                logger.warning(f"{path}: {row['key']!r} is already in an earlier run of this group; counted once.")
                continue
            seen.add(identity)
            (group.rows if row["status"] == "ok" else group.skipped).append({**row, **stated})
            if row["status"] == "ok":
                _note_advisories(group, header, row)
    return groups


def _note_advisories(group: RunGroup, header: dict, row: dict) -> None:
    """Count the row under each known defect that affects it; a row without its own record (attack rows) is judged
    by the run's parameters and versions."""
    record = {**header["params"], "versions": header.get("info", {}).get("versions"), **row}
    group.advisories.update(advisories_for(record))


def advisory_lines(group: RunGroup) -> list[str]:
    """One warning line per known defect that affects rows of the group (empty when none does)."""
    return [f"WARNING ({advisory.name}): {count} of {len(group.rows)} rows are affected: {advisory.summary}"
            for advisory, count in group.advisories.items()]


def state_lines(group: RunGroup) -> list[str]:
    """The state of each run of the group; unfinished runs are flagged as such (their aggregates are not final)."""
    if not group.states:  # a group built from rows in memory (a command's own summary)
        return []
    states = "; ".join(state.describe() for state in group.states)
    if group.finished:
        return [f"state: {states}"]
    fix = "resume a stopped or torn run with its command, wait for a running one"
    return [f"**UNFINISHED** (partial results, not for a model card): {states}; {fix}."]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _sequential_note(params: dict, rows: list[dict]) -> list[str]:
    """How the rows of a sequential run were sampled (a stopping rule, not n samples each); nothing at a fixed n."""
    label = sequential_label(params)
    if not label:
        return []
    stops = Counter(r.get("stop", "n") for r in rows)
    used = _mean(r.get("n_used") or params["n"] for r in rows)
    futile = f", futile {stops['futile']}" if params.get("futility") else ""
    note = (f"\n{label}: mean n used {used:.1f}; stopped at the target {stops['target']}, unreachable "
            f"{stops['unreachable']}{futile}, at n {stops['n']} (of {len(rows)}).")
    if params.get("futility"):
        note += (" Futility stops end an image's sampling once it is shown to fall short of the target: below the "
                 "target its radius is what those copies certify, less than n copies would.")
    return [note]


def summary_lines(group: RunGroup, radii: Sequence[float] = REPORT_RADII) -> list[str]:
    """A markdown table of the group's aggregates (abstentions and negative bounds count as 0)."""
    rows, p = group.rows, group.params
    images = len({(dumps(r.get("source")), r.get("image", r["key"])) for r in rows})
    head = (f"**{group.label}** ({', '.join(map(str, group.paths))}): {images} images, {len(group.skipped)} "
            f"skipped")
    head = "\n\n".join([head, *state_lines(group), *advisory_lines(group)])
    if not rows:
        return [head, "", "no certified rows."]
    if group.kind == "feature":
        cosine = certified_cosine([r["score_lower"] for r in rows], [r["sigma"] for r in rows], p["epsilon"])
        cells = [("mean S", _mean(r["score"] for r in rows)), ("mean S_low", _mean(r["score_lower"] for r in rows)),
                 ("abstain rate", cosine["abstain_rate"])]
        cells += [(f"certified cosine ε={e:g}", cosine[f"certified_cosine@{e:g}"]) for e in p["epsilon"]]
        table = ["| " + " | ".join(c[0] for c in cells) + " |", "|" + "---|" * len(cells),
                 "| " + " | ".join(f"{c[1]:.4f}" for c in cells) + " |"]
        return [head, "", *table, *_sequential_note(p, rows)]
    if group.kind in ("prediction", "answer"):
        predicted = group.kind  # the rows' field: `prediction` or `answer`
        labelled = [r for r in rows if r.get("label") is not None]
        if not labelled:
            abstain = _mean(r[predicted] is None for r in rows)
            note = f"no labels (pass --label-column): certified accuracy needs them; abstain rate {abstain:.4f}."
            return [head, "", note, *_sequential_note(p, rows)]
        measured = measured_radii(p, radii)
        accuracy = certified_accuracy([r[predicted] for r in labelled], [r["label"] for r in labelled],
                                      [r["radius"] for r in labelled], measured)
        cells = [(f"certified accuracy r={r:g}", accuracy[f"certified_accuracy@{r:g}"]) for r in measured]
        cells.append(("abstain rate", accuracy["abstain_rate"]))
        beyond = ", ".join(f"{r:g}" for r in radii if r not in measured)
        target = p.get("target_radius")
        note = [f"\nNot reported at r = {beyond}: beyond the target radius {target}, where sampling stopped."]
        note = note if beyond else []
        return [head + f", {len(labelled)} labelled", "", "| " + " | ".join(c[0] for c in cells) + " |",
                "|" + "---|" * len(cells), "| " + " | ".join(f"{c[1]:.4f}" for c in cells) + " |",
                *_sequential_note(p, rows), *note]
    from ..attacks.evaluation import summarize

    lines = [head, "", "| variant | ε | clean cos | attacked cos | success | FCSB | violations |",
             "|---|---|---|---|---|---|---|"]
    for s in summarize([{**row, "variant": r["variant"]} for r in rows for row in r["rows"]]):
        fcsb = "-" if s["certified_cosine"] is None else f"{s['certified_cosine']:.4f}"
        lines.append(f"| {s['variant']} | {s['epsilon']:g} | {s['clean_cosine']:.4f} | {s['attacked_cosine']:.4f} | "
                     f"{s['success_rate']:.2f} | {fcsb} | {s['violations']} |")
    return lines


def plot_group(group: RunGroup, path: str | os.PathLike) -> bool:
    """The group's plot (certified cosine vs ε, certified accuracy vs radius, or attacked cosine vs ε); False when
    there is nothing to plot."""
    from .plotting import plot_attack, plot_certified_accuracy, plot_certified_cosine

    if not group.rows:
        return False
    if group.kind == "feature":
        plot_certified_cosine(group.rows, path)
    elif group.kind in ("prediction", "answer"):
        labelled = [r for r in group.rows if r.get("label") is not None]  # as the summary: accuracy needs labels
        if not labelled:
            return False
        plot_certified_accuracy(labelled, path)
    else:
        plot_attack(group.rows, path)
    return True


def eval_results(group: RunGroup, dataset_name: str | None = None, radii: Sequence[float] = REPORT_RADII) -> list:
    """`model-index` entries (`huggingface_hub.EvalResult`) of a certify group; attack groups have none."""
    from ..hub.sharing import certificate_eval_results

    if group.kind == "attack" or not group.rows:
        return []
    rows = group.rows
    if group.kind in ("prediction", "answer"):
        rows = [r for r in rows if r.get("label") is not None]
        if not rows:
            return []
    if group.kind != "answer" and group.params.get("booster"):  # answer rows record their booster themselves
        rows = [{**r, "booster": group.params["booster"]} for r in rows]
    return certificate_eval_results(rows, dataset_name or _dataset_name(group), radii=radii)


def _dataset_name(group: RunGroup) -> str:
    sources = {dumps(r["source"]): r["source"] for r in group.rows}
    names = []
    for source in sources.values():
        source = source or {}
        names.append(source.get("name") or Path(source.get("path", source.get("kind", "images"))).name)
    return " + ".join(sorted(set(names)))


def write_report(paths: list[str | os.PathLike], output_dir: str | os.PathLike, *, group_by_params: bool = False,
                 dataset_name: str | None = None, model_name: str | None = None,
                 radii: Sequence[float] = REPORT_RADII) -> str:
    """Write `summary.md`, one plot per group (`group{i}.png`) and `model-index.yaml` (card metadata with every
    certify group's metrics) into `output_dir`; returns the summary text. Only the rows are read: nothing is
    certified or attacked again.

    Args:
        paths (`list[str]`):
            Run files written by `hf-fs certify` / `hf-fs attack`.
        output_dir (`str` or `os.PathLike`):
            Where the report goes.
        group_by_params (`bool`, *optional*, defaults to `False`):
            One aggregate per parameter set, instead of refusing runs with different parameters ([`group_runs`]).
        dataset_name (`str`, *optional*):
            Dataset name in `model-index`; defaults to the runs' image source.
        model_name (`str`, *optional*):
            Model name in `model-index`; defaults to the runs' `--model`.
        radii (`Sequence[float]`, *optional*, defaults to `REPORT_RADII`):
            ℓ2 radii (pixel [0, 1] units) at which prediction and answer runs report certified accuracy, in the
            summary and in `model-index` (feature runs report certified cosine at their own ε).
    """
    from huggingface_hub import ModelCardData

    radii = sorted(set(check_values("radii", radii, RADIUS)))  # the range `hf-fs report --radii` checks
    if not radii:
        raise ValueError("`radii` must hold at least one ℓ2 radius ≥ 0, e.g. `(0, 0.25, 0.5)`.")
    groups = group_runs(paths, group_by_params)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines, results, models = [], [], set()
    for i, group in enumerate(groups):
        for line in advisory_lines(group):
            logger.warning(f"{', '.join(map(str, group.paths))}: {line}")
        if not group.finished:
            logger.warning(f"{state_lines(group)[0]}")
        lines += summary_lines(group, radii)
        plot = output_dir / f"group{i}.png"
        if plot_group(group, plot):
            lines.append(f"\nplot: {plot}")
        if group.finished:
            entries = eval_results(group, dataset_name, radii)
            results += entries
            models |= {str(group.params.get("model"))} if entries else set()
        elif group.kind != "attack":
            lines.append(f"\nmodel-index: group {i} left out (unfinished runs give no card-ready metrics).")
        lines.append("")
    refused = index_refusal(results, models)
    if refused:
        logger.warning(f"model-index not written: {refused}")
        lines.append(f"model-index: not written: {refused}")
        results = []
    text = "\n".join(lines)
    write_atomically(output_dir / "summary.md", text.encode("utf-8", "backslashreplace"))  # paths may not be UTF-8
    index = output_dir / "model-index.yaml"
    if results:
        name = model_name or str(groups[0].params.get("model", "model")).rstrip("/").split("/")[-1]
        card = ModelCardData(model_name=name, eval_results=results).to_yaml()
        write_atomically(index, card.encode("utf-8"))
        text += f"\nmodel-index ({len(results)} metrics): {index}"
    elif index.exists():  # an earlier report's metrics would read as this one's
        index.unlink()
        text += f"\nmodel-index: none (removed the earlier {index})"
    return text
