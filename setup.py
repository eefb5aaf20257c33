"""Package discovery only; the metadata is in pyproject.toml.

pyproject's ``packages`` is either a fixed list (which missed ``fastpeft.ops``: tests/test_packaging.py) or one
``find``, and ``find`` cannot install kernels/ under another name. kernels/ is installed as ``fastpeft.kernels``;
nothing claims the top-level name ``kernels`` (Hugging Face's ``kernels`` distribution owns it).
"""

from setuptools import find_packages, setup

KERNELS = "fastpeft.kernels"

setup(
    packages=find_packages(include=["fastpeft", "fastpeft.*"])
    + [KERNELS] + [f"{KERNELS}.{name}" for name in find_packages("kernels")],
    package_dir={"fastpeft": "fastpeft", KERNELS: "kernels"},  # subpackages of fastpeft.kernels follow kernels/
)
