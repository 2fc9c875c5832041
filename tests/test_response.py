"""Response properties of FieldSchNet: dipole, polarizability and nuclear magnetic shielding
as field derivatives (checked against finite differences of the model's own energy and for
rotational covariance), and the ASE calculator's dipole under ASE's name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

from spkserve import keys, registry
from spkserve.nn import models  # noqa: F401  (registers the architectures)

from test_nn_models import CUTOFF, SMALL, ethanol, make_batch, random_rotation, rotate

pytestmark = pytest.mark.timeout(180)
ALL = (keys.energy, keys.forces, keys.dipole_moment, keys.polarizability, keys.nuclear_magnetic_shielding)


def field_model(magnetic: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    spec = {
        "name": "neural_network_potential",
        "params": {
            "representation": {"name": "field_schnet", "params": dict(SMALL, magnetic=magnetic)},
            "outputs": [{"name": "atomwise", "params": {}}],
        },
    }
    return registry.build(spec).double().eval()


def with_fields(batch, field=None, bfield=None, moments=None):
    b = dict(batch)
    if field is not None:
        b[keys.electric_field] = field
    if bfield is not None:
        b[keys.magnetic_field] = bfield
    if moments is not None:
        b[keys.nuclear_magnetic_moments] = moments
    return b


def test_shielding_is_mixed_second_derivative_of_the_energy():
    model = field_model()
    b = make_batch([ethanol(), molecule("H2O")])
    g = torch.Generator().manual_seed(1)
    bfield = 0.05 * torch.randn(2, 3, generator=g, dtype=torch.float64)
    moments = 0.05 * torch.randn(12, 3, generator=g, dtype=torch.float64)
    sigma = model(with_fields(b, None, bfield, moments), ALL)[keys.nuclear_magnetic_shielding]
    assert sigma.shape == (12, 3, 3)
    assert sigma.abs().max() > 1e-3
    # not symmetric in general (antisymmetric part from the B x I coupling), not isotropic
    assert (sigma - sigma.transpose(1, 2)).abs().max() > 1e-6
    h = 1e-3

    def energy(db, di):
        return model(with_fields(b, None, bfield + db, moments + di), (keys.energy,))[keys.energy]

    for n in (0, 2, 10):  # C, O of ethanol; an H of water
        sys_n = int(b[keys.idx_m][n])
        for a in range(3):
            for c in range(3):
                db = torch.zeros_like(bfield)
                db[sys_n, a] = h
                di = torch.zeros_like(moments)
                di[n, c] = h
                fd = (energy(db, di) - energy(db, -di) - energy(-db, di) + energy(-db, -di))[sys_n] / (4 * h * h)
                assert abs(float(fd) - float(sigma[n, a, c])) < 1e-6 + 1e-5 * abs(float(fd)), (n, a, c)
    # the moment of an atom in the other molecule does not shield this one
    db = torch.zeros_like(bfield)
    db[0, 0] = h
    di = torch.zeros_like(moments)
    di[10, 0] = h
    cross = (energy(db, di) - energy(db, -di) - energy(-db, di) + energy(-db, -di))[0] / (4 * h * h)
    assert abs(float(cross)) < 1e-9


def test_responses_rotate_with_the_molecule():
    model = field_model()
    b = make_batch([ethanol()])
    g = torch.Generator().manual_seed(2)
    F = 0.02 * torch.randn(1, 3, generator=g, dtype=torch.float64)
    B = 0.05 * torch.randn(1, 3, generator=g, dtype=torch.float64)
    I = 0.05 * torch.randn(9, 3, generator=g, dtype=torch.float64)
    ref = model(with_fields(b, F, B, I), ALL)
    Q = random_rotation(5)
    rot = model(with_fields(rotate(b, Q), F @ Q.T, B @ Q.T, I @ Q.T), ALL)
    torch.testing.assert_close(rot[keys.energy], ref[keys.energy], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rot[keys.forces], ref[keys.forces] @ Q.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(rot[keys.dipole_moment], ref[keys.dipole_moment] @ Q.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(rot[keys.polarizability], Q @ ref[keys.polarizability] @ Q.T, rtol=1e-7, atol=1e-10)
    s = ref[keys.nuclear_magnetic_shielding]
    torch.testing.assert_close(rot[keys.nuclear_magnetic_shielding], Q @ s @ Q.T, rtol=1e-7, atol=1e-10)
    # zero fields (what MD and the calculators use) are covariant too
    ref0 = model(b, ALL)
    rot0 = model(rotate(b, Q), ALL)
    torch.testing.assert_close(rot0[keys.nuclear_magnetic_shielding], Q @ ref0[keys.nuclear_magnetic_shielding] @ Q.T,
                               rtol=1e-7, atol=1e-10)
    # an isolated atom (no environment) still has an isotropic shielding
    from ase import Atoms

    atom = model(make_batch([Atoms("O", positions=[[0, 0, 0]])]), ALL)[keys.nuclear_magnetic_shielding][0]
    torch.testing.assert_close(atom, torch.eye(3, dtype=atom.dtype) * atom[0, 0], rtol=1e-10, atol=1e-12)
    assert abs(float(atom[0, 0])) > 1e-4


def test_shielding_needs_a_magnetic_model_and_right_shapes():
    b = make_batch([ethanol()])
    with pytest.raises(ValueError, match="magnetic"):
        field_model(magnetic=False)(b, (keys.energy, keys.nuclear_magnetic_shielding))
    with pytest.raises(ValueError, match="nuclear_magnetic_moments must have shape"):
        field_model()(with_fields(b, moments=torch.zeros(4, 3, dtype=torch.float64)), (keys.energy,))
    assert keys.nuclear_magnetic_shielding not in field_model(magnetic=False).extra_outputs


@pytest.fixture(scope="module")
def response_bundle(tmp_path_factory):
    """A random magnetic FieldSchNet written as a bundle (eV, Å; dipole e·Å, shielding ppm)."""
    from spkserve.bundle import default_outputs, write_bundle

    model = field_model()
    outputs = default_outputs("eV", "Angstrom", stress=False)
    outputs[keys.dipole_moment] = {"unit": "e*Angstrom", "per": "system"}
    outputs[keys.polarizability] = {"unit": "e*Angstrom^2/V", "per": "system"}
    outputs[keys.nuclear_magnetic_shielding] = {"unit": "ppm", "per": "atom"}
    meta = {"species": [1, 6, 8], "cutoff": CUTOFF, "units": {"length": "Angstrom", "energy": "eV"},
            "outputs": outputs}
    path = tmp_path_factory.mktemp("resp") / "resp.bundle"
    write_bundle(path, model, meta)
    return path, model


def test_ase_calculator_dipole_under_ase_name(response_bundle):
    from spkserve.ase import BundleCalculator

    path, model = response_bundle
    atoms = ethanol()
    atoms.calc = BundleCalculator(path, dtype="float64", extra_properties=["polarizability", "nuclear_magnetic_shielding"])
    mu = atoms.get_dipole_moment()
    ref = model(make_batch([atoms]), ALL)
    np.testing.assert_allclose(mu, ref[keys.dipole_moment][0].numpy(), rtol=1e-10, atol=1e-12)
    assert atoms.calc.get_property("polarizability").shape == (3, 3)
    np.testing.assert_allclose(atoms.calc.get_property("nuclear_magnetic_shielding"),
                               ref[keys.nuclear_magnetic_shielding].numpy(), rtol=1e-10, atol=1e-12)
    # ASE's own name works as an extra property too, and the dipole moves with the molecule
    calc = BundleCalculator(path, dtype="float64", extra_properties=["dipole"])
    moved = ethanol(offset=(0.3, -0.2, 0.1))
    moved.calc = calc
    # FieldSchNet's dipole is built from relative vectors: a translated molecule has the same one
    np.testing.assert_allclose(moved.get_dipole_moment(), mu, rtol=1e-9, atol=1e-11)


def test_ase_infrared_runs_on_a_bundle(response_bundle, tmp_path):
    from ase.vibrations import Infrared

    from spkserve.ase import BundleCalculator

    path, model = response_bundle
    atoms = molecule("H2O")
    atoms.calc = BundleCalculator(path, dtype="float64")
    ir = Infrared(atoms, name=str(tmp_path / "ir"), delta=0.01, nfree=2)
    ir.run()
    freqs = ir.get_frequencies()
    intensities = ir.intensities  # (D/Å)^2 amu^-1
    assert len(intensities) == 9 and np.all(np.isfinite(intensities))
    # the intensity is the squared dipole derivative along the mode: recompute one from the model
    from ase.units import Debye

    step = ir.modes[-1].reshape(3, 3) / np.sqrt(atoms.get_masses())[:, None]  # Å amu^0.5 per unit of q
    dmu = []
    for s in (1, -1):
        a = atoms.copy()
        a.positions += s * 1e-4 * step
        dmu.append(model(make_batch([a]), (keys.energy, keys.dipole_moment))[keys.dipole_moment][0].numpy())
    deriv = (dmu[0] - dmu[1]) / 2e-4 / Debye  # D / (Å amu^0.5)
    assert np.isclose(intensities[-1], (deriv ** 2).sum(), rtol=1e-3), (intensities[-1], (deriv ** 2).sum())
    assert np.isfinite(abs(freqs[-1]))
