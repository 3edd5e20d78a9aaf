"""Build ``./wheelhouse``: the wheels ``bench/gpu_check.sh`` installs on a GPU machine with no network.

    make wheelhouse                       # or: python launch/wheelhouse.py [--out wheelhouse] [--python-version 3.11]

The GPU machine is assumed to have only ``torch``, ``transformers``, ``peft``, ``pyarrow`` and
``tokenizers`` (and what those need). What the check needs beyond that is collected here, where PyPI can
be reached:

* dpo_zoo itself (``pip wheel --no-deps`` of this checkout);
* ``deepspeed``, ``omegaconf``, ``datasets`` (read by ``dpo-zoo prep``) and ``trl`` (the comparison), with
  every package they need that the five provided packages do not already bring in.

The set is the requirement closure of those roots **minus** the closure of the provided packages, both
read from the installed distributions' metadata (markers evaluated for this interpreter), at the
versions installed in this environment (the versions the test suite ran against). torch and every
``nvidia-*`` / ``triton`` package are never downloaded: they are in the provided closure, and a
requirement on them is refused outright if it ever leaked into the set. Each wheel comes from
``pip download --no-deps --only-binary=:all:`` (for each ``--python-version``, default this interpreter's),
or, for a package published only as a source distribution (DeepSpeed), ``pip wheel --no-deps``.

Writes ``wheelhouse/manifest.json`` (each wheel, its size and sha256, the total, the Python version)
and ``wheelhouse/requirements.txt`` (the roots, pinned), and fails if the total is over ``--limit-mib``
(40). ``bench/gpu_check.sh`` installs with ``pip install --no-index --find-links wheelhouse -r
wheelhouse/requirements.txt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, Set

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("deepspeed", "omegaconf", "datasets", "trl")
PROVIDED = ("torch", "transformers", "peft", "pyarrow", "tokenizers")
NEVER = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_of(name: str) -> Iterable[str]:
    """Names of the installed distribution ``name``'s requirements whose markers hold here (no extras)."""
    from packaging.requirements import Requirement

    for line in metadata.distribution(name).requires or ():
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        yield canonical(req.name)


def closure(roots: Iterable[str]) -> Set[str]:
    seen: Set[str] = set()
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"wheelhouse: {name} is needed but not installed in this environment "
                             f"({sys.executable}); run `make setup` first") from None
        seen.add(name)
        todo.extend(requirements_of(name))
    return seen


def needed() -> Dict[str, str]:
    """{name: installed version} of the packages the wheelhouse must hold (dpo_zoo itself apart)."""
    names = closure(ROOTS) - closure(PROVIDED)
    leaked = sorted(n for n in names if NEVER.match(n))
    if leaked:
        raise SystemExit(f"wheelhouse: refusing to download {leaked} (torch and CUDA packages are the GPU machine's own)")
    return {n: metadata.version(n) for n in sorted(names)}


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"],
                          capture_output=True, text=True)


def build(out: Path, python_versions: Iterable[str], limit_mib: float) -> Dict[str, object]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    versions = needed()
    own = pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO))
    if own.returncode:
        raise SystemExit(f"wheelhouse: building the dpo_zoo wheel failed:\n{own.stderr[-2000:]}")
    pins = [f"{n}=={v}" for n, v in versions.items()]
    for python_version in python_versions:
        binary_args = ["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version, "-d", str(out)]
        if pip(*binary_args, *pins).returncode == 0:
            continue
        for pin in pins:  # one at a time, to find which have no wheel for this Python
            if pip(*binary_args, pin).returncode == 0:
                continue
            # A source-only package (DeepSpeed): its wheel is pure Python, built once for every version.
            built = pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), pin)
            if built.returncode:
                raise SystemExit(f"wheelhouse: no wheel for {pin} (Python {python_version}) and building one "
                                 f"failed:\n{built.stderr[-2000:]}")
    wheels = sorted(out.glob("*.whl"))
    bad = [w.name for w in wheels if NEVER.match(canonical(w.name.split("-")[0]))]
    if bad:
        raise SystemExit(f"wheelhouse: {bad} must not be in the wheelhouse")
    files = [{"file": w.name, "bytes": w.stat().st_size, "sha256": hashlib.sha256(w.read_bytes()).hexdigest()}
             for w in wheels]
    total = sum(f["bytes"] for f in files)
    own_version = metadata.version("dpo_zoo") if _installed("dpo_zoo") else "0.1.0"
    roots = {n: versions[n] for n in ROOTS}
    (out / "requirements.txt").write_text(
        "# bench/gpu_check.sh installs these (and their needs) from this folder only, never from an index\n"
        + f"dpo_zoo=={own_version}\n" + "".join(f"{n}=={v}\n" for n, v in roots.items()))
    manifest = {
        "what": "wheels for bench/gpu_check.sh on a GPU machine without network (launch/wheelhouse.py)",
        "assumed_present": list(PROVIDED),
        "roots": roots,
        "python_versions": list(python_versions),
        "wheels": files,
        "total_bytes": total,
        "total_mib": round(total / 2**20, 2),
        "limit_mib": limit_mib,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if total > limit_mib * 2**20:
        raise SystemExit(f"wheelhouse: {total / 2**20:.1f} MiB is over the {limit_mib} MiB limit; see {out / 'manifest.json'}")
    return manifest


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "wheelhouse"))
    parser.add_argument("--python-version", action="append", default=None,
                        help="Python of the GPU machine (compiled wheels are per version; repeat for several); "
                             "default: this interpreter's")
    parser.add_argument("--limit-mib", type=float, default=40.0)
    parser.add_argument("--list", action="store_true", help="only print the packages it would collect")
    args = parser.parse_args(argv)
    if args.list:
        for name, version in needed().items():
            print(f"{name}=={version}")
        return 0
    versions = args.python_version or [f"{sys.version_info.major}.{sys.version_info.minor}"]
    manifest = build(Path(args.out), versions, args.limit_mib)
    for f in manifest["wheels"]:
        print(f"{f['bytes'] / 2**20:8.2f} MiB  {f['file']}")
    print(f"{manifest['total_mib']:8.2f} MiB in {len(manifest['wheels'])} wheels -> {args.out} (Python {', '.join(versions)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
