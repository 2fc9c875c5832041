"""Neural-network architectures of the runtime: layers, representations, output heads.

Importing :mod:`spkserve.nn.models` registers every built-in architecture with
:mod:`spkserve.registry`; see that module for the JSON spec format.
"""
