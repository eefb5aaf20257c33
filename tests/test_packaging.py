"""kernels/ is installed as fastpeft.kernels and nothing claims the top-level import name `kernels`."""

import importlib.util
import pathlib
import subprocess
import sys

import fastpeft.kernels


def test_kernels_installed_under_fastpeft():
    assert fastpeft.kernels.__name__ == "fastpeft.kernels"


def test_no_top_level_kernels_module():
    # A fresh interpreter from a neutral directory: the repo root on sys.path would find the source folder itself.
    # Hugging Face's own `kernels` distribution may legitimately be installed: then it must not be ours.
    code = ("import importlib.util; s = importlib.util.find_spec('kernels'); "
            "print('' if s is None else (s.origin or str(list(s.submodule_search_locations))))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    ours = str(pathlib.Path(fastpeft.kernels.__file__).parent)
    assert ours not in out, f"top-level `kernels` resolves to fastpeft's source: {out}"


def test_kernels_package_has_no_hf_imports():
    root = pathlib.Path(fastpeft.kernels.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        for banned in ("import transformers", "from transformers", "import peft", "from peft"):
            assert banned not in text, f"{path.name} imports HF ({banned}); kernels/ must stay HF-free"
    assert importlib.util.find_spec("fastpeft.kernels") is not None
