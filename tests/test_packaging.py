"""What gets installed: every module of fastpeft/ and kernels/ in the wheel under its import name (kernels/ as
fastpeft.kernels), nothing as the top-level import name `kernels`, and kernels/ free of HF imports."""

import importlib.util
import pathlib
import shutil
import subprocess
import sys
import zipfile

import fastpeft.kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def _expected_wheel_modules() -> set[str]:
    """Every .py of the source tree, named as the wheel must hold it."""
    names = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastpeft").rglob("*.py")}
    kernels = ROOT / "kernels"
    names |= {"fastpeft/kernels/" + p.relative_to(kernels).as_posix() for p in kernels.rglob("*.py")}
    return {n for n in names if "__pycache__" not in n}


def _build_wheel(tmp_path: pathlib.Path) -> pathlib.Path:
    """`pip wheel` of a copy of the tree: the repo's own build/ may hold stale files that setuptools would ship."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".venv", ".git")
    for name in ("fastpeft", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("fastpeft-*.whl")
    return wheel


def test_wheel_holds_every_module(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
    shipped = {n for n in files if n.endswith(".py")}
    missing = _expected_wheel_modules() - shipped
    assert not missing, f"the wheel lacks {sorted(missing)}"
    tops = {n.split("/", 1)[0] for n in files if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"fastpeft"}, f"the wheel installs top-level names other than fastpeft: {sorted(tops)}"

    # Imported from the unpacked wheel in a fresh interpreter outside the repo: the modules load from the wheel.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = ("import fastpeft, fastpeft.ops, fastpeft.kernels, fastpeft.patch; "
            "print(fastpeft.__file__); print(fastpeft.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, f"import from the wheel failed:\n{out.stderr[-2000:]}"
    assert all(line.startswith(str(site)) for line in out.stdout.split()), out.stdout
