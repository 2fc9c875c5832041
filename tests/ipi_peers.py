"""Helpers for tests that run the real peers: i-PI inputs, i-PI output readers, process control."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

VENV_BIN = Path(sys.executable).parent
IPI = VENV_BIN / "i-pi"
IPI_PY_DRIVER = VENV_BIN / "i-pi-py_driver"
SPKSERVE = VENV_BIN / "spkserve"


def have_ipi() -> bool:
    return IPI.exists()


@contextmanager
def short_tmpdir():
    """A short directory for unix sockets (paths must stay under 108 bytes)."""
    d = tempfile.mkdtemp(prefix="spkipi", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_xyz(path: Path, symbols: list[str], positions_A: np.ndarray, box_A: float) -> None:
    lines = [str(len(symbols)), f"# CELL(abcABC): {box_A} {box_A} {box_A} 90.0 90.0 90.0 cell{{angstrom}} positions{{angstrom}}"]
    lines += [f"{s} {x:.10f} {y:.10f} {z:.10f}" for s, (x, y, z) in zip(symbols, positions_A)]
    path.write_text("\n".join(lines) + "\n")


def ipi_input(
    workdir: Path,
    prefix: str,
    steps: int,
    nbeads: int = 1,
    batch_size: int = 1,
    timestep_fs: float = 4.0,
    temperature_K: float = 40.0,
    forcefield: str | None = None,
    seed: int = 12345,
) -> Path:
    """An i-PI NVE input on ``init.xyz`` that writes potentials, binary positions and binary forces
    (``sim.frc_<bead>.bin``, Hartree/Bohr, the forces i-PI received from the client) every step."""
    ff = forcefield or f"""
  <ffsocket name="spk" mode="unix" pbc="false">
    <address>spk</address>
    <latency>1e-4</latency>
    <timeout>60</timeout>
    <batch_size>{batch_size}</batch_size>
  </ffsocket>"""
    text = f"""<simulation verbosity="low" safe_stride="100000" sockets_prefix="{prefix}" floatformat="%25.16e">
  <output prefix="sim">
    <properties stride="1" filename="out" flush="1">[step, conserved, potential, kinetic_md, bead_potentials]</properties>
    <trajectory filename="pos" stride="1" format="bin" flush="1">positions</trajectory>
    <trajectory filename="frc" stride="1" format="bin" flush="1">forces</trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>{ff}
  <system>
    <initialize nbeads="{nbeads}">
      <file mode="xyz" units="angstrom">init.xyz</file>
      <velocities mode="thermal" units="kelvin">{temperature_K}</velocities>
    </initialize>
    <forces><force forcefield="spk"/></forces>
    <ensemble><temperature units="kelvin">{temperature_K}</temperature></ensemble>
    <motion mode="dynamics">
      <dynamics mode="nve"><timestep units="femtosecond">{timestep_fs}</timestep></dynamics>
    </motion>
  </system>
</simulation>
"""
    path = workdir / "input.xml"
    path.write_text(text)
    return path


def start_ipi(workdir: Path, input_xml: Path) -> subprocess.Popen:
    """Start i-PI in ``workdir`` (stdout/stderr to ipi.log)."""
    log = open(workdir / "ipi.log", "w")
    return subprocess.Popen([str(IPI), str(input_xml)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT)


def read_properties(path: Path) -> np.ndarray:
    """i-PI properties file -> array [steps, columns] (comment lines skipped)."""
    return np.loadtxt(path, comments="#", ndmin=2)


def read_bin_trajectory(path: Path, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """i-PI ``format="bin"`` trajectory -> (cells_bohr [F, 3, 3] rows, positions_bohr [F, N, 3]).

    Each frame: h (9 float64, vectors as columns), natoms (int64), q (3N float64),
    then names and title strings of constant size; the frame size follows from
    the file size and the known frame count.
    """
    data = path.read_bytes()
    if len(data) % n_frames:
        raise ValueError(f"{path}: {len(data)} bytes do not split into {n_frames} frames")
    size = len(data) // n_frames
    cells, pos = [], []
    for f in range(n_frames):
        frame = data[f * size : (f + 1) * size]
        h = np.frombuffer(frame[:72], np.float64).reshape(3, 3)
        nat = int(np.frombuffer(frame[72:80], np.int64)[0])
        q = np.frombuffer(frame[80 : 80 + 24 * nat], np.float64).reshape(nat, 3)
        cells.append(h.T.copy())
        pos.append(q.copy())
    return np.array(cells), np.array(pos)


def wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> int:
    """Wait for a process; kill it (and report) if it overruns."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        raise


def stop(proc: subprocess.Popen | None) -> None:
    """Terminate a process we started, if still running."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_for_path(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.02)


#: bound for waits on external processes (start-up of a Python/torch driver, LAMMPS): generous,
#: because a loaded CI machine can take minutes; the waits below end as soon as the event happens
PROCESS_BOUND_S = 600.0


def wait_for_drivers(server, proc: subprocess.Popen, count: int = 1, timeout_s: float = PROCESS_BOUND_S) -> None:
    """Event-driven: return once ``count`` drivers completed the handshake with ``server``; fail at
    once (with its stderr) if the driver process ``proc`` exits first; give up after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while server.n_drivers < count:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"driver exited with {proc.returncode} before connecting: {err}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {server.n_drivers} of {count} drivers connected within {timeout_s} s")
        time.sleep(0.02)
