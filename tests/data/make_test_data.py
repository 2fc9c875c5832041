"""Build tests/data from /work/shared/data: the first frames of each file, byte for byte, gzipped."""
import gzip, hashlib, json, shutil
from pathlib import Path
import sys
SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"); DST = Path(__file__).resolve().parent
SUBSETS = {  # file: number of leading frames (None: whole file)
    "xtb/ethanol_gfn2xtb_500K.extxyz": 240,
    "xtb/water16_pbc_gfn1xtb_300K.extxyz": 4,
    "public/md17_ethanol_20frames_eV.extxyz": None,
    "public/md17_ethanol_20frames_schnetpack_kcalmol.db": None,
    "public/md17_aspirin_15frames_nequip_kcalmol.xyz": None,
    "public/md17_aspirin_15frames_eV.extxyz": None,
    "public/qm9_500mols_U0_eV.extxyz": 300,
    "public/iso17_C7H10O2_40frames_eV.extxyz": 12,
}
manifest = {}
for rel, n in SUBSETS.items():
    raw = (SRC / rel).read_bytes()
    if n is not None:
        lines = raw.decode().splitlines(keepends=True)
        i = 0
        for _ in range(n):
            i += int(lines[i].split()[0]) + 2
        raw = "".join(lines[:i]).encode()
    out = DST / (rel + ".gz")
    with gzip.GzipFile(out, "wb", mtime=0) as f:
        f.write(raw)
    manifest[rel] = {"frames": n if n is not None else "all", "sha256": hashlib.sha256(raw).hexdigest()}
(DST / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
