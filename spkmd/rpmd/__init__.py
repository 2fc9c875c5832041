"""Ring-polymer (path-integral) MD: normal modes, integrator, estimators, thermostats."""

from spkmd.rpmd.estimators import RingPolymerEstimators, estimate
from spkmd.rpmd.integrator import RingPolymerError, RingPolymerIntegrator, check_ring_polymer_setup
from spkmd.rpmd.normal_modes import FreeRingPolymerPropagator, normal_mode_frequencies, normal_mode_matrix
from spkmd.rpmd.thermostats import (
    PIGLET,
    RPMD_THERMOSTATS,
    RPMDGLE,
    TRPMD,
    NHCNormalModes,
    PILEGlobal,
    PILELocal,
)

from spkmd.rpmd import _register  # noqa: F401,E402  (config builders for spkmd.factory)

__all__ = [
    "FreeRingPolymerPropagator", "NHCNormalModes", "PIGLET", "PILEGlobal", "PILELocal", "RPMDGLE",
    "RPMD_THERMOSTATS", "RingPolymerError", "RingPolymerEstimators", "RingPolymerIntegrator", "TRPMD",
    "check_ring_polymer_setup", "estimate", "normal_mode_frequencies", "normal_mode_matrix",
]
