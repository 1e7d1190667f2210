"""`hf-fs certify-answer`: certify an MLLM's answer among candidate answers (Cohen et al.'s vote certificate,
[`certify_answer`]) on every image of a folder or dataset, in a resumable, locked run file, then plot and summarise
certified accuracy per radius. Defaults and ranges are the API's; every value is checked before the run file, its
header or its lock is written."""

import time

from ..assets.labelled_images import ANSWER_SETS
from ..assets.registry import LLAVA_NAME
from ..certification.arguments import ALPHA, CHUNK_SIZE, DEFAULTS, SAMPLES, SIGMA, TARGET_RADIUS
from ..certification.certificates import sequential_label
from ..certification.certify import compute_dtype
from ..models import SMOOTHED_MODEL_CLASSES
from ..models.answer_certificates import certify_answer
from ..models.answers import CandidateAnswers
from ..runs import Run, Shard
from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig
from ..smoothing.noise import fresh_seed
from .loading import load_model, load_processor, open_source
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
    model_params,
    pending_images,
    print_run,
    run_group,
    run_info,
    smoothed_tower,
    smoothing_params,
)


BATCH_SIZE = 16  # noisy copies per forward pass, `certify_answer`'s default


def register_subcommand(subparsers) -> None:
    c = subparsers.add_parser(
        "certify-answer", formatter_class=HelpFormatter,
        help="certify an MLLM's answers among candidate answers (vote certificate); resumable run file + plot",
        description="Certify the answer of a LLaVA-type or Qwen-VL MLLM to one question about every image, among candidate "
                    "answers: the vote of the model's answers on noisy copies x + δ (Cohen et al.), certified "
                    "within ℓ2 radius σ Φ⁻¹(p̲_A) with probability ≥ 1 − α; one JSONL row per image.")
    add_model(c, "booster adapter folder or Hub repo id, loaded into the model (conditioned on σ)")
    c.set_defaults(model=LLAVA_NAME)
    add_images(c, image_size=False)  # the processor prepares the images at the model's own size
    c.add_argument("--candidates", nargs="+", default=["digits"],
                   help="the candidate answers (at least two, none a prefix of another; answers that differ at "
                        "one token, e.g. 'The digit is 0.' 'The digit is 1.', are scored by that token's logit in "
                        "one forward pass, others by their teacher-forced log-likelihood), or a built-in set: "
                        + ", ".join(f"`{name}` ({len(answers)} answers to {question!r})"
                                    for name, (question, answers) in ANSWER_SETS.items())
                        + "; a label k of the images means candidate k")
    c.add_argument("--question", default=None,
                   help="the question asked about each image; default: the built-in set's question (required with "
                        "answers given as text)")
    c.add_argument("--sigma", type=number(SIGMA), default=None,
                   help=f"noise std in [0, 1] pixel units; default: the model's own (`smoothing_config.sigma`), "
                        f"for a stock model {FeatureSmoothingConfig.sigma} (recorded in every row)")
    c.add_argument("--n0", type=number(SAMPLES), default=DEFAULTS["n0"],
                   help="selection copies (they choose the answer), never reused for estimation")
    c.add_argument("--n", type=number(SAMPLES), default=DEFAULTS["n"], help="estimation copies (the most drawn "
                                                                             "with --target-radius)")
    c.add_argument("--alpha", type=number(ALPHA), default=DEFAULTS["alpha"],
                   help="failure probability of each certificate")
    c.add_argument("--target-radius", type=number(TARGET_RADIUS), default=None,
                   help="sequential certification: stop sampling once this ℓ2 radius is certified (or can no longer "
                        "be within --n); anytime-valid betting bound")
    add_futility(c)
    add_run(c, "outputs/certify-answer.jsonl", CHUNK_SIZE, passes="model's forward passes",
            chunk_help=f"noisy copies per forward pass, each scoring every candidate (memory vs speed; recorded: "
                       f"the model's kernels may round differently in other batch sizes); default {BATCH_SIZE}")
    c.set_defaults(func=run)


def candidate_texts(args) -> tuple[str, list[str]]:
    """(question, answers) from --candidates and --question: a built-in set, or answers given as text."""
    if len(args.candidates) == 1 and args.candidates[0] in ANSWER_SETS:
        question, answers = ANSWER_SETS[args.candidates[0]]
        return args.question or question, list(answers)
    if len(args.candidates) < 2 or len(set(args.candidates)) != len(args.candidates):
        raise OptionError(f"--candidates {' '.join(args.candidates)}: give at least two distinct answers, or one "
                          f"built-in set ({', '.join(ANSWER_SETS)}).")
    if not args.question:
        raise OptionError("--question: required with answers given as text (the question the answers reply to).")
    return args.question, list(args.candidates)


def check_options(args) -> None:
    """Checks between options that need no model."""
    check_run_options(args)
    check_futility(args)
    candidate_texts(args)


def prompt(processor, question: str, model_name: str) -> str:
    """The chat prompt of one image and `question`, ending where the answer starts (the processor's template)."""
    if not getattr(processor, "chat_template", None):
        raise OptionError(f"--model {model_name}: its processor has no chat template, so the prompt cannot be built; "
                          f"use an instruction-tuned MLLM whose processor_config / tokenizer_config has one.")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def check_labels(source, num_answers: int, candidates: str) -> None:
    """The source's classes are the candidates, one answer per class, and every label names a candidate (checked
    before the run starts, without decoding images)."""
    num_classes = getattr(source, "num_classes", None)
    if num_classes is not None and num_classes != num_answers:
        name = source.description.get("name") if source.description.get("kind") == "labelled" else None
        hint = f" (here: --candidates {name})" if name in ANSWER_SETS else ""
        raise OptionError(f"--candidates {candidates}: {num_answers} answers, but the images' labels have "
                          f"{num_classes} classes; a label k means candidate k, so give one answer per class{hint}.")
    item = first_bad_label(source, num_answers)
    if item is not None:
        raise OptionError(f"--candidates {candidates}: {num_answers} answers, but image {item.key} has label "
                          f"{item.label!r}; a label k means candidate k (integers 0..{num_answers - 1}).")


def run(args) -> int:
    check_options(args)
    question, texts = candidate_texts(args)
    source = open_source(args)
    check_labels(source, len(texts), " ".join(args.candidates))
    shard = Shard.from_accelerate(args.device)
    model = load_model(args.model, args.booster).to(shard.device)
    tower = smoothed_tower(model, args)  # the model's own σ and dtype by default (else the config's)
    if tower.family.model_type not in SMOOTHED_MODEL_CLASSES:
        raise OptionError(f"--model {args.model}: a {tower.family.model_type} model, which does not answer in text; "
                          f"certify-answer needs a LLaVA or Qwen-VL MLLM ({', '.join(SMOOTHED_MODEL_CLASSES)}), "
                          f"e.g. --model {LLAVA_NAME}.")
    if args.target_radius is not None:
        check_vote_target(args.target_radius, tower.sigma, args.alpha, args.n)
    processor = load_processor(args.model, model)
    text = prompt(processor, question, args.model)
    try:
        candidates = CandidateAnswers.from_texts(processor.tokenizer, texts)
    except ValueError as error:
        raise OptionError(f"--candidates: {error}") from None
    sigma = tower.sigma
    batch_size = args.chunk_size or BATCH_SIZE
    params = {**model_params(args, model), "source": source.description, "question": question, "prompt": text,
              "candidates": texts, "candidates_digest": candidates.digest(), "sigma": sigma, "n0": args.n0,
              "n": args.n, "alpha": args.alpha, "target_radius": args.target_radius, "bound": "betting",
              "method": "vote", "batch_size": batch_size, "seed": args.seed, "device": shard.device.type,
              "max_image_pixels": args.max_image_pixels, "smoothing": smoothing_params(tower)}
    dtype = compute_dtype(tower)  # --dtype, else the model's own autocast or weights dtype: what the passes run in
    # the tower's dtype for certify_answer: its autocast, else "float32" to turn a model's own autocast off (float32
    # weights), else none (half weights: no autocast of the model's own, or the tower would have it)
    own_dtype = tower.config.autocast_dtype or ("float32" if dtype == "float32" else None)
    if dtype != "float32":  # runs made before --dtype (float32) keep their header
        params["dtype"] = dtype
    if args.futility:  # and those made before --futility theirs
        params["futility"] = True
    pad_token_id = processor.tokenizer.pad_token_id
    with Run(args.output, "certify-answer", shard, overwrite=args.overwrite, repair=args.repair) as run:
        run.lock()
        run.open(params, run_info(shard, len(source)), resolve={"seed": fresh_seed}, newer_params=NEWER_PARAMS)
        seed = run.params["seed"]
        for item, image, start in pending_images(run, shard, source, "certify-answer"):
            inputs = processor(images=[image], text=[text], return_tensors="pt")
            inputs = {key: value.to(shard.device) for key, value in inputs.items()}  # Qwen-VL: + grid, token types
            label = None if item.label is None else int(item.label)
            cert = certify_answer(model, inputs, candidates, sigma=sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                                  target_radius=args.target_radius, batch_size=batch_size, seed=seed,
                                  pad_token_id=pad_token_id, autocast_dtype=own_dtype, label=label,
                                  futility=args.futility)
            record = cert.to_dict()  # label and correct lead the row, as in the rows of earlier runs
            run.append({"key": item.key, "index": item.index, "status": "ok", "label": record.pop("label"),
                        "correct": record.pop("correct"), **record, "elapsed_s": round(time.perf_counter() - start, 4)})
        rows = run.finish()
        params = run.params
    if rows is None:  # not rank 0
        return 0
    budget = sequential_label(params) or f"n={args.n}"  # a stopping rule: each row's n is its own
    settings = (f"{args.model}{f' + {args.booster}' if args.booster else ''}: {question!r} among {len(texts)} "
                f"answers (digest {params['candidates_digest']}); σ={sigma} (pixel [0,1]), n0={args.n0}, {budget}, "
                f"α={args.alpha}, seed={params['seed']}")
    print_run(run_group("certify-answer", params, rows, args.output), args.plot, [settings])
    return 0
