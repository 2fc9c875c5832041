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


def test_only_model_running_subcommands_are_tuned():
    from spkserve.allocator import runs_models

    light = ("info", "export")
    assert runs_models(["serve", "m.bundle"], light)
    assert runs_models(["simulation_dir=x", "system.n_replicas=4"], light)  # spkmd's default `run`
    assert runs_models([], light)
    assert not runs_models(["info", "m.bundle"], light)
    assert not runs_models(["serve", "--help"], light)
    assert not runs_models(["--version"], light)


_ENTRY = (
    "import os, subprocess, sys; from spkserve.allocator import tuned_entry; "
    "print('start', flush=True); "
    "main = lambda: print(os.environ.get('GLIBC_TUNABLES'), "
    "'TUNED' if {tunable!r} in open('/proc/self/environ').read() else 'plain', "
    "subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"GLIBC_TUNABLES\"))'], "
    "capture_output=True, text=True).stdout.strip(), flush=True); "
    "sys.argv[0] = 'spkx'; tuned_entry(main, light=('info',))()"
)


@pytest.mark.parametrize("user_tunables", [None, "glibc.malloc.arena_max=2"])
def test_tuned_command_does_not_pass_the_tunable_to_its_children(user_tunables):
    if tuned_environment({}) is None:
        pytest.skip("this machine lacks glibc >= 2.35 or transparent huge pages")
    env = {"PATH": "/usr/bin:/bin", **({"GLIBC_TUNABLES": user_tunables} if user_tunables else {})}
    out = subprocess.run([sys.executable, "-c", _ENTRY.format(tunable=TUNABLE), "serve"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["start", "start"]  # re-executed once
    own, tuned, child = lines[2].split(" ")
    assert tuned == "TUNED"  # the process itself started with the tunable
    assert own == child == str(user_tunables)  # os.environ and the child: as given


def test_light_subcommand_is_not_reexecuted():
    if tuned_environment({}) is None:
        pytest.skip("this machine lacks glibc >= 2.35 or transparent huge pages")
    out = subprocess.run([sys.executable, "-c", _ENTRY.format(tunable=TUNABLE), "info"], capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "start" and lines[1].split(" ")[:2] == ["None", "plain"], lines
