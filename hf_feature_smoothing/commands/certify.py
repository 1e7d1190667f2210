"""`hf-fs certify`: certify every image of a folder or dataset (feature certificates, or prediction certificates with
--prototypes) in a resumable, locked run file, then plot and summarise it. Defaults, ranges and checks are the API's
(`certification.arguments`); every value is checked before the run file, its header or its lock is written."""

import time

from ..certification import REFERENCES, certify, certify_prediction
from ..certification.arguments import (
    ALPHA,
    CHUNK_SIZE,
    DEFAULTS,
    EPSILON,
    PREDICTION_METHODS,
    SAMPLES,
    SIGMA,
    TARGET_COSINE,
    TARGET_RADIUS,
    TAU,
    check_sequential,
    target_score,
)
from ..certification.certificates import sequential_label
from ..certification.certify import compute_dtype
from ..certification.prototypes import PrototypeSpace, feature_width, read_prototypes, tower_in_space
from ..runs import Run, Shard
from ..runs.fingerprints import file_sha256
from ..runs.report import RunGroup
from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.modeling_smoothed_tower import SmoothedVisionTower
from ..smoothing.noise import fresh_seed
from ..statistics.bounds import CONFIDENCE_BOUNDS
from ..utils.validation import is_class_index
from .loading import load_model, open_source
from .options import (
    HelpFormatter,
    OptionError,
    add_futility,
    add_images,
    add_model,
    add_run,
    check_futility,
    check_run_options,
    check_vote_target,
    number,
)
from .running import (
    NEWER_PARAMS,
    first_bad_label,
    logger,
    model_params,
    pending_images,
    print_run,
    refuse_mislabelled_dtype,
    run_group,
    run_info,
    smoothed_tower,
    smoothing_params,
)


OPTION_NAMES = {"target_cosine": "--target-cosine", "target_radius": "--target-radius", "epsilon": "--epsilon",
                "tau": "--tau", "bound": "--bound", "sigma": "--sigma", "n": "--n"}


def register_subcommand(subparsers) -> None:
    c = subparsers.add_parser("certify", formatter_class=HelpFormatter,
                              help="certify images (feature cosine, or predictions with --prototypes); resumable run "
                                   "file + plot",
                              description="Certify the smoothed encoder on every image: FCSB(ε) and radii (or "
                                          "certified predictions with --prototypes), one JSONL row per image.")
    add_model(c, "booster adapter folder or Hub repo id, loaded into the model before certifying")
    add_images(c)
    c.add_argument("--prototypes", default=None,
                   help="safetensors file with a `prototypes` (K, F) tensor: certify argmax-cosine predictions")
    c.add_argument("--method", default=None, choices=list(PREDICTION_METHODS),
                   help=f"prediction certificates (--prototypes): `margin` certifies the prediction of the smoothed "
                        f"feature (FS margin), `vote` the vote of single-copy predictions (Cohen et al.; with "
                        f"--target-radius it stops sampling early; it certifies more at every radius r > 0 on the "
                        f"benchmark); default with --prototypes: {DEFAULTS['method']}")
    c.add_argument("--sigma", type=number(SIGMA), default=None,
                   help=f"noise std in [0, 1] pixel units; default: the model's own (a smoothed model's "
                        f"`smoothing_config.sigma`), else {FeatureSmoothingConfig.sigma}")
    c.add_argument("--epsilon", type=number(EPSILON), nargs="+", default=list(DEFAULTS["epsilon"]),
                   help="ℓ2 budgets (pixel [0, 1] units) for FCSB(ε)")
    c.add_argument("--tau", type=number(TAU), nargs="+", default=list(DEFAULTS["tau"]),
                   help="cosine thresholds for the certified radii")
    c.add_argument("--n0", type=number(SAMPLES), default=DEFAULTS["n0"],
                   help="selection samples (reference direction or predicted class), never reused for estimation")
    c.add_argument("--n", type=number(SAMPLES), default=DEFAULTS["n"], help="estimation samples")
    c.add_argument("--alpha", type=number(ALPHA), default=DEFAULTS["alpha"],
                   help="failure probability of each certificate")
    c.add_argument("--bound", default=DEFAULTS["bound"], choices=list(CONFIDENCE_BOUNDS),
                   help="one-sided confidence bound")
    c.add_argument("--reference", default=DEFAULTS["reference"], choices=list(REFERENCES),
                   help="reference direction v of the score: f(x) (`clean`) or the smoothed feature (`smoothed`)")
    c.add_argument("--target-cosine", type=number(TARGET_COSINE), default=None,
                   help="sequential certification: stop sampling once FCSB(ε) ≥ this at every --epsilon (betting "
                        "bound; --n is then the most samples)")
    c.add_argument("--target-radius", type=number(TARGET_RADIUS), default=None,
                   help="sequential certification: stop sampling once R_τ ≥ this at every --tau (betting bound); "
                        "with --prototypes --method vote, once the vote's radius is ≥ this")
    add_futility(c)
    add_run(c, "outputs/certify.jsonl", CHUNK_SIZE)
    c.set_defaults(func=run)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_options(args) -> None:
    """Checks between options that need no model (the API's own rules, with the options' names)."""
    check_run_options(args)
    if args.method and not args.prototypes:
        raise OptionError(f"--method {args.method}: a method of prediction certificates; pass --prototypes (class "
                          f"prototypes from `hf-fs prototypes`), or drop --method to certify features.")
    if args.label_column is not None and not args.prototypes:
        raise OptionError(f"--label-column {args.label_column}: labels are read by prediction certificates "
                          f"(--prototypes), not by feature certificates; drop it, or pass --prototypes.")
    chosen, args.method = args.method, args.method or (DEFAULTS["method"] if args.prototypes else None)
    vote = args.method == "vote"
    check_futility(args, vote)
    if vote and args.bound != "betting":
        raise OptionError(f"--bound {args.bound}: --method vote{'' if chosen else ' (the default with --prototypes)'} "
                          f"bounds the vote with the anytime-valid betting confidence sequence; use --bound betting "
                          f"(the default){'' if chosen else ', or --method margin'}.")
    targets = [f"{name} {value:g}" for name, value in (("--target-cosine", args.target_cosine),
                                                         ("--target-radius", None if vote else args.target_radius))
               if value is not None]
    if args.prototypes and targets:
        raise OptionError(f"{' / '.join(targets)}: sequential targets apply to feature certificates (FCSB(ε), "
                          f"R_τ) and to vote certificates (--method vote --target-radius), not to margin "
                          f"prediction certificates (--prototypes {args.prototypes}); drop the target, add --method "
                          f"vote, or drop --prototypes to certify features.")
    feature_only = [f"{name} {' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value)}"
                    for name, key in (("--epsilon", "epsilon"), ("--tau", "tau"), ("--reference", "reference"))
                    if (value := _as_list(getattr(args, key))) != _as_list(DEFAULTS[key])]
    if args.prototypes and feature_only:
        raise OptionError(f"{' / '.join(feature_only)}: options of feature certificates (FCSB(ε), R_τ), which "
                          f"prediction certificates (--prototypes {args.prototypes}) do not use; drop them, or drop "
                          f"--prototypes to certify features.")
    if args.prototypes:
        return
    if args.reference == "clean" and args.n0 != DEFAULTS["n0"]:
        raise OptionError(f"--n0 {args.n0}: --reference clean takes f(x) as the reference direction and draws no "
                          f"selection samples; drop --n0, or use --reference smoothed (the default).")
    try:  # the bound and the epsilon / tau lists; the reach at σ is checked once the model is loaded
        check_sequential(args.target_cosine, args.target_radius, args.epsilon, args.tau, args.bound,
                         names=OPTION_NAMES)
    except ValueError as error:
        raise OptionError(str(error)) from None


def warn_other_setting(args, tower: SmoothedVisionTower, space: PrototypeSpace) -> None:
    """A warning when the prototypes were made for another model, booster or σ than this run's (as their file
    records): sound still (they are fixed before sampling), but not the predictor made for this setting."""
    ours = {"model": args.model, "booster": args.booster, "sigma": tower.sigma}
    made = {key: value for key, value in space.made_with.items() if not (key == "sigma" and value is None)}
    other = [f"{'σ' if key == 'sigma' else '--' + key} {made[key]} (this run: {ours[key]})" for key in made
             if made[key] != ours[key]]
    if other:
        logger.warning(f"--prototypes {args.prototypes}: made with {', '.join(other)}. The certificates stay sound "
                       f"(the prototypes are fixed before sampling), but the predictor was not made for this setting; "
                       f"`hf-fs prototypes` with this run's --model, --booster and --sigma makes one that is.")


def check_model_options(args, tower, prototypes) -> None:
    """Checks that need the loaded model: a target within reach at its σ, prototypes of its feature width."""
    if prototypes is None and (args.target_cosine is not None or args.target_radius is not None):
        try:
            target_score(args.target_cosine, args.target_radius, args.epsilon, args.tau, tower.sigma, args.bound,
                         n=args.n, alpha=args.alpha, names=OPTION_NAMES)
        except ValueError as error:
            raise OptionError(str(error)) from None
    if prototypes is not None and args.method == "vote" and args.target_radius is not None:
        check_vote_target(args.target_radius, tower.sigma, args.alpha, args.n)
    if prototypes is not None:
        try:
            width = feature_width(tower, args.image_size)
        except ValueError as error:  # a per-position centre of another image size or model
            raise OptionError(f"--prototypes {args.prototypes}: {error}") from None
        if prototypes.shape[1] != width:
            raise OptionError(f"--prototypes {args.prototypes}: {prototypes.shape[1]} features per class, but "
                              f"--model {args.model} gives {width} at "
                              f"{f'--image-size {args.image_size}' if args.image_size else 'its default image size'}: "
                              f"they were computed with another model, booster or image size; recompute them with "
                              f"`hf-fs prototypes` and the same --model / --booster / --image-size.")


def _check_label(item, prototypes, label_column: str | None) -> int | None:
    if prototypes is None or item.label is None:
        return None
    label = item.label
    if not is_class_index(label, prototypes.shape[0]):
        raise OptionError(f"--label-column {label_column}: row {item.key} has label {label!r}, but --prototypes has "
                       f"{prototypes.shape[0]} classes (labels must be integers 0..{prototypes.shape[0] - 1}).")
    return int(label)


def check_labels(args, source, prototypes) -> None:
    """The source's classes are the prototypes' classes, and so is every label, checked before the run starts
    (labels are read without decoding any image)."""
    if prototypes is None or getattr(source, "label_column", None) is None:
        return
    num_classes = getattr(source, "num_classes", None)
    if num_classes is not None and num_classes > prototypes.shape[0]:
        raise OptionError(f"--prototypes {args.prototypes}: {prototypes.shape[0]} classes, but --label-column "
                          f"{source.label_column} has {num_classes}; compute prototypes for every class "
                          f"(`hf-fs prototypes` on the same labelled set).")
    item = first_bad_label(source, prototypes.shape[0])
    if item is not None:
        _check_label(item, prototypes, source.label_column)  # raises, naming the row and its label


def _feature_table(group: RunGroup) -> list[str]:
    """The settings and a per-image table of a feature run of at most 50 images (nothing for longer or other runs)."""
    ok, params = group.rows, group.params
    if not ok or group.kind != "feature" or len(ok) > 50:
        return []
    sequential = sequential_label(params)
    n = f"n={params['n']}" if sequential is None else sequential  # a stopping rule: each row's n is its own
    lines = [(f"σ={params['sigma']} ({ok[0]['noise_space']}), {n}, α={params['alpha']}, bound={params['bound']}, "
              f"reference={params['reference']}, seed={params['seed']}")]
    header = "".join(f"  FCSB@{e:<6g}" for e in params["epsilon"])
    used = f"{'n used':>8}{'stop':>13}" if sequential else ""
    lines.append(f"{'image':<24}{'S':>7}{'S_low':>8}{used}{header}")
    for r in ok:
        cells = "".join(f"  {'none' if b is None else f'{b:.4f}':<11}" for b in r["fcsb"])
        used = f"{r.get('n_used') or r['n']:>8}{r.get('stop', 'n'):>13}" if sequential else ""
        lines.append(f"{r['key'][:23]:<24}{r['score']:7.4f}{r['score_lower']:8.4f}{used}{cells}")
    return lines


def run(args) -> int:
    check_options(args)
    prototypes = space = None
    if args.prototypes:
        try:
            prototypes, space = read_prototypes(args.prototypes, name=f"--prototypes {args.prototypes}")
        except (TypeError, ValueError) as error:
            raise OptionError(str(error)) from None
    source = open_source(args)
    check_labels(args, source, prototypes)
    shard = Shard.from_accelerate(args.device)
    model = load_model(args.model, args.booster).to(shard.device)
    tower = smoothed_tower(model, args)
    if space is not None:
        try:
            tower = tower_in_space(tower, space, name=f"--prototypes {args.prototypes} (--model {args.model})")
        except ValueError as error:
            raise OptionError(str(error)) from None
        warn_other_setting(args, tower, space)
    check_model_options(args, tower, prototypes)
    params = {**model_params(args, model), "source": source.description, "sigma": tower.sigma,
              "n0": args.n0, "n": args.n, "alpha": args.alpha, "bound": args.bound, "seed": args.seed,
              "dtype": compute_dtype(tower), "image_size": args.image_size, "device": shard.device.type,
              "max_image_pixels": args.max_image_pixels, "smoothing": smoothing_params(tower)}
    if prototypes is None:
        params.update(prototypes=None, epsilon=args.epsilon, tau=args.tau, reference=args.reference,
                      target_cosine=args.target_cosine, target_radius=args.target_radius)
    else:
        params.update(prototypes={"sha256": file_sha256(args.prototypes), "shape": list(prototypes.shape)})
        if space.smoothed_features is not None:  # as runs made before `smoothing` was recorded have it
            params.update(smoothed_features=space.smoothed_features)
        if space.feature_center is not None:  # the file's μ (its sha256 covers the values)
            params.update(feature_center=len(space.feature_center))
        if args.method == "vote":  # margin runs, made before --method existed, keep their parameters
            params.update(method="vote", target_radius=args.target_radius)
            if args.futility:  # runs made before --futility keep their parameters
                params.update(futility=True)
    with Run(args.output, "certify", shard, overwrite=args.overwrite, repair=args.repair) as run:
        run.lock()
        run.open(params, run_info(shard, len(source)), resolve={"seed": fresh_seed}, newer_params=NEWER_PARAMS,
                 check_resumed=refuse_mislabelled_dtype(model))
        seed = run.params["seed"]
        common = dict(n0=args.n0, n=args.n, alpha=args.alpha, bound=args.bound, seed=seed, image_size=args.image_size)
        for item, image, start in pending_images(run, shard, source, "certify"):
            if prototypes is None:
                (cert,) = certify(tower, [image], epsilon=args.epsilon, tau=args.tau, reference=args.reference,
                                  target_cosine=args.target_cosine, target_radius=args.target_radius, **common)
            else:
                label = _check_label(item, prototypes, getattr(source, "label_column", None))
                vote = ({"target_radius": args.target_radius, "futility": args.futility} if args.method == "vote"
                        else {})
                (cert,) = certify_prediction(tower, [image], prototypes, None if label is None else [label],
                                             method=args.method, **common, **vote)
            values = {k: v for k, v in cert.to_dict().items() if k != "index"}
            run.append({"key": item.key, "index": item.index, "status": "ok", "model": args.model, **values,
                        "elapsed_s": round(time.perf_counter() - start, 4)})
        rows = run.finish()
        params = run.params
    if rows is None:  # not rank 0
        return 0
    group = run_group("certify", params, rows, args.output)
    print_run(group, args.plot, _feature_table(group))
    return 0
