"""training: datasets, transforms, losses, the Lightning task and the ``spktrain`` command."""

__version__ = "0.1.0"
