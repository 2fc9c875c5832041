"""spkserve: the model runtime (units, neighbor lists, architectures, bundles) and its servers.

Importing ``spkserve`` never imports ``spkmd``, ``training`` or Lightning.
"""

__version__ = "0.1.0"
