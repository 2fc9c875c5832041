"""A non-editable install ships everything the default ``spkmd`` run needs (issue 12).

Builds the wheel from a copy of the source tree (``pip wheel --no-deps --no-build-isolation``,
a few seconds), checks its file list, unpacks it (a pure-Python wheel installs by unpacking)
and runs the default ``spkmd simulation_dir=X`` from an unrelated working directory with only
the unpacked wheel on ``PYTHONPATH`` ahead of the dependencies. A config file, structure or
bundle missing from the package data fails here, as ``ethanol.xyz`` once did.
"""

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)

#: files the default run and the shipped config groups read
REQUIRED = [
    "spk_configs/md/config.yaml",
    "spk_configs/md/system/ethanol.yaml",
    "spk_configs/md/system/ethanol.xyz",
    "spk_configs/md/gle/memory_100fs.dat",
    "spk_configs/md/calculator/bundle.yaml",
    "spk_configs/md/dynamics/thermostat/langevin.yaml",
    "spk_configs/train/train.yaml",
    "spk_configs/train/experiment/md17.yaml",
    "spkserve/data/ethanol-painn.bundle",
]


def _source_copy(dst: Path) -> Path:
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", "benchmarks",
                                    ".pytest_cache", "dist")
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("pip", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("pip is not installed next to this python (needed to build the wheel)")
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pytest.skip("setuptools is not importable (needed for --no-build-isolation)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=500,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("spk_toolkit-*.whl")
    return whl


def test_wheel_ships_configs_data_and_entry_points(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [f for f in REQUIRED if f not in names]
        assert not missing, f"missing from the wheel: {missing}"
        # every file of configs/ in the source tree is in the wheel (new data types need package data)
        shipped = {n[len("spk_configs/"):] for n in names if n.startswith("spk_configs/")}
        in_tree = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts}
        assert in_tree - shipped == set(), f"configs/ files not packaged: {sorted(in_tree - shipped)}"
        (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(z.read(ep).decode())
        assert dict(parser["console_scripts"]) == {
            "spkserve": "spkserve.cli:entry", "spkmd": "spkmd.cli:entry", "spktrain": "training.cli:entry",
            "gschnet_train": "training.gschnet.cli:entry", "gschnet_generate": "spkserve.nn.gschnet_generate:entry",
        }


def test_default_spkmd_runs_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    probe = subprocess.run([sys.executable, "-c", "import spkmd, spk_configs, spkserve; "
                            "print(spkmd.__file__); print(spk_configs.__file__); print(spkserve.__file__)"],
                           capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert all(line.startswith(str(site)) for line in probe.stdout.split()), probe.stdout  # not the source tree
    out = subprocess.run([sys.executable, "-m", "spkmd.cli", "simulation_dir=run", "dynamics.n_steps=3", "plots=false"],
                         capture_output=True, text=True, cwd=work, env=env, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "done: step 3" in out.stdout
    assert (work / "run" / "simulation.hdf5").is_file() and (work / "run" / "checkpoint.pt").is_file()
