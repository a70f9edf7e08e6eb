"""Packaging beyond pyproject.toml: the top-level `configs/` presets ship inside the wheel
as the package data of `pipeline.configs` (a mapped folder, which pyproject's
`packages.find` cannot express), so an installed copy reads the same presets as a checkout.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["pipeline*", "stages*"]), "pipeline.configs"],
      package_dir={"pipeline.configs": "configs"},
      package_data={"pipeline.configs": ["**/*.yaml"]})
