"""Builds the extension: ispc objects when ispc is found, then csrc/*.cpp with torch's JIT
loader (ninja). Used by nanogpt.extension() and by setup.py, so both build the same thing.

ispc is looked for in $ISPC, on PATH, then in the project's .ispc/ (scripts/install_ispc.sh).
NANOGPT_ISPC=0 forces the C++-only build (the twin kernels), which lives in its own build
folder so both builds stay cached side by side.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
ISPC_SRC = ROOT / "ispc"
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
LD_FLAGS = ["-fopenmp"]
ISPC_TARGETS = ("avx2-i32x8", "avx512skx-x16")
ISPC_FLAGS = ["--pic", "-O2", "--target=" + ",".join(ISPC_TARGETS)]


def sources() -> list[str]:
    return sorted(str(p) for p in CSRC.glob("*.cpp"))


def find_ispc() -> str | None:
    """Path of a working ispc, or None (then the C++ twins are built)."""
    if os.environ.get("NANOGPT_ISPC", "1") == "0":
        return None
    for candidate in (os.environ.get("ISPC"), shutil.which("ispc"), ROOT / ".ispc" / "bin" / "ispc"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ispc_version(ispc: str) -> str:
    out = subprocess.run([ispc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"ISPC\), (\S+)", out)
    return match.group(1) if match else out.strip()


def compile_ispc(ispc: str, out_dir: Path) -> tuple[list[str], Path]:
    """Compiles ispc/*.ispc for every target; returns (objects to link, header folder).

    The folder is named after a hash of the sources and flags, so a changed kernel changes
    the link line, which makes torch's loader relink.
    """
    srcs = sorted(ISPC_SRC.glob("*.ispc"))
    digest = hashlib.sha256()
    for src in srcs:
        digest.update(src.read_bytes())
    digest.update(" ".join(ISPC_FLAGS + [ispc_version(ispc)]).encode())
    folder = out_dir / f"ispc-{digest.hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    objects = []
    for src in srcs:
        obj = folder / f"{src.stem}.o"
        # A multi-target build writes obj (the run-time dispatcher) plus one object per target.
        target_objs = [folder / f"{src.stem}_{t.split('-')[0]}.o" for t in ISPC_TARGETS]
        if not all(p.exists() for p in [obj, *target_objs]):
            cmd = [ispc, *ISPC_FLAGS, "-o", str(obj), "-h", str(folder / f"{src.stem}_ispc.h"), str(src)]
            subprocess.run(cmd, check=True)
        objects += [str(obj), *map(str, target_objs)]
    return objects, folder


def build_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanogpt-flash"
    return Path(os.environ.get("NANOGPT_BUILD_DIR", default))


def load(verbose: bool = False):
    """Builds (first time: about a minute) or loads (about a second) the JIT extension.

    A lock that the OS releases when its process dies (filelock's flock) guards the build,
    so a build killed half-way never leaves the next one waiting; torch's own lock file,
    which does outlive a killed build, is removed under it.
    """
    import torch.utils.cpp_extension as cpp_ext
    from filelock import FileLock

    ispc = find_ispc()
    name = "nanogpt_ext" if ispc else "nanogpt_ext_cpp"
    folder = build_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        torch_dir = folder / "torch"
        torch_dir.mkdir(exist_ok=True)
        stale = torch_dir / "lock"
        if stale.exists():
            print(f"nanogpt: removed {stale}, left by a build that was killed", file=sys.stderr)
            stale.unlink()
        cflags, ldflags, includes = list(CXX_FLAGS), list(LD_FLAGS), []
        if ispc:
            objects, header_dir = compile_ispc(ispc, folder)
            cflags.append("-DNANOGPT_WITH_ISPC")
            ldflags = objects + ldflags
            includes.append(str(header_dir))
        args = dict(name=name, sources=sources(), extra_cflags=cflags, extra_ldflags=ldflags,
                    extra_include_paths=includes, build_directory=str(torch_dir), verbose=verbose)
        try:
            return cpp_ext.load(**args)
        except (ImportError, OSError) as err:  # e.g. a truncated .so from a killed link
            print(f"nanogpt: rebuilding from scratch after: {err}", file=sys.stderr)
            shutil.rmtree(torch_dir)
            torch_dir.mkdir()
            return cpp_ext.load(**args)


def describe(ispc: str | None = None) -> dict:
    """What a build from this checkout uses (for build_info)."""
    ispc = ispc if ispc is not None else find_ispc()
    info = {"cxx_flags": " ".join(CXX_FLAGS)}
    if ispc:
        info["ispc"] = f"{ispc_version(ispc)} ({ispc}), targets " + ", ".join(ISPC_TARGETS)
    else:
        info["ispc"] = "not found: C++ twin kernels"
    return info
