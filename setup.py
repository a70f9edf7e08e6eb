"""Packaging beyond pyproject.toml: the top-level `configs/` presets (data sets and ablation
plans) ship inside the wheel as the package data of `any2seg.configs` (a mapped folder, which
pyproject's `packages.find` cannot express), so an installed copy reads the same presets as a
checkout. The real-data recipes are `pipelines/NAME/params.yaml` of a checkout, not presets.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["any2seg*", "pipeline*", "stages*"]), "any2seg.configs"],
      package_dir={"any2seg.configs": "configs"},
      package_data={"any2seg.configs": ["**/*.yaml"]})
