"""`hf-fs report`: pool finished run files into a summary table, plots and `model-index` metrics (nothing is
recomputed)."""

from pathlib import Path

from ..certification.arguments import RADIUS
from ..runs.report import write_report
from ..statistics.aggregates import REPORT_RADII
from .options import HelpFormatter, add_verbosity, number


def register_subcommand(subparsers) -> None:
    r = subparsers.add_parser("report", formatter_class=HelpFormatter,
                              help="summary table, plots and model-index metrics of finished runs (nothing "
                                   "recomputed)",
                              description="Pool one or more run files (same parameters, or one group per parameter "
                                          "set with --group-by-params) into a summary table, plots and `model-index` "
                                          "metrics.")
    r.add_argument("runs", nargs="+", help="run files (.jsonl) written by `hf-fs certify`, `hf-fs certify-answer` or `hf-fs attack`")
    r.add_argument("--output-dir", default=None,
                   help="where summary.md, group<i>.png and model-index.yaml go; default: <first run>-report")
    r.add_argument("--group-by-params", action="store_true",
                   help="one aggregate per parameter set instead of refusing runs with different parameters "
                        "(model-index.yaml only when the groups fit one card: one model, distinct metric names)")
    r.add_argument("--dataset-name", default=None, help="dataset name in model-index; default: from the runs' source")
    r.add_argument("--model-name", default=None, help="model name in model-index; default: from the runs' --model")
    r.add_argument("--radii", type=number(RADIUS), nargs="+", default=list(REPORT_RADII),
                   help="ℓ2 radii (pixel [0, 1] units) at which prediction and answer runs report certified accuracy, "
                        "in the summary and model-index, up to the target radius of sequential runs (feature runs: "
                        "certified cosine at their own --epsilon)")
    add_verbosity(r)
    r.set_defaults(func=run)


def run(args) -> int:
    output_dir = args.output_dir or str(Path(args.runs[0]).with_suffix("")) + "-report"
    print(write_report(args.runs, output_dir, group_by_params=args.group_by_params, dataset_name=args.dataset_name,
                       model_name=args.model_name, radii=args.radii))
    return 0
