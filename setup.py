"""Packaging: the folders stay at the top of the repository, where the product card puts them (core/, jobs/, api/,
worker/, cli/, client/, migrations/), and install as one namespace: `langadapt.core`, `langadapt.jobs`, ... Nothing else
claims a top-level import name. Metadata and dependencies are in pyproject.toml."""

from setuptools import find_namespace_packages, setup

FOLDERS = ("core", "jobs", "api", "worker", "cli", "client", "migrations")


def packages(folder: str) -> list[str]:
    return [f"langadapt.{folder}"] + [f"langadapt.{folder}.{sub}" for sub in find_namespace_packages(folder)]


setup(
    packages=[name for folder in FOLDERS for name in packages(folder) if "__pycache__" not in name],
    package_dir={f"langadapt.{folder}": folder for folder in FOLDERS},
    package_data={
        "langadapt.migrations": ["script.py.mako"],
        "langadapt.api": ["dashboard/templates/*.html", "dashboard/static/*"],
    },
)
