"""Vibrational spectra from MD logs (classical runs and ring-polymer runs, where the
bead average of a property is used, as for RPMD correlation functions).

* :func:`power_spectrum`: Fourier transform of the mass-weighted velocity
  autocorrelation function (peaks at the vibrational frequencies).
* :func:`ir_spectrum`: Fourier transform of the autocorrelation of the dipole
  time derivative (needs ``dipole_moment`` in the log). With the *harmonic*
  quantum correction Q(ω) = βħω / (1 - exp(-βħω)) applied to the classical line
  shape, the absorption coefficient α(ω)n(ω) ∝ ω (1 - e^{-βħω}) Q(ω) S_cl(ω) =
  βħ FT[<μ̇(0)·μ̇(t)>]: the classical dipole-derivative spectrum is already the
  harmonic-corrected one (factor 1). ``correction="schofield"`` multiplies by
  exp(βħω/2) / Q(ω) instead.
* :func:`raman_spectrum`: isotropic and anisotropic Raman spectra from the
  polarizability (needs ``polarizability``): with a = tr(α)/3 and β = α - a·1,
  I_iso = FT[<ȧ(0) ȧ(t)>], I_aniso = FT[(3/2) Σ_ij <β̇_ij(0) β̇_ij(t)>]; polarized
  = I_iso + (4/45) I_aniso, depolarized = (1/15) I_aniso; each scaled to a
  Stokes cross section by (ν̃_laser - ν̃)^4 / ν̃ / (1 - exp(-hcν̃/kT)) (the
  harmonic quantum correction of the classical polarizability line shape).

Frequencies in cm⁻¹; intensities in arbitrary units that are consistent within one
spectrum (``normalize=True`` scales the maximum to 1).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spkserve import units

_C_CM_PER_FS = units.SPEED_OF_LIGHT_M_PER_S * units.factor("m/s", "cm/fs")
#: h c / k_B in cm K (second radiation constant)
_HC_OVER_K_CM_K = units.PLANCK_J_S * units.SPEED_OF_LIGHT_M_PER_S * 100.0 / units.BOLTZMANN_J_PER_K


@dataclass
class Spectrum:
    """One or more spectra on a common wavenumber axis (cm⁻¹)."""

    wavenumber: np.ndarray
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    title: str = ""

    def normalized(self) -> "Spectrum":
        top = max((float(c.max()) for c in self.curves.values()), default=0.0)
        scale = 1.0 / top if top > 0 else 1.0
        return Spectrum(self.wavenumber, {k: v * scale for k, v in self.curves.items()}, self.title)


def autocorrelation(x: np.ndarray, resolution: int | None = None) -> np.ndarray:
    """Autocorrelation along axis 0 (zero-padded FFT, unbiased normalisation), summed over
    the other axes; returns lags 0..resolution-1."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n = len(x)
    if n < 2:
        raise ValueError(f"need at least 2 frames for an autocorrelation, got {n}")
    if resolution is not None and resolution > n:
        raise ValueError(
            f"resolution {resolution} needs at least {resolution} frames but the log has {n} after skipping; "
            f"lower --resolution (at most {n}) or run longer"
        )
    size = 2 ** int(np.ceil(np.log2(2 * n)))
    f = np.fft.rfft(x, n=size, axis=0)
    acf = np.fft.irfft(f * np.conj(f), n=size, axis=0)[:n].sum(axis=1)
    acf /= np.arange(n, 0, -1)
    return acf[: (resolution or n)]


def spectrum_from_acf(acf: np.ndarray, dt_fs: float, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Hann-windowed, mirrored cosine transform of an autocorrelation; returns (cm⁻¹, intensity)."""
    window = np.hanning(2 * len(acf))[len(acf):]
    a = acf * window
    full = np.concatenate([a, a[-2:0:-1]])  # even extension
    spec = np.real(np.fft.rfft(full)) * dt_fs
    freq_per_fs = np.fft.rfftfreq(len(full), d=dt_fs)
    wavenumber = freq_per_fs / _C_CM_PER_FS
    spec = np.clip(spec, 0.0, None)
    if normalize and spec.max() > 0:
        spec = spec / spec.max()
    return wavenumber, spec


def _dt_fs(log) -> float:
    t = np.asarray(log.times_fs, dtype=np.float64)
    if len(t) < 2:
        raise ValueError("the log holds fewer than 2 frames")
    dt = np.diff(t)
    if not np.allclose(dt, dt[0], rtol=1e-6):
        raise ValueError(
            f"logged frames are not equally spaced in time (spacings {dt.min():g}..{dt.max():g} fs): "
            "spectra need a constant logging interval; skip the part before a restart with another interval"
        )
    return float(dt[0])


def _resolution(n_frames: int, resolution: int | None) -> int:
    return min(4096, max(2, n_frames // 2)) if resolution is None else int(resolution)


def power_spectrum(log, molecule: int = 0, replica: int | None = None, resolution: int | None = None,
                   normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Vibrational density of states of one molecule from an :class:`~spkmd.data.HDF5Loader`."""
    v = log.get_velocities(molecule, replica)  # [T, n, 3]
    m = log.masses_amu[log.atoms_of(molecule)]
    acf = autocorrelation(v * np.sqrt(m)[None, :, None], _resolution(len(v), resolution))
    return spectrum_from_acf(acf, _dt_fs(log), normalize)


def _require(log, name: str, what: str) -> None:
    if name not in log.available:
        raise KeyError(
            f"the log has no {name}, which the {what} spectrum needs; run with "
            f"calculator.required_properties=[energy,forces,{name}] and log it "
            f"(callbacks.hdf5 data_streams / target_properties including {name}) using a bundle that predicts it"
        )


def _derivative(x: np.ndarray, dt_fs: float) -> np.ndarray:
    if len(x) < 3:
        raise ValueError(f"need at least 3 frames for a time derivative, got {len(x)}")
    return np.gradient(x, dt_fs, axis=0)


def quantum_correction(wavenumber: np.ndarray, temperature_K: float, kind: str) -> np.ndarray:
    """Factor applied to the classical dipole-derivative IR spectrum (1 for ``harmonic``)."""
    if kind in ("harmonic", "none"):
        return np.ones_like(wavenumber)
    if kind != "schofield":
        raise ValueError(f"unknown quantum correction {kind!r}; use harmonic, schofield or none")
    if not temperature_K > 0:
        raise ValueError(f"the schofield correction needs a temperature > 0 K, got {temperature_K}")
    x = _HC_OVER_K_CM_K * np.asarray(wavenumber) / temperature_K  # beta hbar omega
    with np.errstate(divide="ignore", invalid="ignore"):
        harm = np.where(x > 1e-12, x / -np.expm1(-x), 1.0)
    return np.exp(x / 2) / harm


def ir_spectrum(log, molecule: int = 0, replica: int | None = None, resolution: int | None = None,
                normalize: bool = True, correction: str = "harmonic", temperature_K: float = 300.0,
                ) -> tuple[np.ndarray, np.ndarray]:
    """IR absorption from the dipole time derivative (central differences); see the module docstring."""
    _require(log, "dipole_moment", "IR")
    mu = np.asarray(log.get_property("dipole_moment", molecule, replica), dtype=np.float64)  # [T, 3]
    dt = _dt_fs(log)
    acf = autocorrelation(_derivative(mu, dt), _resolution(len(mu), resolution))
    wn, spec = spectrum_from_acf(acf, dt, normalize=False)
    spec = spec * quantum_correction(wn, temperature_K, correction)
    if normalize and spec.max() > 0:
        spec = spec / spec.max()
    return wn, spec


def raman_spectrum(log, molecule: int = 0, replica: int | None = None, resolution: int | None = None,
                   laser_nm: float = 514.0, temperature_K: float = 300.0, normalize: bool = True,
                   min_wavenumber: float = 50.0) -> Spectrum:
    """Isotropic, anisotropic, polarized and depolarized Stokes Raman spectra (see the module docstring).

    Args:
        laser_nm: wavelength of the incident laser (nm).
        temperature_K: temperature of the Bose-Einstein factor.
        min_wavenumber: below this (cm⁻¹) the 1/ν̃ factor diverges; intensities there are set to 0.
    """
    _require(log, "polarizability", "Raman")
    if not laser_nm > 0:
        raise ValueError(f"laser wavelength must be > 0 nm, got {laser_nm}")
    if not temperature_K > 0:
        raise ValueError(f"temperature must be > 0 K, got {temperature_K}")
    alpha = np.asarray(log.get_property("polarizability", molecule, replica), dtype=np.float64)
    if alpha.shape[1:] != (3, 3):
        raise ValueError(f"logged polarizability has shape {alpha.shape[1:]} per frame, expected (3, 3)")
    dt = _dt_fs(log)
    res = _resolution(len(alpha), resolution)
    alpha = 0.5 * (alpha + alpha.transpose(0, 2, 1))
    iso = np.trace(alpha, axis1=1, axis2=2) / 3.0  # [T]
    aniso = alpha - iso[:, None, None] * np.eye(3)
    wn, s_iso = spectrum_from_acf(autocorrelation(_derivative(iso, dt), res), dt, normalize=False)
    _, s_aniso = spectrum_from_acf(1.5 * autocorrelation(_derivative(aniso, dt), res), dt, normalize=False)
    laser_cm = 1e7 / laser_nm
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = _HC_OVER_K_CM_K * wn / temperature_K
        prefactor = np.clip(laser_cm - wn, 0.0, None) ** 4 / wn / -np.expm1(-x)
    prefactor = np.where(wn >= min_wavenumber, prefactor, 0.0) / laser_cm**4
    curves = {
        "isotropic": s_iso * prefactor,
        "anisotropic": s_aniso * prefactor,
    }
    curves["polarized"] = curves["isotropic"] + 4.0 / 45.0 * curves["anisotropic"]
    curves["depolarized"] = curves["anisotropic"] / 15.0
    out = Spectrum(wn, curves, f"Raman (laser {laser_nm:g} nm, {temperature_K:g} K)")
    return out.normalized() if normalize else out


def peak_positions(wavenumber: np.ndarray, intensity: np.ndarray, n: int = 5, min_wavenumber: float = 100.0,
                   rel_height: float = 0.05) -> np.ndarray:
    """Wavenumbers of the ``n`` highest local maxima above ``rel_height`` of the maximum."""
    wn, y = np.asarray(wavenumber), np.asarray(intensity)
    sel = wn >= min_wavenumber
    wn, y = wn[sel], y[sel]
    if len(y) < 3 or y.max() <= 0:
        return np.zeros(0)
    is_max = (y[1:-1] > y[:-2]) & (y[1:-1] >= y[2:]) & (y[1:-1] >= rel_height * y.max())
    idx = np.nonzero(is_max)[0] + 1
    idx = idx[np.argsort(y[idx])[::-1][:n]]
    return wn[np.sort(idx)]


def write_csv(spectra: dict[str, Spectrum], path: str | Path) -> Path:
    """All curves as columns ``<spectrum>_<curve>`` beside one ``wavenumber_cm-1`` column per spectrum."""
    path = Path(path)
    cols: list[tuple[str, np.ndarray]] = []
    for name, sp in spectra.items():
        cols.append((f"{name}_wavenumber_cm-1", sp.wavenumber))
        cols += [(f"{name}_{k}", v) for k, v in sp.curves.items()]
    n = max(len(c) for _, c in cols)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([h for h, _ in cols])
        for i in range(n):
            w.writerow([f"{c[i]:.8g}" if i < len(c) else "" for _, c in cols])
    return path


def plot_spectra(spectra: dict[str, Spectrum], path: str | Path, max_wavenumber: float = 4000.0) -> Path:
    """One panel per spectrum (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(spectra), 1, figsize=(7, 2.8 * len(spectra)), squeeze=False, sharex=True)
    for ax, (name, sp) in zip(axes[:, 0], spectra.items()):
        sel = sp.wavenumber <= max_wavenumber
        for label, y in sp.curves.items():
            ax.plot(sp.wavenumber[sel], y[sel], lw=0.8, label=label)
        ax.set_ylabel("intensity / a.u.")
        ax.set_title(sp.title or name)
        if len(sp.curves) > 1:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("wavenumber / cm$^{-1}$")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_spectrum(wavenumber: np.ndarray, intensity: np.ndarray, path: str | Path, title: str = "",
                  max_wavenumber: float = 4500.0) -> Path:
    """A single curve (PNG)."""
    return plot_spectra({"spectrum": Spectrum(wavenumber, {"intensity": intensity}, title)}, path, max_wavenumber)


def run_temperature(config_path: Path) -> float | None:
    """The thermostat (or initial) temperature of the run whose saved config this is (K), if any."""
    if not config_path.is_file():
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config_path)
    for key in ("dynamics.thermostat.temperature", "system.initializer.temperature"):
        v = OmegaConf.select(cfg, key, default=None)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return None


def compute_spectra(
    log_path: str | Path,
    png_path: str | Path,
    kinds: list[str] | tuple[str, ...] = ("power",),
    molecule: int = 0,
    replica: int | None = None,
    skip_frames: int = 0,
    skip_ps: float | None = None,
    resolution: int | None = None,
    laser_nm: float = 514.0,
    temperature_K: float | None = None,
    correction: str = "harmonic",
) -> tuple[list[Path], str]:
    """What ``spkmd spectrum`` does: spectra of one molecule of a log, a PNG and a CSV beside it.

    Returns the files written and a one-line summary (frames used, time step, temperature, peaks).
    """
    from spkmd.data import HDF5Loader

    unknown = set(kinds) - {"power", "ir", "raman"}
    if unknown:
        raise ValueError(f"unknown spectrum kinds {sorted(unknown)}; use power, ir, raman")
    if skip_ps is not None:
        full = HDF5Loader(log_path)
        dt = _dt_fs(full)
        skip_frames = int(round(skip_ps * 1000.0 / dt))
        if skip_frames >= len(full) - 2:
            raise ValueError(
                f"--skip-ps {skip_ps} skips {skip_frames} of the log's {len(full)} frames "
                f"({len(full) * dt / 1000:.3g} ps); skip less or run longer"
            )
    log = HDF5Loader(log_path, skip_initial=skip_frames)
    dt = _dt_fs(log)
    if temperature_K is None:
        temperature_K = run_temperature(Path(log_path).parent / "config.yaml")
    if temperature_K is None:
        temperature_K = float(np.mean(log.get_temperature(molecule, replica)))
    spectra: dict[str, Spectrum] = {}
    for kind in kinds:
        if kind == "power":
            wn, y = power_spectrum(log, molecule, replica, resolution)
            spectra["power"] = Spectrum(wn, {"power": y}, "power spectrum (velocity autocorrelation)")
        elif kind == "ir":
            wn, y = ir_spectrum(log, molecule, replica, resolution, correction=correction, temperature_K=temperature_K)
            spectra["ir"] = Spectrum(wn, {"ir": y}, f"IR (dipole derivative, {correction} correction)")
        else:
            spectra["raman"] = raman_spectrum(log, molecule, replica, resolution, laser_nm, temperature_K)
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    files = [plot_spectra(spectra, png), write_csv(spectra, png.with_suffix(".csv"))]
    peaks = []
    for name, sp in spectra.items():
        main = next(iter(sp.curves.values())) if name != "raman" else sp.curves["polarized"]
        p = peak_positions(sp.wavenumber, main, n=4)
        peaks.append(f"{name} peaks " + (", ".join(f"{v:.0f}" for v in p) + " cm^-1" if len(p) else "none resolved"))
    info = (f"{len(log)} frames (skipped {skip_frames}), dt {dt:g} fs, T {temperature_K:.1f} K; " + "; ".join(peaks))
    return files, info
