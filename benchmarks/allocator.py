"""What the allocator tunable does for a large system (spkserve/allocator.py).

The bare model call (energy + forces, eager, float32, 2 threads) of the randomly initialised
SchNet / PaiNN of ``benchmarks/md.py`` on the 1536-atom water box, each case in a fresh process
with and without ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: seconds per call (median of 3 after
one warm-up call), peak RSS and minor page faults of the process.

    .venv/bin/python benchmarks/allocator.py          # writes benchmarks/results/allocator.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(kind: str, system: str) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from md import CUTOFF, load_system, ours_bundle

    from spkserve import keys
    from spkserve.batch import Structure, collate
    from spkserve.bundle import load_bundle
    from spkserve.neighbors import add_neighbor_pairs

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        model = load_bundle(ours_bundle(kind, Path(d)), dtype=torch.float32).model
    batch = add_neighbor_pairs(collate([Structure.from_atoms(load_system(system))], dtype=torch.float32), CUTOFF)
    model(batch, (keys.energy, keys.forces))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        model(batch, (keys.energy, keys.forces))
        times.append(time.perf_counter() - t)
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"s": statistics.median(times), "rss_mb": r.ru_maxrss / 1024, "minflt": r.ru_minflt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", default="water1536")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "allocator.md"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    from spkserve.allocator import TUNABLE

    rows = []
    for kind in ("schnet", "painn"):
        for tuned in (False, True):
            env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SPK_MALLOC_TUNED")}
            if tuned:
                env["GLIBC_TUNABLES"] = TUNABLE
            out = subprocess.run([sys.executable, __file__, "--worker", kind, args.system], env=env,
                                 capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(f"| {kind} | {TUNABLE if tuned else '(glibc default)'} | {res['s']:.2f} | {res['rss_mb']:.0f} | "
                        f"{res['minflt'] / 1e6:.2f} |")
            print(rows[-1], flush=True)
    load = Path("/proc/loadavg").read_text().split()[0]
    text = "\n".join([
        "# Allocator tunable: bare model call on a large system",
        "",
        f"Command: `{Path(sys.executable)} benchmarks/allocator.py --system {args.system}` (1-min load {load}).  ",
        "Eager energy+forces call, float32, 2 threads, fresh process per row; seconds per call (median of 3), "
        "peak RSS, minor page faults of the whole process (millions).",
        "",
        "| model | GLIBC_TUNABLES | s per call | peak RSS MB | minor faults (M) |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ])
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
