"""The import rule of ARCHITECTURE.md and the installed layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('spkmd', 'training', 'pytorch_lightning', 'lightning'))))
"""


def _loaded_after_import(module: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "module",
    ["spkserve", "spkserve.runtime", "spkserve.ase", "spkserve.bundle", "spkserve.potentials", "spkserve.cli", "spkserve.nn.models"],
)
def test_spkserve_never_imports_md_or_training(module):
    loaded = _loaded_after_import(module)
    assert loaded == [], f"importing {module} loaded {loaded}"


WALK = (
    "import pkgutil, importlib, json, sys, {package}\n"
    "for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
    "    importlib.import_module(m.name)\n"
    "print(json.dumps(sorted(x for x in sys.modules if x.split('.')[0] in {forbidden!r})))\n"
)


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("spkserve", ("spkmd", "training", "pytorch_lightning", "lightning")),
        ("spkmd", ("training", "pytorch_lightning", "lightning")),
        ("training", ("spkmd",)),
    ],
)
def test_whole_package_respects_import_rule(package, forbidden):
    """Import every submodule of a package: none may pull in what ARCHITECTURE.md forbids."""
    code = WALK.format(package=package, forbidden=forbidden)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_configs_are_installed_as_package_data():
    from importlib.resources import files

    root = files("spk_configs")
    assert root.is_dir()


def test_commands_exist():
    for cmd in ("spkserve", "spkmd", "spktrain"):
        exe = __import__("shutil").which(cmd, path=str(__import__("pathlib").Path(sys.executable).parent))
        assert exe, f"console script {cmd} is not installed next to {sys.executable}"
        res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
