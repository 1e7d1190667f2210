"""`hf-fs attack`: white-box (A)PGD with EOT against the plain tower, the smoothed tower and (with --booster) the
smoothed boosted tower, image by image in a resumable, locked run file. Defaults come from
`attacks.evaluation.attack_rows`'s signature, ranges from the attack and certification API."""

import inspect
import time

from ..attacks.evaluation import attack_rows
from ..attacks.feature import NOISE_DRAWS, STEPS
from ..attacks.optim import ALGORITHMS, NORMS
from ..certification.arguments import ALPHA, CHUNK_SIZE, DEFAULTS, EPSILON, SAMPLES, SIGMA
from ..certification.certify import compute_dtype
from ..runs import Run, Shard, UnreadableImage
from ..runs.fingerprints import weights_fingerprint
from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.noise import fresh_seed
from ..statistics.bounds import CONFIDENCE_BOUNDS
from .loading import load_model, open_source
from .options import HelpFormatter, add_images, add_model, add_run, check_run_options, number
from .running import (
    NEWER_PARAMS,
    model_params,
    print_run,
    progress,
    refuse_mislabelled_dtype,
    run_group,
    run_info,
    skip_row,
    smoothed_tower,
    smoothing_params,
)


ATTACK_DEFAULTS = {name: p.default for name, p in inspect.signature(attack_rows).parameters.items()}
EPSILONS = [0.1, 0.25]  # attack_rows takes its budgets without a default


def register_subcommand(subparsers) -> None:
    a = subparsers.add_parser("attack", formatter_class=HelpFormatter,
                              help="white-box (A)PGD with EOT on plain / smoothed / boosted towers; resumable run "
                                   "file + plot",
                              description="Attack every image with (A)PGD against the plain tower, the smoothed tower "
                                          "(EOT) and, with --booster, the smoothed boosted tower; compare with the "
                                          "certificates.")
    add_model(a, "booster adapter folder or Hub repo id: adds a smoothed+booster variant")
    add_images(a)
    a.add_argument("--sigma", type=number(SIGMA), default=None,
                   help=f"noise std in [0, 1] pixel units; default: the model's own, else "
                        f"{FeatureSmoothingConfig.sigma}")
    a.add_argument("--epsilon", type=number(EPSILON), nargs="+", default=list(EPSILONS),
                   help="attack budgets (pixel [0, 1] units, in --norm)")
    a.add_argument("--norm", default=ATTACK_DEFAULTS["norm"], choices=list(NORMS), help="perturbation norm")
    a.add_argument("--algorithm", default=ATTACK_DEFAULTS["algorithm"], choices=sorted(ALGORITHMS),
                   help="attack algorithm")
    a.add_argument("--steps", type=number(STEPS), default=ATTACK_DEFAULTS["steps"], help="attack iterations")
    a.add_argument("--eot", type=number(NOISE_DRAWS), default=ATTACK_DEFAULTS["eot_samples"],
                   help="noise draws per gradient step against smoothed towers")
    a.add_argument("--eval-samples", type=number(NOISE_DRAWS), default=ATTACK_DEFAULTS["eval_samples"],
                   help="noise draws to measure smoothed cosines")
    a.add_argument("--n", type=number(SAMPLES), default=ATTACK_DEFAULTS["n"], help="samples for the certificate")
    a.add_argument("--alpha", type=number(ALPHA), default=ATTACK_DEFAULTS["alpha"],
                   help="failure probability of the certificate")
    a.add_argument("--bound", default=ATTACK_DEFAULTS["bound"] or DEFAULTS["bound"], choices=list(CONFIDENCE_BOUNDS),
                   help="confidence bound of the certificate")
    a.add_argument("--success-threshold", type=number(float, -1, 1), default=ATTACK_DEFAULTS["success_threshold"],
                   help="an attack succeeds when the attacked feature cosine falls below this")
    add_run(a, "outputs/attack.jsonl", CHUNK_SIZE)
    a.set_defaults(func=run)


def run(args) -> int:
    check_run_options(args)
    source = open_source(args)
    shard = Shard.from_accelerate(args.device)
    model = load_model(args.model).to(shard.device)
    variants = {"plain": (model, False), "smoothed": (model, True)}
    params = {**model_params(args, model), "booster_weights": None}
    if args.booster:
        boosted = load_model(args.model, args.booster).to(shard.device)
        variants["smoothed+booster"] = (boosted, True)
        params["booster_weights"] = weights_fingerprint(boosted)
    towers = {name: smoothed_tower(variant_model, args) for name, (variant_model, _) in variants.items()}
    params.update({
        "source": source.description, "sigma": towers["smoothed"].sigma, "epsilon": args.epsilon,
        "norm": args.norm, "algorithm": args.algorithm, "steps": args.steps, "eot": args.eot,
        "eval_samples": args.eval_samples, "n": args.n, "alpha": args.alpha, "bound": args.bound,
        "success_threshold": args.success_threshold, "seed": args.seed, "dtype": compute_dtype(towers["smoothed"]),
        "image_size": args.image_size, "chunk_size": towers["smoothed"].config.chunk_size,
        "device": shard.device.type, "max_image_pixels": args.max_image_pixels,
        "smoothing": smoothing_params(towers["smoothed"]),
    })
    with Run(args.output, "attack", shard, overwrite=args.overwrite, repair=args.repair) as run:
        run.lock()
        # one row per (image, variant); an unreadable image is one `skipped` row for all its variants
        info = {**run_info(shard, len(source) * len(variants)), "rows_per_image": len(variants)}
        run.open(params, info, resolve={"seed": fresh_seed}, newer_params=NEWER_PARAMS,
                 check_resumed=refuse_mislabelled_dtype(model))
        seed = run.params["seed"]
        indices = shard.indices(len(source))
        with progress(shard, len(indices), "attack") as bar:
            for item in source.items(indices):
                bar.update()
                todo = [name for name in variants if f"{item.key}|{name}" not in run.done]
                if item.key in run.done or not todo:
                    continue
                try:
                    image = item.load()
                except UnreadableImage as error:
                    run.append(skip_row(item, error))
                    continue
                for name in todo:
                    start = time.perf_counter()
                    tower, smoothed = towers[name], variants[name][1]
                    inputs = tower.family.preprocess([image], args.image_size)
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
    settings = (f"{args.algorithm.upper()}-{args.norm}, {args.steps} steps, EOT {args.eot}; σ={params['sigma']} "
                f"(pixel [0,1]), n={args.n}, α={args.alpha}, seed={params['seed']}; success = attacked cosine < "
                f"{args.success_threshold}")
    print_run(run_group("attack", params, rows, args.output), args.plot, [settings])
    return 0
