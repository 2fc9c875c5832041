"""YAML configs shipped with the toolkit (installed as the package ``spk_configs``)."""
