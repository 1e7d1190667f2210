"""Pieces shared by the run commands (`certify`, `attack`): the tower as the options ask for it, the run header's
machine information and model fingerprint, progress bars and rows for unreadable images."""

import dataclasses
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from packaging.version import InvalidVersion, Version
from tqdm.auto import tqdm

from ..certification import as_smoothed_tower
from ..certification.inputs import weights_dtype
from ..runs import Run, RunError, Shard, UnreadableImage
from ..runs.fingerprints import values_digest, weights_fingerprint
from ..runs.images import printable_name
from ..runs.report import RunGroup, plot_group, summary_lines
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..utils.hardware import describe
from ..utils.logging import get_logger
from ..utils.validation import is_class_index
from .options import OptionError


logger = get_logger("hf_feature_smoothing.cli")  # the name `hf-fs` messages have always had


def smoothed_tower(model, args) -> SmoothedVisionTower:
    """The model's smoothed tower at --sigma, --dtype and --chunk-size (each None: the model's own; --dtype float32
    turns the model's own autocast off); the model's own tower is never modified (another setting gives a new tower
    over the same encoder)."""
    tower = as_smoothed_tower(model, args.sigma)
    weights = weights_dtype(tower)
    if args.dtype == "float32" and weights != torch.float32:  # as `as_smoothed_tower` refuses, naming the option
        raise OptionError(f"--dtype float32: --model {args.model} has {str(weights).removeprefix('torch.')} "
                          f"weights, so its passes cannot run in float32; load a float32 copy, or leave --dtype out "
                          f"to run (and record) the model's own dtype.")
    tower = as_smoothed_tower(tower, None, args.dtype)
    if args.chunk_size is not None and args.chunk_size != tower.config.chunk_size:
        tower = SmoothedVisionTower(tower.encoder, dataclasses.replace(tower.config, chunk_size=args.chunk_size))
    return tower


def run_info(shard: Shard, expected_rows: int) -> dict:
    """The run header's `info`: when and where it was made (the hardware its rows' seconds were measured on), the
    versions, and the rows the source should give (the report's rows done / expected)."""
    import accelerate
    import transformers

    from ..version import __version__

    versions = {"hf_feature_smoothing": __version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "argv": [printable_name(arg) for arg in sys.argv],  # a path argument may not be UTF-8
            "processes": shard.world, "hardware": describe(shard.device), "expected_rows": expected_rows,
            "versions": versions}


def model_params(args, model) -> dict:
    return {"model": args.model, "model_revision": getattr(getattr(model, "config", None), "_commit_hash", None),
            "booster": args.booster, "model_weights": weights_fingerprint(model)}


NEWER_PARAMS = ("smoothing",)  # recorded by certify / certify-answer / attack since 0.2.0's runs; theirs still resume


def smoothing_params(tower: SmoothedVisionTower) -> dict:
    """The tower's own settings that shape the certified function besides σ and the dtype (recorded on their own):
    the smoothed site, the pixel statistics and processor geometry, and the feature centre (a digest of its
    values). A config edited between two pieces of a run (a re-estimated centre saved into the same folder) then
    makes the resumed run refuse, naming the setting, instead of mixing rows of two functions."""
    config, center = tower.config, tower.config.feature_center
    return {"smoothed_features": config.smoothed_features, "image_mean": list(tower.family.image_mean),
            "image_std": list(tower.family.image_std), "image_processor": config.image_processor,
            "feature_center": None if center is None else {"values": len(center), "digest": values_digest(center)}}


def refuse_mislabelled_dtype(model):
    """`Run.open(check_resumed=...)` for runs of `model`: before 0.2.0, `certify` and `attack` recorded
    `dtype: float32` (the `--dtype` default) while a model saved with its own autocast (`autocast_dtype` in its
    smoothing config) ran its passes in that dtype. Such a run's rows cannot be told apart from float32 ones, so it is
    refused rather than continued in either dtype."""
    tower = getattr(model, "smoothed_vision_tower", None)  # a stock model has no autocast of its own
    own = tower.config.autocast_dtype if isinstance(tower, SmoothedVisionTower) else None

    def check(header: dict) -> None:
        made_by = header.get("info", {}).get("versions", {}).get("hf_feature_smoothing", "0")
        try:
            old = Version(made_by) < Version("0.2.0")
        except InvalidVersion:
            old = True
        if own is not None and old and header["params"].get("dtype") == "float32":
            raise RunError(
                f"the run in this output was made by hf_feature_smoothing {made_by}, which recorded `dtype: float32` "
                f"while --model {header['params'].get('model')} ran its passes in its own {own} autocast: its rows "
                f"cannot be continued in either dtype. Read them as {own} results, and start a new run with "
                f"--overwrite (the old file is kept as .bak) or another --output.")

    return check


def progress(shard: Shard, count: int, desc: str):
    return tqdm(total=count, desc=desc if shard.world == 1 else f"{desc} [rank {shard.rank}/{shard.world}]",
                disable=not shard.is_main)


def skip_row(item, error: UnreadableImage) -> dict:
    reason = printable_name(str(error))  # a decoder's message may quote a file name that is not UTF-8
    logger.warning(f"{item.key}: skipped, unreadable ({reason}).")
    return {"key": item.key, "index": item.index, "status": "skipped", "reason": reason}


def pending_images(run: Run, shard: Shard, source, desc: str):
    """This process's images of `source` that `run` has no row for yet, loaded, behind a progress bar: yields
    `(item, image, start)`, `start` the `time.perf_counter()` before loading (for the row's `elapsed_s`). An image
    that cannot be read becomes a `skipped` row and is passed over."""
    indices = shard.indices(len(source))
    with progress(shard, len(indices), desc) as bar:
        for item in source.items(indices):
            bar.update()
            if item.key in run.done:
                continue
            start = time.perf_counter()
            try:
                image = item.load()
            except UnreadableImage as error:
                run.append(skip_row(item, error))
                continue
            yield item, image, start


def run_group(command: str, params: dict, rows: list[dict], output: str) -> RunGroup:
    """The finished run file `output` of `command` as the report reads it: its `ok` rows and its skipped images."""
    return RunGroup(command, params, [Path(output)], [r for r in rows if r["status"] == "ok"],
                    [r for r in rows if r["status"] == "skipped"])


def print_run(group: RunGroup, plot: str | None, heading: Sequence[str] = ()) -> None:
    """A finished run on the terminal: the command's `heading` lines (its settings, a per-image table), the report's
    summary of `group`, the images it skipped and where its rows (and the plot, drawn to `plot`) are."""
    plotted = plot_group(group, plot)
    print(*heading, *summary_lines(group), sep="\n")
    for r in group.skipped:
        print(f"skipped {r['key']}: {r['reason']}")
    print(f"rows: {', '.join(map(str, group.paths))}" + (f"  plot: {plot}" if plotted else ""))


def first_bad_label(source, num_classes: int):
    """The first item of a labelled `source` whose label is not a class index in [0, `num_classes`) (labels are read
    without decoding any image), or None (also for an unlabelled source)."""
    if getattr(source, "label_column", None) is None:
        return None
    return next((item for item in source.items()
                 if item.label is not None and not is_class_index(item.label, num_classes)), None)
