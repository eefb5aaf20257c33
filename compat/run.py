"""Run PEFT's own test suite twice, plain and with every PEFT model patched by fastpeft, and compare.

    python -m compat.run                                   # tests/test_custom_models.py, LoRA and IA3 cases
    python -m compat.run --methods all                     # the whole file, every PEFT method
    python -m compat.run --files tests/test_decoder_models.py -k "lora" -- -x --timeout 60

Downloads PEFT's sdist at the installed version into compat/.cache/ (once), runs pytest there with
``-p compat.plugin`` in both modes (concurrently by default: one core each, torch on one thread), then prints and
writes (``--summary``, default compat/.cache/results/summary.md) the counts per mode, the tests that pass plain and
fail patched (the defects, with the first lines of each failure), the tests that fail plain (ignored), the
fused-layer counts and wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MODES = ("plain", "patched")


def ensure_sdist() -> Path:
    from importlib.metadata import version

    ver = version("peft")
    root = CACHE / f"peft-{ver}"
    if not (root / "tests").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"peft=={ver}", "--no-binary", ":all:", "--no-deps",
                        "-q", "-d", str(CACHE)], check=True)
        with tarfile.open(CACHE / f"peft-{ver}.tar.gz") as tar:
            tar.extractall(CACHE, filter="data")
    (root / "tests" / "__init__.py").touch()  # the sdist drops it; the tests use relative imports
    # compat importable without putting the repo root on sys.path (its kernels/ and tests/ would shadow packages)
    pypath = CACHE / "pypath"
    pypath.mkdir(exist_ok=True)
    link = pypath / "compat"
    if not link.exists():
        link.symlink_to(HERE, target_is_directory=True)
    return root


def git(*a: str) -> str:
    return subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True, check=True).stdout.strip()


def fastpeft_at(rev: str | None) -> tuple[Path | None, str]:
    """(dir to put first on sys.path, description) of the fastpeft under test: the working tree (the editable
    install), or a commit exported once into the cache (kernels/ placed as fastpeft/kernels, as setup.py does)."""
    head = git("rev-parse", "--short=12", "HEAD")
    if rev is None:
        dirty = git("status", "--porcelain", "--", "fastpeft", "kernels").splitlines()
        return None, f"working tree at HEAD {head}" + (f" with {len(dirty)} uncommitted file(s) in fastpeft/, "
                                                       f"kernels/" if dirty else ", clean")
    sha = git("rev-parse", "--short=12", rev)
    d = CACHE / f"fastpeft-{sha}"
    if not (d / "fastpeft").is_dir():
        d.mkdir(parents=True, exist_ok=True)
        tar = subprocess.run(["git", "archive", sha, "fastpeft", "kernels"], cwd=HERE.parent, capture_output=True,
                             check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(d)], input=tar, check=True)
        if (d / "kernels").is_dir() and not (d / "fastpeft" / "kernels").exists():
            (d / "kernels").rename(d / "fastpeft" / "kernels")
    return d, f"commit {sha} ({git('log', '-1', '--format=%s', sha)[:80]})"


def run_mode(mode: str, root: Path, out: Path, args, threads: int, fp_dir: Path | None) -> subprocess.Popen:
    path = [str(CACHE / "pypath"), str(fp_dir) if fp_dir else None, os.environ.get("PYTHONPATH")]
    env = dict(os.environ, FASTPEFT_COMPAT=mode, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, path)))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "pytest", "-p", "compat.plugin", "-o", "addopts=", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit1", "-q", "-p", "no:randomly", f"--junitxml={out / f'{mode}.xml'}",
           f"--compat-stats={out / f'{mode}.json'}", *args.files,
           # PEFT's pyproject makes transformers' FutureWarnings errors; transformers 5.23 deprecates an attribute
           # (and a method) that peft 0.21.2 uses on transformers models: ignored, in both modes
           "-W", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
           "-W", "ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"]
    if args.methods != "all":
        cmd.append(f"--compat-methods={args.methods}")
    if args.k:
        cmd += ["-k", args.k]
    cmd += args.pytest_args
    log = open(out / f"{mode}.log", "w")
    print(f"[{mode}] {' '.join(cmd)}\n[{mode}] log: {out / f'{mode}.log'}", flush=True)
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


def parse_junit(path: Path) -> dict[str, tuple[str, str]]:
    """nodeid -> (status, failure text)."""
    res = {}
    if not path.exists():
        return res
    for case in ET.parse(path).iter("testcase"):
        file, cls, name = case.get("file", ""), case.get("classname", ""), case.get("name", "")
        mod = file[:-3].replace("/", ".") if file.endswith(".py") else ""
        rest = cls[len(mod) + 1:] if mod and cls.startswith(mod + ".") else cls
        nodeid = "::".join([file or mod, *(rest.split(".") if rest else []), name])
        status, text = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (el.get("message") or "") + "\n" + (el.text or "")
                break
        if nodeid in res and res[nodeid][0] in ("failed", "error"):
            continue  # a teardown error after a failure: keep the failure
        res[nodeid] = (status, text)
    return res


def counts(res) -> dict[str, int]:
    c = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for status, _ in res.values():
        c[status] += 1
    return c


def essence(text: str, n: int = 3) -> str:
    """The failure's message line plus the last 'E   ' lines of the traceback."""
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    elines = [ln[4:].strip() for ln in lines if ln.startswith("E   ")]
    body = [ln for ln in elines if ln and ln not in first][:n]
    return " | ".join([first[:300], *[b[:200] for b in body]]).strip(" |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="+", default=["tests/test_custom_models.py"],
                   help="PEFT test files, relative to the sdist root (default: tests/test_custom_models.py)")
    p.add_argument("-k", default=None, help="pytest -k expression")
    p.add_argument("--methods", default="LoraConfig,IA3Config",
                   help="PEFT config classes whose parametrized cases run (comma list, or 'all'); tests not "
                        "parametrized by a config always run")
    p.add_argument("--modes", default="plain,patched")
    p.add_argument("--serial", action="store_true", help="run the modes one after the other (default: concurrently)")
    p.add_argument("--out", default=str(CACHE / "results"), help="junit xml, logs, stats JSON (default %(default)s)")
    p.add_argument("--summary", default=None, help="markdown summary path (default OUT/summary.md)")
    p.add_argument("--fastpeft-rev", default=None,
                   help="test fastpeft at this git commit (exported to the cache) instead of the working tree")
    p.add_argument("pytest_args", nargs="*", help="extra pytest args, after --")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = ensure_sdist()
    fp_dir, fp_desc = fastpeft_at(args.fastpeft_rev)

    walls: dict[str, float] = {}
    threads = 0 if args.serial else max(1, (os.cpu_count() or 2) // len(modes))
    if args.serial:
        for m in modes:
            t0 = time.perf_counter()
            run_mode(m, root, out, args, threads, fp_dir).wait()
            walls[m] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        procs = {m: run_mode(m, root, out, args, threads, fp_dir) for m in modes}
        pending = dict(procs)
        while pending:
            for m, pr in list(pending.items()):
                if pr.poll() is not None:
                    walls[m] = time.perf_counter() - t0
                    del pending[m]
            time.sleep(1)

    res = {m: parse_junit(out / f"{m}.xml") for m in modes}
    stats = {}
    for m in modes:
        f = out / f"{m}.json"
        stats[m] = json.loads(f.read_text()) if f.exists() else {}
    lines = [f"# PEFT test suite, plain vs fastpeft-patched", "",
             f"files: {' '.join(args.files)}; methods: {args.methods}; -k: {args.k!r}; extra: {args.pytest_args}",
             f"fastpeft: {fp_desc}; patched as fastpeft.patch(model, backend='torch')", ""]
    for m in modes:
        c = counts(res[m])
        lines.append(f"- {m}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped, "
                     f"{c['error']} errors; wall {walls[m]:.0f} s"
                     + ("" if args.serial else " (modes run concurrently, one core each)"))
    st = stats.get("patched", {})
    if st:
        lines.append(f"- patched: {st['fused_total']} fused layers over {st['patch_calls']} patch calls "
                     f"({st['fused_distinct']} distinct modules); {st['tests_with_fused']} of {st['tests']} tests "
                     f"ran with at least one fused layer; {st['escaped_total']} LoRA/IA3 layers escaped patching")
    if st.get("fastpeft_file"):
        lines.append(f"- fastpeft imported from {st['fastpeft_file']}")
    if st.get("substituted_hub_models"):
        lines.append(f"- hub models substituted by random small ones: {st['substituted_hub_models']}")
    defects = []
    if "plain" in res and "patched" in res:
        plain, patched = res["plain"], res["patched"]
        per = st.get("per_test", {})
        defects = sorted(t for t, (s, _) in patched.items()
                         if s in ("failed", "error") and plain.get(t, ("",))[0] == "passed")
        lines += ["", f"## Pass plain, fail patched: {len(defects)}", ""]
        for t in defects:
            fused = per.get(t, {}).get("fused", "?")
            lines.append(f"- `{t}` (fused layers: {fused}): {essence(patched[t][1])}")
        fixed = sorted(t for t, (s, _) in patched.items()
                       if s == "passed" and plain.get(t, ("",))[0] in ("failed", "error"))
        if fixed:
            lines += ["", f"## Fail plain, pass patched: {len(fixed)}", ""] + [f"- `{t}`" for t in fixed]
        plain_fail = sorted(t for t, (s, _) in plain.items() if s in ("failed", "error"))
        lines += ["", f"## Fail plain (ignored): {len(plain_fail)}", ""]
        lines += [f"- `{t}`: {essence(plain[t][1], 1)[:200]}" for t in plain_fail]
        missing = sorted(set(plain) ^ set(patched))
        if missing:
            lines += ["", f"## Ran in one mode only: {len(missing)}", ""] + [f"- `{t}`" for t in missing[:50]]
        with open(out / "defects.txt", "w") as f:  # full failure texts of the defects
            for t in defects:
                f.write(f"==== {t}\n{patched[t][1]}\n\n")
    text = "\n".join(lines) + "\n"
    summary = Path(args.summary) if args.summary else out / "summary.md"
    summary.write_text(text)
    print(text)
    print(f"summary: {summary}; failure texts: {out / 'defects.txt'}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
