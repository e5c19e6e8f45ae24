"""The package list, which pyproject.toml cannot compute: the three code folders install
under one `polymae` namespace (the bare names modalities, pipelines and shared are taken
on PyPI), and every sub-folder of modalities/ with an __init__.py is a modality package,
so adding one needs no edit here."""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
modalities = sorted(p.parent.name for p in (ROOT / "modalities").glob("*/__init__.py"))
setup(packages=["polymae.shared", "polymae.pipelines", "polymae.modalities", "polymae.configs",
                *[f"polymae.modalities.{name}" for name in modalities]])
