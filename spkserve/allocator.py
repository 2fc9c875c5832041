"""Memory-allocator settings for large systems (glibc ``malloc`` on Linux).

A model step on a few thousand atoms allocates and frees tens of pair-sized
tensors (``[pairs, features]``, ~100 MB each at 1536 water atoms). glibc serves
blocks that large with a fresh ``mmap`` each time, so every step touches every
page of them anew: on the 2-core benchmark machine a 1536-atom PaiNN step took
7 million minor page faults and spent about half its time in the kernel zeroing
4 KiB pages. glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) asks for
transparent huge pages on those mappings, which cuts the faults ~40x with the
same peak memory (``benchmarks/results/md.md``). Keeping freed blocks instead
(raising ``mmap_threshold``/``trim_threshold``) is a little faster still but
raises peak memory by ~50 %, so it is not the default.

Tunables are read once at process start, so the command-line entry points that run
models at length (``spkmd`` runs, ``spkserve serve|ipi|ipi-server|lammps``, ``spktrain``
training) re-execute themselves with :data:`TUNABLE` added to ``GLIBC_TUNABLES``
(:func:`reexec_with_tunables`, :func:`tuned_entry`); the other subcommands (``spkserve
info``, ``spkmd plot``, ...) start as they are. The re-executed process logs the setting once
and removes it from its own ``os.environ`` again, so child processes it starts (i-PI, LAMMPS,
MPI ranks, drivers) get the environment the user gave. Library users set the variable
themselves::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_md_script.py

Set ``SPK_MALLOC_TUNING=0`` to disable the re-execution.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Callable, Collection
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
_GUARD = "SPK_MALLOC_TUNED"
_ORIGINAL = "SPK_MALLOC_ORIGINAL_TUNABLES"  # the user's GLIBC_TUNABLES before the re-exec ("" = unset)
log = logging.getLogger(__name__)


def _glibc_supports_hugetlb() -> bool:
    libc, version = platform.libc_ver()
    if libc != "glibc":
        return False
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def _thp_available() -> bool:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def tuned_environment(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """A copy of ``env`` (default ``os.environ``) with :data:`TUNABLE` added, or None
    when it is already there, disabled by ``SPK_MALLOC_TUNING=0`` or unsupported here."""
    env = dict(os.environ if env is None else env)
    if env.get("SPK_MALLOC_TUNING", "1") == "0" or env.get(_GUARD):
        return None
    if sys.platform != "linux" or not _glibc_supports_hugetlb() or not _thp_available():
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    env[_GUARD] = "1"
    env[_ORIGINAL] = current
    return env


def restore_child_environment() -> bool:
    """In a re-executed process: put the user's ``GLIBC_TUNABLES`` back into ``os.environ`` (the
    running process keeps its tuned allocator; children no longer inherit it). True when the
    process had been re-executed by :func:`reexec_with_tunables`."""
    if os.environ.get(_GUARD) != "1" or _ORIGINAL not in os.environ:
        return False
    original = os.environ.pop(_ORIGINAL)
    os.environ.pop(_GUARD, None)
    if original:
        os.environ["GLIBC_TUNABLES"] = original
    else:
        os.environ.pop("GLIBC_TUNABLES", None)
    log.info("allocator: this process runs with GLIBC_TUNABLES=%s (spkserve/allocator.py; SPK_MALLOC_TUNING=0 "
             "to opt out); child processes get the environment as given", TUNABLE)
    return True


def reexec_with_tunables() -> None:
    """Replace the current process by itself with the allocator tunable set.

    Call only from a console-script entry point, before any work is done (never in
    a process that hosts other code, such as a test runner). Returns without doing
    anything when no change is needed or possible.
    """
    env = tuned_environment()
    if env is None:
        return
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError:  # pragma: no cover - exec refused: carry on untuned
        return


def runs_models(argv: list[str], light: Collection[str]) -> bool:
    """Whether a command line (without the program name) runs models at length: not when its
    first word is one of the ``light`` subcommands or it only asks for help or the version."""
    if any(a in ("--help", "-h", "--version") for a in argv):
        return False
    return not (argv and argv[0] in light)


def tuned_entry(main: Callable[[], object], light: Collection[str] = ()) -> Callable[[], None]:
    """A console-script entry point: :func:`reexec_with_tunables` unless the subcommand is one
    of ``light`` (see :func:`runs_models`), then ``main`` with the children's environment as
    the user gave it (:func:`restore_child_environment`)."""

    def entry() -> None:
        if runs_models(sys.argv[1:], light):
            reexec_with_tunables()
        restore_child_environment()
        main()

    entry.__doc__ = f"Console-script entry point of {getattr(main, 'name', 'the command')} (allocator tunable, then run)."
    return entry

