"""Names of every tensor that crosses a module boundary, defined once.

A *batch* is a ``dict[str, torch.Tensor]`` describing several systems at once
(atoms of all systems concatenated). Shapes use ``N`` atoms, ``S`` systems and
``P`` neighbor pairs.

Inputs
------
``atomic_numbers``  [N] int64
``positions``       [N, 3] float, in the bundle's length unit
``cell``            [S, 3, 3] float, lattice vectors as rows (zeros if non-periodic)
``pbc``             [S, 3] bool
``system_index``    [N] int64, the system each atom belongs to (sorted, 0..S-1)
``n_atoms``         [S] int64, atoms per system
``pair_i``/``pair_j`` [P] int64, *global* atom indices of a full neighbor list
                    (both i→j and j→i); pairs may extend beyond the model's
                    cutoff (skin lists) and every model must mask them
``pair_shifts``     [P, 3] float, integer cell shifts S so that
                    r_ij = R[j] - R[i] + S @ cell[system_index[i]]

Outputs (per system unless noted)
--------------------------------
``energy`` [S], ``forces`` [N, 3] (per atom), ``stress`` [S, 3, 3]
(= (1/V) dE/dstrain, ASE's sign convention), ``dipole_moment`` [S, 3],
``polarizability`` [S, 3, 3], ``partial_charges`` [N] (per atom),
``nuclear_magnetic_shielding`` [N, 3, 3] (per atom, ppm),
``energy_uncertainty`` [S].
"""

from __future__ import annotations

# inputs
Z = "atomic_numbers"
R = "positions"
cell = "cell"
pbc = "pbc"
idx_m = "system_index"
n_atoms = "n_atoms"
idx_i = "pair_i"
idx_j = "pair_j"
shifts = "pair_shifts"
total_charge = "total_charge"
electric_field = "electric_field"
magnetic_field = "magnetic_field"
#: [N, 3] nuclear magnetic moments (reduced units), the per-atom "field" of shielding
nuclear_magnetic_moments = "nuclear_magnetic_moments"

# derived inside models
Rij = "pair_vectors"
strain = "strain"

# outputs
energy = "energy"
forces = "forces"
stress = "stress"
virial = "virial"
dipole_moment = "dipole_moment"
polarizability = "polarizability"
partial_charges = "partial_charges"
atomic_energies = "atomic_energies"
energy_uncertainty = "energy_uncertainty"
# committees (spkserve.ensemble)
forces_uncertainty = "forces_uncertainty"
committee_energy = "committee_energy"
committee_forces = "committee_forces"
nuclear_magnetic_shielding = "nuclear_magnetic_shielding"

#: outputs given per atom (all others are per system)
PER_ATOM_OUTPUTS = frozenset({forces, partial_charges, atomic_energies, nuclear_magnetic_shielding, committee_forces})

#: input keys every batch carries
INPUT_KEYS = (Z, R, cell, pbc, idx_m, n_atoms, idx_i, idx_j, shifts)
