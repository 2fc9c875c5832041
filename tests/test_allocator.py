"""The allocator tunable that the command-line entry points set (spkserve.allocator)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spkserve.allocator import TUNABLE, tuned_environment


def test_tunable_is_appended_to_existing_tunables():
    env = tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"})
    if env is None:
        pytest.skip("this machine lacks glibc >= 2.35 or transparent huge pages")
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert env["PATH"] == "/bin"


def test_opt_out_and_already_set_leave_the_environment_alone():
    assert tuned_environment({"SPK_MALLOC_TUNING": "0"}) is None
    assert tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None


def test_reexec_sets_the_tunable_in_the_new_process_once():
    if tuned_environment({}) is None:
        pytest.skip("this machine lacks glibc >= 2.35 or transparent huge pages")
    code = (
        "import os, sys; from spkserve.allocator import reexec_with_tunables; "
        "print('start', flush=True); reexec_with_tunables(); "
        "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "a", "b=1"], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # printed 'start' once before and once after the exec, then the tuned environment
    assert lines[:2] == ["start", "start"]
    assert lines[2] == f"{TUNABLE} ['a', 'b=1']"
