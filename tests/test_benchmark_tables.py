"""The prediction benchmark's table lands in the results page in place (benchmarks/prediction_certificates.py)."""

import importlib.util
from pathlib import Path

import pytest


def _benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "prediction_certificates.py"
    spec = importlib.util.spec_from_file_location("prediction_certificates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(rows: list[str]) -> str:
    return "`m`; same held-out images, n0 = 16 selection + n = 500 ...\n\n| set | r = 0 |\n|---|---|\n" + "".join(
        f"| {row} |\n" for row in rows)


def test_the_results_page_gets_the_new_table_and_keeps_everything_around_it(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text("# Results\n\nBefore.\n\n" + _table(["digits | 0.5"]) + "\nReading: after.\n")
    spliced = _benchmark().splice_table(str(page), _table(["digits | 0.6", "textiles | 0.4"]))
    assert spliced == "# Results\n\nBefore.\n\n" + _table(["digits | 0.6", "textiles | 0.4"]) + "\nReading: after.\n"


@pytest.mark.parametrize("text", [None, "# Results\n\nno table here\n"])
def test_a_results_page_without_the_table_is_refused_naming_the_option(tmp_path, text):
    page = tmp_path / "RESULTS.md"
    if text is not None:
        page.write_text(text)
    with pytest.raises(SystemExit, match="--results"):
        _benchmark().splice_table(str(page), _table(["digits | 0.6"]))
