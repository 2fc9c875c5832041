"""The shipped test data set (tests/data) is what its manifest says: leading frames of the shared data."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from ase.io import read

from testdata import MANIFEST, SHIPPED, data_file

import os

# the checkout's sibling ../shared/data, or SPK_SHARED_DATA
SHARED = Path(os.environ.get("SPK_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
if not SHARED.is_dir() and Path("/work/shared/data").is_dir():  # the worktree layout of this project
    SHARED = Path("/work/shared/data")


def test_shipped_files_decompress_with_their_frames_and_energies():
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) < 400_000  # a small set
    for rel, entry in MANIFEST.items():
        path = data_file(rel)
        if rel.endswith(".db"):
            from ase.db import connect

            assert connect(str(path)).count() == 20
            continue
        frames = read(str(path), index=":")
        if entry["frames"] != "all":
            assert len(frames) == entry["frames"], rel
        assert all(len(a) > 0 for a in frames)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared data folder {SHARED} (the source of tests/data) is absent")
def test_shipped_files_are_the_leading_bytes_of_the_shared_files():
    for rel in MANIFEST:
        raw = gzip.decompress((SHIPPED / (rel + ".gz")).read_bytes())
        assert (SHARED / rel).read_bytes()[: len(raw)] == raw, rel
