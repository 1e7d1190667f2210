"""`hf-fs`: certify (`hf-fs certify`) or attack (`hf-fs attack`) folders or datasets of images in resumable, locked
runs, on one process or many (`accelerate launch -m hf_feature_smoothing.cli certify ...`), and turn finished runs
into tables, plots and `model-index` metrics (`hf-fs report`)."""

import argparse
import inspect
import logging
import socket
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .certification import REFERENCES, as_smoothed_tower, certify, certify_prediction
from .cli_build import add_build_commands
from .commands.loading import SHIPPED_BOOSTER, load_model, open_source, resolve_booster  # noqa: F401 (re-exported)
from .commands.options import HelpFormatter, add_images, add_model, add_verbosity, number, torch_device
from .configuration_feature_smoothing import FeatureSmoothingConfig
from .logging_utils import get_logger
from .noise import fresh_seed
from .runs import Run, RunError, Shard, UnreadableImage
from .runs.fingerprints import file_sha256, weights_fingerprint
from .runs.plotting import PLOT_SUFFIXES
from .runs.report import RunGroup, plot_group, summary_lines, write_report
from .statistics.bounds import CONFIDENCE_BOUNDS


logger = get_logger("hf_feature_smoothing.cli")  # also when run as `python -m`
DEFAULT_SIGMA = FeatureSmoothingConfig.sigma
CERTIFY_DEFAULTS = {name: p.default for name, p in inspect.signature(certify).parameters.items()}
DTYPES = ("float32", "bfloat16", "float16")


# ----- shared pieces ----------------------------------------------------------------------------------------------
def load_prototypes(path: str) -> torch.Tensor:
    """The `(K, F)` `prototypes` tensor of a safetensors file, checked: K ≥ 2, finite, no all-zero row."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as error:  # noqa: BLE001  (safetensors raises its own error types)
        raise RunError(f"--prototypes {path}: not a readable safetensors file ({error}).") from None
    if "prototypes" not in tensors:
        raise RunError(f"--prototypes {path}: no `prototypes` tensor (found {sorted(tensors)}); save the (K, F) "
                       f"class prototypes under that name.")
    prototypes = tensors["prototypes"]
    if prototypes.ndim != 2 or prototypes.shape[0] < 2 or not prototypes.is_floating_point():
        raise RunError(f"--prototypes {path}: `prototypes` must be a floating (K ≥ 2, F) tensor, got "
                       f"{prototypes.dtype} of shape {tuple(prototypes.shape)}.")
    if not torch.isfinite(prototypes).all():
        raise RunError(f"--prototypes {path}: `prototypes` contains NaN or inf values.")
    zero = (prototypes.float().norm(dim=1) == 0).nonzero().flatten().tolist()
    if zero:
        raise RunError(f"--prototypes {path}: rows {zero} of `prototypes` are all zero (no direction to compare to).")
    return prototypes


def _check_common(args) -> None:
    """Checks that involve several options or the machine; errors name the option and the value."""
    output = Path(args.output)
    if output.suffix.lower() != ".jsonl":
        raise RunError(f"--output {args.output}: rows are written as JSON lines, so the file name must end in .jsonl "
                       f"(the plot goes to --plot, by default {output.with_suffix('.png').name}).")
    if output.is_dir():
        raise RunError(f"--output {args.output}: is a folder; name a .jsonl file.")
    plot = Path(args.plot) if args.plot else output.with_suffix(".png")
    if plot.suffix.lower() not in PLOT_SUFFIXES:
        raise RunError(f"--plot {plot}: must end in one of {', '.join(PLOT_SUFFIXES)}.")
    if plot.resolve() == output.resolve() or plot.is_dir():
        raise RunError(f"--plot {plot}: must be a file other than --output {args.output}.")
    args.plot = str(plot)
    if args.images and args.label_column is not None:
        raise RunError(f"--label-column {args.label_column}: labels come from a --dataset column; --images "
                       f"{args.images} has none.")
    device = torch.device(args.device) if args.device else None
    if device is not None and device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if args.dtype == "float16" and not on_cuda:
        raise RunError("--dtype float16: only on CUDA devices; use --dtype float32 (or bfloat16 where supported).")
    if args.dtype == "bfloat16":
        from .hardware import bf16_supported

        if not bf16_supported("cuda" if on_cuda else "cpu"):
            raise RunError(f"--dtype bfloat16: not supported on this {'GPU' if on_cuda else 'CPU'}; use --dtype "
                           f"float32.")


def _run_info(shard: Shard) -> dict:
    import accelerate
    import transformers

    from .version import __version__

    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "argv": sys.argv,
            "processes": shard.world, "versions": {"hf_feature_smoothing": __version__, "torch": torch.__version__,
                                                   "transformers": transformers.__version__,
                                                   "accelerate": accelerate.__version__}}


def _model_params(args, model) -> dict:
    return {"model": args.model, "model_revision": getattr(getattr(model, "config", None), "_commit_hash", None),
            "booster": args.booster, "model_weights": weights_fingerprint(model)}


def _progress(shard: Shard, count: int, desc: str):
    return tqdm(total=count, desc=desc if shard.world == 1 else f"{desc} [rank {shard.rank}/{shard.world}]",
                disable=not shard.is_main)


def _skip_row(item, error: UnreadableImage) -> dict:
    logger.warning(f"{item.key}: skipped, unreadable ({error}).")
    return {"key": item.key, "index": item.index, "status": "skipped", "reason": str(error)}


def _check_label(item, prototypes: torch.Tensor | None, label_column: str | None) -> int | None:
    if prototypes is None or item.label is None:
        return None
    label = item.label
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < prototypes.shape[0]:
        raise RunError(f"--label-column {label_column}: row {item.key} has label {label!r}, but --prototypes has "
                       f"{prototypes.shape[0]} classes (labels must be integers 0..{prototypes.shape[0] - 1}).")
    return label


# ----- certify ------------------------------------------------------------------------------------------------------
def _print_certify_summary(rows: list[dict], params: dict, output: str) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    group = RunGroup("certify", params, [Path(output)], ok, skipped)
    if ok and group.kind == "feature" and len(ok) <= 50:
        print(f"σ={params['sigma']} ({ok[0]['noise_space']}), n={params['n']}, α={params['alpha']}, "
              f"bound={params['bound']}, reference={params['reference']}, seed={params['seed']}")
        header = "".join(f"  FCSB@{e:<6g}" for e in params["epsilon"])
        print(f"{'image':<24}{'S':>7}{'S_low':>8}{header}")
        for r in ok:
            cells = "".join(f"  {'none' if b is None else f'{b:.4f}':<11}" for b in r["fcsb"])
            print(f"{r['key'][:23]:<24}{r['score']:7.4f}{r['score_lower']:8.4f}{cells}")
    print("\n".join(summary_lines(group)))
    for r in skipped:
        print(f"skipped {r['key']}: {r['reason']}")


def cmd_certify(args) -> int:
    _check_common(args)
    shard = Shard.from_accelerate(args.device)
    with Run(args.output, "certify", shard, overwrite=args.overwrite, repair=args.repair) as run:
        run.lock()
        source = open_source(args)
        prototypes = load_prototypes(args.prototypes) if args.prototypes else None
        num_classes = getattr(source, "num_classes", None)
        if prototypes is not None and num_classes is not None and num_classes > prototypes.shape[0]:
            raise RunError(f"--prototypes {args.prototypes}: {prototypes.shape[0]} classes, but --label-column "
                           f"{source.label_column} has {num_classes}.")
        model = load_model(args.model, args.booster).to(shard.device)
        tower = as_smoothed_tower(model, args.sigma, None if args.dtype == "float32" else args.dtype)
        tower.config.chunk_size = args.chunk_size
        params = {**_model_params(args, model), "source": source.description, "sigma": tower.sigma,
                  "n0": args.n0, "n": args.n, "alpha": args.alpha, "bound": args.bound, "seed": args.seed,
                  "dtype": args.dtype, "image_size": args.image_size, "device": shard.device.type,
                  "max_image_pixels": args.max_image_pixels}
        if prototypes is None:
            params.update(prototypes=None, epsilon=args.epsilon, tau=args.tau, reference=args.reference,
                          target_cosine=args.target_cosine, target_radius=args.target_radius)
        else:
            params.update(prototypes={"sha256": file_sha256(args.prototypes), "shape": list(prototypes.shape)})
        run.open(params, _run_info(shard), resolve={"seed": fresh_seed})
        seed = run.params["seed"]
        common = dict(n0=args.n0, n=args.n, alpha=args.alpha, bound=args.bound, seed=seed, image_size=args.image_size)
        indices = shard.indices(len(source))
        with _progress(shard, len(indices), "certify") as progress:
            for item in source.items(indices):
                progress.update()
                if item.key in run.done:
                    continue
                start = time.perf_counter()
                try:
                    image = item.load()
                except UnreadableImage as error:
                    run.append(_skip_row(item, error))
                    continue
                if prototypes is None:
                    (cert,) = certify(tower, [image], epsilon=args.epsilon, tau=args.tau, reference=args.reference,
                                      target_cosine=args.target_cosine, target_radius=args.target_radius, **common)
                else:
                    label = _check_label(item, prototypes, getattr(source, "label_column", None))
                    (cert,) = certify_prediction(tower, [image], prototypes, None if label is None else [label],
                                                 **common)
                values = {k: v for k, v in cert.to_dict().items() if k != "index"}
                run.append({"key": item.key, "index": item.index, "status": "ok", "model": args.model, **values,
                            "elapsed_s": round(time.perf_counter() - start, 4)})
        rows = run.finish()
        params = run.params
    if rows is None:  # not rank 0
        return 0
    ok = [r for r in rows if r["status"] == "ok"]
    group = RunGroup("certify", params, [Path(args.output)], ok)
    plotted = plot_group(group, args.plot)
    _print_certify_summary(rows, params, args.output)
    print(f"rows: {args.output}" + (f"  plot: {args.plot}" if plotted else ""))
    return 0


# ----- attack -------------------------------------------------------------------------------------------------------
def cmd_attack(args) -> int:
    from .attacks.evaluation import attack_rows

    _check_common(args)
    shard = Shard.from_accelerate(args.device)
    with Run(args.output, "attack", shard, overwrite=args.overwrite, repair=args.repair) as run:
        run.lock()
        source = open_source(args)
        model = load_model(args.model).to(shard.device)
        variants = {"plain": (model, False), "smoothed": (model, True)}
        params = {**_model_params(args, model), "booster_weights": None}
        if args.booster:
            boosted = load_model(args.model, args.booster).to(shard.device)
            variants["smoothed+booster"] = (boosted, True)
            params["booster_weights"] = weights_fingerprint(boosted)
        autocast = None if args.dtype == "float32" else args.dtype
        towers = {}
        for name, (variant_model, _) in variants.items():
            towers[name] = as_smoothed_tower(variant_model, args.sigma, autocast)
            towers[name].config.chunk_size = args.chunk_size
        params.update({
            "source": source.description, "sigma": towers["smoothed"].sigma, "epsilon": args.epsilon,
            "norm": args.norm, "algorithm": args.algorithm, "steps": args.steps, "eot": args.eot,
            "eval_samples": args.eval_samples, "n": args.n, "alpha": args.alpha, "bound": args.bound,
            "success_threshold": args.success_threshold, "seed": args.seed, "dtype": args.dtype,
            "image_size": args.image_size, "chunk_size": args.chunk_size, "device": shard.device.type,
            "max_image_pixels": args.max_image_pixels,
        })
        run.open(params, _run_info(shard), resolve={"seed": fresh_seed})
        seed = run.params["seed"]
        indices = shard.indices(len(source))
        with _progress(shard, len(indices), "attack") as progress:
            for item in source.items(indices):
                progress.update()
                todo = [name for name in variants if f"{item.key}|{name}" not in run.done]
                if item.key in run.done or not todo:
                    continue
                try:
                    image = item.load()
                except UnreadableImage as error:
                    run.append(_skip_row(item, error))
                    continue
                for name in todo:
                    start = time.perf_counter()
                    tower, smoothed = towers[name], variants[name][1]
                    inputs = tower.adapter.preprocess([image], args.image_size)
                    inputs = inputs.with_pixels(inputs.pixel_values.to(shard.device))
                    rows = attack_rows(tower, inputs, args.epsilon, smoothed=smoothed, norm=args.norm,
                                       algorithm=args.algorithm, steps=args.steps, eot_samples=args.eot,
                                       eval_samples=args.eval_samples, n=args.n, alpha=args.alpha,
                                       success_threshold=args.success_threshold, seed=seed, bound=args.bound)
                    # one record per (image, variant) holds every ε, so a resumed run never repeats half an image
                    run.append({"key": f"{item.key}|{name}", "index": item.index, "status": "ok", "image": item.key,
                                "variant": name, "model": args.model, "rows": rows,
                                "elapsed_s": round(time.perf_counter() - start, 4)})
        rows = run.finish()
        params = run.params
    if rows is None:
        return 0
    group = RunGroup("attack", params, [Path(args.output)], [r for r in rows if r["status"] == "ok"],
                     [r for r in rows if r["status"] == "skipped"])
    plotted = plot_group(group, args.plot)
    print(f"{args.algorithm.upper()}-{args.norm}, {args.steps} steps, EOT {args.eot}; σ={params['sigma']} (pixel "
          f"[0,1]), n={args.n}, α={args.alpha}, seed={params['seed']}; success = attacked cosine < "
          f"{args.success_threshold}")
    print("\n".join(summary_lines(group)))
    for r in group.skipped:
        print(f"skipped {r['key']}: {r['reason']}")
    print(f"rows: {args.output}" + (f"  plot: {args.plot}" if plotted else ""))
    return 0


# ----- report -------------------------------------------------------------------------------------------------------
def cmd_report(args) -> int:
    output_dir = args.output_dir or str(Path(args.runs[0]).with_suffix("")) + "-report"
    print(write_report(args.runs, output_dir, group_by_params=args.group_by_params, dataset_name=args.dataset_name,
                       model_name=args.model_name))
    return 0


# ----- parser -------------------------------------------------------------------------------------------------------
def _add_run(parser: argparse.ArgumentParser, output: str) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--output", default=output,
                     help="the run file (.jsonl): a header with every parameter, then one row per image; resumed "
                          "when it exists and its parameters match")
    run.add_argument("--plot", default=None, help="plot file (.png, .pdf or .svg); default: --output with .png")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in --output even if it holds one with other parameters (the old file is "
                          "kept as <output>.bak)")
    run.add_argument("--repair", action="store_true",
                     help="move lines of --output that are not valid rows to <output>.corrupt and continue")
    run.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=None,
                     help="seed of all noise: a row depends only on (seed, image, parameters); default: a fresh "
                          "seed, recorded in the run header and reused when the run is resumed")
    run.add_argument("--device", type=torch_device, default=None,
                     help="torch device; default: accelerate's device for this process (cuda:<local rank> on GPUs, "
                          "else cpu)")
    run.add_argument("--dtype", default="float32", choices=DTYPES,
                     help="compute dtype of the tower passes (autocast); certificates then cover the encoder as "
                          "computed in that dtype. bfloat16 only where the CPU/GPU supports it, float16 on CUDA")
    run.add_argument("--chunk-size", type=number(int, 1), default=32,
                     help="noisy copies per tower call (memory vs speed; with a seed, certificates do not depend "
                          "on it)")
    add_verbosity(run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fs", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("certify", formatter_class=HelpFormatter,
                       help="certify images (feature cosine, or predictions with --prototypes); resumable run file "
                            "+ plot",
                       description="Certify the smoothed encoder on every image: FCSB(ε) and radii (or certified "
                                   "predictions with --prototypes), one JSONL row per image.")
    add_model(c, "booster adapter folder or Hub repo id, loaded into the model before certifying")
    add_images(c)
    c.add_argument("--prototypes", default=None,
                   help="safetensors file with a `prototypes` (K, F) tensor: certify argmax-cosine predictions")
    c.add_argument("--sigma", type=number(float, 0, low_open=True), default=None,
                   help=f"noise std in [0, 1] pixel units; default: the model's own (a smoothed model's "
                        f"`smoothing_config.sigma`), else {DEFAULT_SIGMA}")
    c.add_argument("--epsilon", type=number(float, 0), nargs="+", default=list(CERTIFY_DEFAULTS["epsilon"]),
                   help="ℓ2 budgets (pixel [0, 1] units) for FCSB(ε)")
    c.add_argument("--tau", type=number(float, 0, 1, high_open=True), nargs="+", default=list(CERTIFY_DEFAULTS["tau"]),
                   help="cosine thresholds for the certified radii")
    c.add_argument("--n0", type=number(int, 1), default=CERTIFY_DEFAULTS["n0"],
                   help="selection samples (reference direction or predicted class), never reused for estimation")
    c.add_argument("--n", type=number(int, 1), default=CERTIFY_DEFAULTS["n"], help="estimation samples")
    c.add_argument("--alpha", type=number(float, 0, 1, low_open=True, high_open=True),
                   default=CERTIFY_DEFAULTS["alpha"], help="failure probability of each certificate")
    c.add_argument("--bound", default=CERTIFY_DEFAULTS["bound"], choices=list(CONFIDENCE_BOUNDS),
                   help="one-sided confidence bound")
    c.add_argument("--reference", default=CERTIFY_DEFAULTS["reference"], choices=list(REFERENCES),
                   help="reference direction v of the score: f(x) (`clean`) or the smoothed feature (`smoothed`)")
    c.add_argument("--target-cosine", type=number(float, -1, 1, high_open=True), default=None,
                   help="sequential certification: stop sampling once FCSB(ε) ≥ this at every --epsilon (betting "
                        "bound; --n is then the most samples)")
    c.add_argument("--target-radius", type=number(float, 0, low_open=True), default=None,
                   help="sequential certification: stop sampling once R_τ ≥ this at every --tau (betting bound)")
    _add_run(c, "outputs/certify.jsonl")
    c.set_defaults(func=cmd_certify)

    a = sub.add_parser("attack", formatter_class=HelpFormatter,
                       help="white-box (A)PGD with EOT on plain / smoothed / boosted towers; resumable run file + plot",
                       description="Attack every image with (A)PGD against the plain tower, the smoothed tower (EOT) "
                                   "and, with --booster, the smoothed boosted tower; compare with the certificates.")
    add_model(a, "booster adapter folder or Hub repo id: adds a smoothed+booster variant")
    add_images(a)
    a.add_argument("--sigma", type=number(float, 0, low_open=True), default=None,
                   help=f"noise std in [0, 1] pixel units; default: the model's own, else {DEFAULT_SIGMA}")
    a.add_argument("--epsilon", type=number(float, 0), nargs="+", default=[0.1, 0.25],
                   help="attack budgets (pixel [0, 1] units, in --norm)")
    a.add_argument("--norm", default="l2", choices=["l2", "linf"], help="perturbation norm")
    a.add_argument("--algorithm", default="apgd", choices=["apgd", "pgd"], help="attack algorithm")
    a.add_argument("--steps", type=number(int, 1), default=20, help="attack iterations")
    a.add_argument("--eot", type=number(int, 1), default=8, help="noise draws per gradient step against smoothed towers")
    a.add_argument("--eval-samples", type=number(int, 1), default=128,
                   help="noise draws to measure smoothed cosines")
    a.add_argument("--n", type=number(int, 1), default=500, help="samples for the certificate")
    a.add_argument("--alpha", type=number(float, 0, 1, low_open=True, high_open=True), default=0.001,
                   help="failure probability of the certificate")
    a.add_argument("--bound", default=CERTIFY_DEFAULTS["bound"], choices=list(CONFIDENCE_BOUNDS),
                   help="confidence bound of the certificate")
    a.add_argument("--success-threshold", type=number(float, -1, 1), default=0.5,
                   help="an attack succeeds when the attacked feature cosine falls below this")
    _add_run(a, "outputs/attack.jsonl")
    a.set_defaults(func=cmd_attack)

    r = sub.add_parser("report", formatter_class=HelpFormatter,
                       help="summary table, plots and model-index metrics of finished runs (nothing recomputed)",
                       description="Pool one or more run files (same parameters, or one group per parameter set with "
                                   "--group-by-params) into a summary table, plots and `model-index` metrics.")
    r.add_argument("runs", nargs="+", help="run files (.jsonl) written by `hf-fs certify` or `hf-fs attack`")
    r.add_argument("--output-dir", default=None,
                   help="where summary.md, group<i>.png and model-index.yaml go; default: <first run>-report")
    r.add_argument("--group-by-params", action="store_true",
                   help="one aggregate per parameter set instead of refusing runs with different parameters")
    r.add_argument("--dataset-name", default=None, help="dataset name in model-index; default: from the runs' source")
    r.add_argument("--model-name", default=None, help="model name in model-index; default: from the runs' --model")
    add_verbosity(r)
    r.set_defaults(func=cmd_report)
    add_build_commands(sub)
    return parser


def _configure_logging(level: str) -> None:
    package = logging.getLogger("hf_feature_smoothing")
    package.setLevel(level.upper())
    if not any(getattr(h, "_hf_fs", False) for h in package.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[hf-fs] %(levelname)s: %(message)s"))
        handler._hf_fs = True
        package.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbosity)
    if hasattr(args, "images") and not args.images and not args.dataset:
        args.images = "skimage"
    try:
        with torch.no_grad():  # attacks re-enable gradients where they need them
            return args.func(args)
    except RunError as error:
        print(f"hf-fs {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
