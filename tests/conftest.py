"""Shared fixtures: reference bundles written once per session, the shared data path."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared reference data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def lj_bundle(bundle_dir) -> Path:
    """Argon-like LJ in Å/eV (σ 3.4, ε 0.0104, rc 8.5), shifted like ASE."""
    from spkserve.potentials import reference_bundle

    return reference_bundle("lj", bundle_dir / "lj.bundle", sigma=3.4, epsilon=0.0104, cutoff=8.5)


@pytest.fixture(scope="session")
def trap_bundle(bundle_dir) -> Path:
    """Isotropic harmonic trap, k = 1 eV/Å²."""
    from spkserve.potentials import reference_bundle

    return reference_bundle("harmonic_trap", bundle_dir / "trap.bundle", k=1.0)


@pytest.fixture(scope="session")
def morse_bundle(bundle_dir) -> Path:
    from spkserve.potentials import reference_bundle

    return reference_bundle("morse", bundle_dir / "morse.bundle", depth=0.3, alpha=1.5, r0=2.8, cutoff=7.0)
