"""Packaging for `pip install .`: this repository root becomes the package `cachekit`.

Every subpackage is found by discovery (a new one ships without editing this file). install.py
stays out of the package: it is ComfyUI-Manager's install script, and a module that runs pip
must never be importable as `cachekit.install`. Metadata lives in pyproject.toml.
"""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SCRIPTS_ONLY = {"install"}          # root modules that are scripts, not part of the package


class BuildWithoutScripts(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (m[0] == "cachekit" and m[1] in SCRIPTS_ONLY)]


setup(
    package_dir={"cachekit": "."},
    packages=["cachekit"] + [f"cachekit.{name}" for name in find_packages(".", exclude=["tests", "tests.*"])],
    package_data={"cachekit": ["web/*.js", "workflows/*.json", "icon.png", "LICENSE"],
                  "cachekit.tinymodels": ["weights/*.safetensors", "weights/*.json", "weights/*.md"]},
    cmdclass={"build_py": BuildWithoutScripts},
)
