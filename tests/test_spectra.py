"""Power, IR and Raman spectra (spkmd.spectra) and the ``spkmd spectrum`` command: analytic
signals with known peak positions and intensities, and a real run of a field-response bundle."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spkserve import keys, units
from spkmd.cli import main
from spkmd.spectra import ir_spectrum, peak_positions, raman_spectrum

pytestmark = pytest.mark.timeout(240)
C_CM_PER_FS = units.SPEED_OF_LIGHT_M_PER_S * units.factor("m/s", "cm/fs")


class FakeLog:
    """A log of analytic signals sampled every ``dt`` fs (the loader interface spectra use)."""

    def __init__(self, props: dict[str, np.ndarray], dt: float = 0.5):
        self.props = props
        n = len(next(iter(props.values())))
        self.times_fs = np.arange(n) * dt
        self.available = sorted(props)

    def get_property(self, name, molecule=0, replica=None):
        return self.props[name]


def cosine(wavenumber: float, t: np.ndarray) -> np.ndarray:
    return np.cos(2 * np.pi * wavenumber * C_CM_PER_FS * t)


def band_area(wn, y, centre, half_width=60.0):
    sel = np.abs(wn - centre) < half_width
    return float(np.trapezoid(y[sel], wn[sel]))


def test_ir_peaks_and_relative_intensities_of_two_linear_dipole_oscillators():
    # a harmonic dimer with a linear dipole mu = q x: two modes with charges q1, q2 and
    # amplitudes A1, A2; the dipole-derivative spectrum has peaks at the mode wavenumbers
    # and band areas proportional to (q A omega)^2
    t = np.arange(8000) * 0.5
    mu = np.zeros((len(t), 3))
    w1, w2, qa1, qa2 = 1200.0, 3000.0, 1.0, 0.3
    mu[:, 0] = qa1 * cosine(w1, t)
    mu[:, 2] = qa2 * cosine(w2, t)
    wn, y = ir_spectrum(FakeLog({"dipole_moment": mu}), resolution=4000, normalize=False)
    peaks = peak_positions(wn, y, n=2)
    step = wn[1] - wn[0]
    assert np.allclose(peaks, [w1, w2], atol=2 * step), peaks
    ratio = band_area(wn, y, w1) / band_area(wn, y, w2)
    expected = (qa1 * w1) ** 2 / (qa2 * w2) ** 2
    assert abs(ratio / expected - 1) < 0.03, (ratio, expected)
    # the Schofield correction raises the high-frequency band relative to the harmonic one
    _, ys = ir_spectrum(FakeLog({"dipole_moment": mu}), resolution=4000, normalize=False,
                        correction="schofield", temperature_K=300.0)
    assert band_area(wn, ys, w1) / band_area(wn, ys, w2) < ratio


def test_raman_isotropic_and_anisotropic_parts_separate():
    t = np.arange(8000) * 0.5
    w_iso, w_aniso = 1000.0, 1600.0
    alpha = np.tile(np.eye(3) * 2.0, (len(t), 1, 1))
    alpha += 0.1 * cosine(w_iso, t)[:, None, None] * np.eye(3)  # breathing: isotropic only
    off = 0.1 * cosine(w_aniso, t)
    alpha[:, 0, 1] += off  # traceless shear: anisotropic only
    alpha[:, 1, 0] += off
    log = FakeLog({"polarizability": alpha})
    sp = raman_spectrum(log, resolution=4000, laser_nm=514.0, temperature_K=300.0, normalize=False)
    wn, c = sp.wavenumber, sp.curves
    step = wn[1] - wn[0]
    assert abs(peak_positions(wn, c["isotropic"], n=1)[0] - w_iso) <= 2 * step
    assert abs(peak_positions(wn, c["anisotropic"], n=1)[0] - w_aniso) <= 2 * step
    assert band_area(wn, c["anisotropic"], w_iso) < 1e-3 * band_area(wn, c["anisotropic"], w_aniso)
    assert band_area(wn, c["isotropic"], w_aniso) < 1e-3 * band_area(wn, c["isotropic"], w_iso)
    assert band_area(wn, c["depolarized"], w_iso) < 1e-3 * band_area(wn, c["polarized"], w_iso)
    np.testing.assert_allclose(c["polarized"], c["isotropic"] + 4 / 45 * c["anisotropic"])
    # the laser enters through (nu_laser - nu)^4 relative to nu_laser^4
    sp2 = raman_spectrum(log, resolution=4000, laser_nm=1064.0, temperature_K=300.0, normalize=False)
    k = np.argmin(np.abs(wn - w_aniso))
    l1, l2 = 1e7 / 514.0, 1e7 / 1064.0
    expected = ((l2 - wn[k]) / l2) ** 4 / ((l1 - wn[k]) / l1) ** 4
    assert abs(sp2.curves["anisotropic"][k] / c["anisotropic"][k] / expected - 1) < 1e-9
    # and the Bose factor with the temperature: hotter gives more low-frequency Stokes intensity
    hot = raman_spectrum(log, resolution=4000, temperature_K=3000.0, normalize=False)
    assert hot.curves["isotropic"][np.argmin(np.abs(wn - w_iso))] > c["isotropic"][np.argmin(np.abs(wn - w_iso))]


def test_spectra_bad_input_errors():
    t = np.arange(100) * 0.5
    with pytest.raises(KeyError, match="polarizability"):
        raman_spectrum(FakeLog({"dipole_moment": np.zeros((100, 3))}))
    with pytest.raises(KeyError, match="dipole_moment"):
        ir_spectrum(FakeLog({"polarizability": np.zeros((100, 3, 3))}))
    with pytest.raises(ValueError, match="resolution 500 needs at least 500 frames"):
        ir_spectrum(FakeLog({"dipole_moment": np.zeros((100, 3))}), resolution=500)
    uneven = FakeLog({"dipole_moment": np.zeros((100, 3))})
    uneven.times_fs = np.sqrt(t)
    with pytest.raises(ValueError, match="not equally spaced"):
        ir_spectrum(uneven)
    with pytest.raises(ValueError, match="expected \\(3, 3\\)"):
        raman_spectrum(FakeLog({"polarizability": np.zeros((100, 9))}))
    with pytest.raises(ValueError, match="quantum correction"):
        ir_spectrum(FakeLog({"dipole_moment": np.random.rand(100, 3)}), correction="bogus")


@pytest.fixture(scope="module")
def field_bundle(tmp_path_factory):
    from spkserve import registry
    from spkserve.bundle import default_outputs, write_bundle

    torch.manual_seed(0)
    spec = {"name": "neural_network_potential", "params": {
        "representation": {"name": "field_schnet", "params": dict(n_atom_basis=8, n_interactions=2, n_rbf=6,
                                                                  cutoff_angstrom=4.0)},
        "outputs": [{"name": "atomwise", "params": {}}]}}
    model = registry.build(spec).double()
    outputs = default_outputs("eV", "Angstrom", stress=False)
    outputs[keys.dipole_moment] = {"unit": "e*Angstrom", "per": "system"}
    outputs[keys.polarizability] = {"unit": "e*Angstrom^2/V", "per": "system"}
    meta = {"species": [1, 6, 8], "cutoff": 4.0, "units": {"length": "Angstrom", "energy": "eV"}, "outputs": outputs}
    path = tmp_path_factory.mktemp("fb") / "field.bundle"
    write_bundle(path, model, meta)
    return path


def test_spkmd_spectrum_command_on_a_response_run(field_bundle, tmp_path):
    d = tmp_path / "run"
    r = CliRunner().invoke(main, [
        f"simulation_dir={d}", f"calculator.model_file={field_bundle}", "calculator.properties=[dipole_moment,polarizability]",
        "dynamics.n_steps=60", "dynamics.integrator.time_step=0.5", "callbacks.progress.every_n_steps=40",
        "plots=false", "system.n_replicas=2", "dynamics/integrator=rpmd", "+dynamics/thermostat=pile_global",
    ], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["spectrum", str(d), "--ir", "--raman", "--power", "--laser-nm", "514",
                                  "--skip-ps", "0.005"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (d / "spectra.png").stat().st_size > 1000  # default -o: beside the log
    with open(d / "spectra.csv") as fh:
        rows = list(csv.reader(fh))
    head = rows[0]
    for col in ("ir_wavenumber_cm-1", "ir_ir", "raman_isotropic", "raman_anisotropic", "raman_polarized",
                "raman_depolarized", "power_power"):
        assert col in head, head
    assert "51 frames (skipped 10)" in r.output and "ir peaks" in r.output and "T 300.0 K" in r.output
    ir = np.array([float(x[head.index("ir_ir")]) for x in rows[1:] if x[head.index("ir_ir")]])
    assert np.isfinite(ir).all() and ir.max() == pytest.approx(1.0)
    # an explicit -o, and a resolution the log cannot give
    out = tmp_path / "o" / "s.png"
    r = CliRunner().invoke(main, ["spectrum", str(d), "--kind", "ir", "-o", str(out)])
    assert r.exit_code == 0 and out.is_file() and out.with_suffix(".csv").is_file(), r.output
    r = CliRunner().invoke(main, ["spectrum", str(d), "--ir", "--resolution", "5000"])
    assert r.exit_code != 0 and "lower --resolution" in r.output
    # a log without polarizability asked for Raman
    d2 = tmp_path / "plain"
    r = CliRunner().invoke(main, [f"simulation_dir={d2}", f"calculator.model_file={field_bundle}",
                                  "dynamics.n_steps=4", "plots=false", "callbacks.progress.every_n_steps=10"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["spectrum", str(d2), "--raman"])
    assert r.exit_code != 0 and "has no polarizability" in r.output and "required_properties" in r.output
