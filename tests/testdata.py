"""The small reference data set shipped in ``tests/data`` (so data and training tests never skip).

Leading frames of files of the project's shared data folder (``../shared/data``; see its
README for how they were made and their licences), byte for byte and gzipped; which frames,
and a checksum of each uncompressed file, are in ``tests/data/MANIFEST.json``, and
``tests/data/make_test_data.py`` rebuilds them. :func:`data_file` hands a test the uncompressed
file under its original relative name, e.g. ``data_file("xtb/ethanol_gfn2xtb_500K.extxyz")``
(the first 240 of its 2100 frames).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "data"
MANIFEST = json.loads((SHIPPED / "MANIFEST.json").read_text())
_CACHE = Path(tempfile.gettempdir()) / f"spk-testdata-{os.getuid()}"


def data_file(rel: str) -> Path:
    """Path of the uncompressed shipped file ``rel`` (decompressed once into a temp cache and
    checked against the manifest's sha256)."""
    if rel not in MANIFEST:
        raise KeyError(f"{rel!r} is not in the shipped test data set; it has {sorted(MANIFEST)}")
    want = MANIFEST[rel]["sha256"]
    out = _CACHE / want[:16] / rel
    if not out.is_file():
        raw = gzip.decompress((SHIPPED / (rel + ".gz")).read_bytes())
        if hashlib.sha256(raw).hexdigest() != want:
            raise RuntimeError(f"shipped test data {rel} does not match its checksum in tests/data/MANIFEST.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, out)
    return out
