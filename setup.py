"""Package list only (everything else is in pyproject.toml).

``configs/`` is installed as the package ``spk_configs`` so that a plain,
non-editable ``pip install .`` ships the YAML configs; code finds them with
``importlib.resources.files("spk_configs")``.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["spkserve*", "spkmd*", "training*"]) + ["spk_configs"],
    package_dir={"spk_configs": "configs"},
)
