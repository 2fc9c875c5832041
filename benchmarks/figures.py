"""Check that every ratio quoted in the README and ``benchmarks/RESULTS.md`` is in its result file.

A quoted figure is a number followed by ``x`` or ``×`` (a speed-up or a memory ratio), or a
range ``a-b×`` / ``a–b×``. Its scope is the table row (``| ... |``) or the paragraph that cites
one or more result files (``benchmarks/results/NAME.md`` or ``results/NAME.md``). Each quoted
number must equal, at the precision it is written with, a ratio recorded in one of the cited
files (aims, written "≥2×" or "<= 1.15x", are not checked): a number with an ``x``/``×`` suffix there, the ``(lo-hi)`` range right after such a
number, or any number in a table column whose header names a ratio or a speed-up.

    python benchmarks/figures.py          # prints every stale figure; exit status 1 if any

``tests/test_benchmark_figures.py`` runs the same check, so a figure that no recorded run
supports cannot stay in the documents.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md")

_NUM = r"\d+(?:\.\d+)?"
# a quoted ratio: "3.1x", "2.1-3.0x", "4.5–8.1×", "0.32×" (not "64×ethanol", not "2x2")
QUOTED = re.compile(rf"(?<![\w.])({_NUM})(?:\s*(?:-|–|…|\.\.\.)\s*({_NUM}))?\s*[x×](?![\w])")
CITATION = re.compile(r"(?:benchmarks/)?results/([\w.-]+?)\.md")
RATIO_HEADER = re.compile(r"ratio|speed-?up|×|\bx\b", re.IGNORECASE)


@dataclass(frozen=True)
class Stale:
    """A quoted figure that no cited result file records."""

    document: str
    line: int
    figure: str
    cited: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.figure} not found in {', '.join(self.cited)}"


def recorded_ratios(text: str) -> list[str]:
    """Every ratio a result file records, as written (strings keep their precision)."""
    found: list[str] = []
    for m in re.finditer(rf"({_NUM})\s*[x×](?![\w])(?:\s*\(({_NUM})\s*[-–]\s*({_NUM})\))?", text):
        found += [g for g in m.groups() if g]
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        for name, cell in zip(header, cells):
            if RATIO_HEADER.search(name):
                found += re.findall(_NUM, cell)
    return found


def _matches(quoted: str, recorded: list[str]) -> bool:
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    target = float(quoted)
    tol = 0.5 * 10**-decimals + 1e-9
    return any(abs(float(r) - target) <= tol for r in recorded)


def _scopes(text: str):
    """(first line number, text) of every table row and paragraph."""
    lines = text.splitlines()
    block: list[str] = []
    start = 0
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith("|"):
            if block:
                yield start, "\n".join(block)
                block = []
            yield i, line
        elif not line.strip():
            if block:
                yield start, "\n".join(block)
                block = []
        else:
            if not block:
                start = i
            block.append(line)
    if block:
        yield start, "\n".join(block)


def check_text(text: str, name: str, results_dir: Path = RESULTS) -> list[Stale]:
    """The stale figures of one document's ``text`` against the files in ``results_dir``."""
    stale: list[Stale] = []
    for line_no, scope in _scopes(text):
        cited = tuple(dict.fromkeys(CITATION.findall(scope)))
        if not cited:
            continue
        recorded: list[str] = []
        missing = [c for c in cited if not (results_dir / f"{c}.md").exists()]
        for c in cited:
            if c not in missing:
                recorded += recorded_ratios((results_dir / f"{c}.md").read_text())
        files = tuple(f"results/{c}.md" for c in cited)
        for c in missing:
            stale.append(Stale(name, line_no, f"citation of results/{c}.md (no such file)", files))
        for m in QUOTED.finditer(scope):
            if scope[max(0, m.start() - 2): m.start()].strip().endswith(("≥", "≤", ">=", "<=")):
                continue  # an aim ("≥2×"), not a measured figure
            for number in (g for g in m.groups() if g):
                if not _matches(number, recorded):
                    at = line_no + scope[: m.start()].count("\n")
                    stale.append(Stale(name, at, m.group(0).strip(), files))
    return stale


def check(documents=DOCUMENTS, results_dir: Path = RESULTS) -> list[Stale]:
    """Stale figures of every document (default: README.md and benchmarks/RESULTS.md)."""
    out: list[Stale] = []
    for doc in documents:
        out += check_text(Path(doc).read_text(), Path(doc).relative_to(ROOT).as_posix(), results_dir)
    return out


if __name__ == "__main__":
    problems = check()
    for p in problems:
        print(p)
    print(f"{len(problems)} stale figure(s)")
    sys.exit(1 if problems else 0)
