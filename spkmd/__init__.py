"""spkmd: a batched PyTorch molecular-dynamics engine on spkserve force providers.

Design (extension points for ring-polymer MD, barostats and NPT):

* :class:`spkmd.system.System` — the whole state, Hartree atomic units inside.
  positions/momenta/forces ``[R, N, 3]`` (R replicas = ring-polymer beads, N atoms of
  all molecules), masses ``[N]``, cells ``[R, M, 3, 3]``, pbc ``[M, 3]``, energy ``[R, M]``,
  stress ``[R, M, 3, 3]`` (Hartree/Bohr³, (1/V) dE/dε), ``dof [M]``. Per-molecule sums with
  ``system.sum_molecules``; broadcasting back with ``system.expand_molecules``.
* :class:`spkmd.integrators.Integrator` — ``main_step(system)`` (half-kick + drift) and
  ``half_step(system)`` (half-kick); :class:`~spkmd.integrators.VelocityVerlet` splits
  ``kick``/``drift`` so a ring-polymer or NPT integrator overrides ``drift`` only;
  ``energy_contribution(system)`` adds e.g. spring energy to the conserved quantity.
* :class:`spkmd.hooks.Hook` — ``on_simulation_start``, ``on_step_begin`` (thermostat/barostat
  half-step), ``on_step_middle``, ``on_step_end`` (reverse order), ``on_step_finalize``,
  ``on_step_failed``, ``on_simulation_end``; ``bath_energy()`` [R, M] enters the conserved
  quantity; ``state_dict``/``load_state_dict`` go into checkpoints; ``flush`` for loggers.
* :class:`spkmd.thermostats.Thermostat` — one narrow method ``half_step(system)``; energy
  accounting, RNG (``simulator.generator``) and checkpointing in the base class.
* :class:`spkmd.simulator.Simulator` — ``simulate(n_steps)`` (resumable), ``to(device, dtype)``,
  ``state_dict``/``save_checkpoint``/``load_checkpoint`` (bit-for-bit restarts).
* :mod:`spkmd.calculators` — ``ProviderCalculator(provider)`` (any spkserve ForceProvider, all
  replicas × molecules in one call), ``BundleCalculator``, ``EnsembleCalculator``.
* :mod:`spkmd.factory` — config builders with registries ``register("integrator"|"thermostat"|
  "barostat", name)``; ``spkmd.rpmd`` and ``spkmd.barostats`` are imported on demand.
"""

__version__ = "0.1.0"
