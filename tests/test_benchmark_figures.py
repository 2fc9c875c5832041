"""Published speed-ups must come from recorded benchmark runs (benchmarks/figures.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_figures", ROOT / "benchmarks" / "figures.py")
figures = importlib.util.module_from_spec(_spec)
sys.modules["bench_figures"] = figures  # dataclasses look their module up
_spec.loader.exec_module(figures)


def test_readme_and_results_figures_match_their_result_files():
    stale = figures.check()
    assert not stale, "figures no recorded run supports (rerun the benchmark or fix the text):\n" + "\n".join(
        map(str, stale)
    )


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    (tmp_path / "md.md").write_text(
        "# MD\n\n| system | spkmd ms | speed-up | RSS ratio |\n| --- | --- | --- | --- |\n"
        "| ethanol | 2.60 (2.5-2.7) | 2.98x (2.51-3.04) | 0.94 |\n| water | 9.1 | 1.43x (1.40-1.47) | 0.32 |\n"
    )
    return tmp_path


@pytest.mark.parametrize(
    "text, n_stale",
    [
        ("Ethanol is 3.0x faster (`benchmarks/results/md.md`).", 0),  # 2.98 at one decimal
        ("Ethanol is 2.98x faster (`benchmarks/results/md.md`).", 0),
        ("Ethanol is 2.9-4.0x faster (`benchmarks/results/md.md`).", 2),  # neither end recorded
        ("From 1.4x to 3.0× (`results/md.md`).", 0),
        ("Peak memory 0.32× (`results/md.md`).", 0),  # ratio column without a suffix
        ("Ethanol is 2.6x faster (`results/md.md`).", 1),  # 2.60 is a time, not a ratio
        ("| ethanol | 3.5× | `results/md.md` |", 1),
        ("Ethanol is 3.5x faster, no citation.", 0),
        ("| ethanol | 2.98× | aim ≥3.5×: not met | `results/md.md` |", 0),  # an aim is not a figure  # nothing cited: not checked
        ("Ethanol is 3.0x faster (`results/nope.md`).", 2),  # missing file and the figure
    ],
)
def test_checker_flags_figures_without_a_recorded_run(results: Path, text: str, n_stale: int):
    stale = figures.check_text(text, "doc.md", results)
    assert len(stale) == n_stale, [str(s) for s in stale]
