"""Vibrational spectra from MD logs.

* :func:`power_spectrum`: Fourier transform of the mass-weighted velocity
  autocorrelation function (peaks at the vibrational frequencies).
* :func:`ir_spectrum`: Fourier transform of the autocorrelation of the dipole
  time derivative (needs ``dipole_moment`` in the log: run with
  ``calculator.properties=[dipole_moment]``).

Frequencies in cm⁻¹; intensities in arbitrary units (normalised to a maximum of 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spkserve import units


def autocorrelation(x: np.ndarray, resolution: int | None = None) -> np.ndarray:
    """Autocorrelation along axis 0 (zero-padded FFT, unbiased normalisation), summed over
    the other axes; returns lags 0..resolution-1."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n = len(x)
    if n < 2:
        raise ValueError(f"need at least 2 frames for an autocorrelation, got {n}")
    size = 2 ** int(np.ceil(np.log2(2 * n)))
    f = np.fft.rfft(x, n=size, axis=0)
    acf = np.fft.irfft(f * np.conj(f), n=size, axis=0)[:n].sum(axis=1)
    acf /= np.arange(n, 0, -1)
    return acf[: (resolution or n)]


def spectrum_from_acf(acf: np.ndarray, dt_fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Hann-windowed, mirrored cosine transform of an autocorrelation; returns (cm⁻¹, intensity)."""
    window = np.hanning(2 * len(acf))[len(acf):]
    a = acf * window
    full = np.concatenate([a, a[-2:0:-1]])  # even extension
    spec = np.real(np.fft.rfft(full))
    freq_per_fs = np.fft.rfftfreq(len(full), d=dt_fs)
    c_cm_per_fs = units.SPEED_OF_LIGHT_M_PER_S * units.factor("m/s", "cm/fs")
    wavenumber = freq_per_fs / c_cm_per_fs
    spec = np.clip(spec, 0.0, None)
    if spec.max() > 0:
        spec = spec / spec.max()
    return wavenumber, spec


def _dt_fs(log) -> float:
    t = log.times_fs
    if len(t) < 2:
        raise ValueError("the log holds fewer than 2 frames")
    dt = np.diff(t)
    if not np.allclose(dt, dt[0], rtol=1e-6):
        raise ValueError("logged frames are not equally spaced in time")
    return float(dt[0])


def power_spectrum(log, molecule: int = 0, replica: int | None = None, resolution: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Vibrational density of states of one molecule from an :class:`~spkmd.data.HDF5Loader`."""
    v = log.get_velocities(molecule, replica)  # [T, n, 3]
    m = log.masses_amu[log.atoms_of(molecule)]
    acf = autocorrelation(v * np.sqrt(m)[None, :, None], min(resolution, len(v)))
    return spectrum_from_acf(acf, _dt_fs(log))


def ir_spectrum(log, molecule: int = 0, replica: int | None = None, resolution: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """IR spectrum from the dipole time derivative (central differences)."""
    if "dipole_moment" not in log.available:
        raise KeyError("the log has no dipole_moment; run with calculator.properties=[dipole_moment]")
    mu = log.get_property("dipole_moment", molecule, replica)  # [T, 3]
    dt = _dt_fs(log)
    dmu = np.gradient(mu, dt, axis=0)
    acf = autocorrelation(dmu, min(resolution, len(dmu)))
    return spectrum_from_acf(acf, dt)


def plot_spectrum(wavenumber: np.ndarray, intensity: np.ndarray, path: str | Path, title: str = "",
                  max_wavenumber: float = 4500.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = wavenumber <= max_wavenumber
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(wavenumber[sel], intensity[sel], lw=0.8)
    ax.set_xlabel("wavenumber / cm$^{-1}$")
    ax.set_ylabel("intensity / a.u.")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
