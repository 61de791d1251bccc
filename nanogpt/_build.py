"""Builds the extension: ispc objects when ispc is found, then csrc/*.cpp with torch's JIT
loader (ninja). Used by nanogpt.extension() and by setup.py, so both build the same thing.

ispc is looked for in $ISPC, on PATH, then in the project's .ispc/ (scripts/install_ispc.sh).
NANOGPT_ISPC=0 forces the C++-only build (the twin kernels), NANOGPT_SANITIZE=1 a build with
AddressSanitizer and UBSan; each lives in its own build folder, so all stay cached side by side.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
ISPC_SRC = ROOT / "ispc"
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
LD_FLAGS = ["-fopenmp"]
ISPC_TARGETS = ("avx2-i32x8", "avx512skx-x16")
ISPC_FLAGS = ["--pic", "-O2", "--target=" + ",".join(ISPC_TARGETS), "-I", str(CSRC)]  # csrc/kernel_common.h


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


def ispc_headers(srcs: list[Path]) -> list[Path]:
    """The csrc/ headers that the ispc sources #include (kernel_common.h, shared with C++)."""
    names = {m for src in srcs for m in re.findall(r'^#include "([^"]+)"', src.read_text(), re.M)}
    return sorted(CSRC / n for n in names)


def compile_ispc(ispc: str, out_dir: Path) -> tuple[list[str], Path]:
    """Compiles ispc/*.ispc for every target; returns (objects to link, header folder).

    The folder is named after a hash of the sources and flags, so a changed kernel changes
    the link line, which makes torch's loader relink. It is compiled under a temporary name
    and renamed when complete, so a compile killed half-way leaves no partial object behind.
    """
    srcs = sorted(ISPC_SRC.glob("*.ispc"))
    digest = hashlib.sha256()
    for src in srcs + ispc_headers(srcs):
        digest.update(src.read_bytes())
    digest.update(" ".join(ISPC_FLAGS + [ispc_version(ispc)]).encode())
    folder = out_dir / f"ispc-{digest.hexdigest()[:12]}"
    if not folder.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=out_dir))
        for src in srcs:
            cmd = [ispc, *ISPC_FLAGS, "-o", str(tmp / f"{src.stem}.o"), "-h", str(tmp / f"{src.stem}_ispc.h"), str(src)]
            subprocess.run(cmd, check=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another build (setup.py runs without our lock) finished first
            shutil.rmtree(tmp)
    objects = []
    for src in srcs:
        # A multi-target build writes the run-time dispatcher plus one object per target.
        objects += [str(folder / f"{src.stem}.o")]
        objects += [str(folder / f"{src.stem}_{t.split('-')[0]}.o") for t in ISPC_TARGETS]
    return objects, folder


def cpu_key() -> str:
    """A short hash of this CPU's feature flags: builds use -march=native, so a cache shared
    with another machine (a network home) must not load a binary built for other flags."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def build_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanogpt-flash"
    return Path(os.environ.get("NANOGPT_BUILD_DIR", default))


def sanitize_flags() -> list[str]:
    """NANOGPT_SANITIZE=1 builds with AddressSanitizer and UBSan (scripts/sanitize.sh runs the
    tests that way); any report aborts the process."""
    if os.environ.get("NANOGPT_SANITIZE", "0") == "0":
        return []
    return ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def locked_jit(name: str, folder: Path, verbose: bool = False, prepare=None, **load_args):
    """torch.utils.cpp_extension.load into folder/torch, safe against killed and concurrent builds.

    A lock that the OS releases when its process dies (filelock's flock) serialises builds, so
    two processes starting at once build once and both load. torch's own lock file does
    outlive a killed build (and would make every later start wait forever); holding our
    lock, any such file is stale, so it is removed, and we say so. prepare(), if given, runs
    under the lock too and returns more load() arguments (the ISPC objects).
    """
    import torch.utils.cpp_extension as cpp_ext
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    torch_dir = folder / "torch"
    with FileLock(str(folder) + ".lock"):
        torch_dir.mkdir(exist_ok=True)
        stale = torch_dir / "lock"
        if stale.exists():
            print(f"nanogpt: removed {stale}, left by a build that was killed; rebuilding", file=sys.stderr)
            stale.unlink()
        if not any(torch_dir.glob("*.so")):
            print(f"nanogpt: compiling {name} into {torch_dir} (first use: about a minute)", file=sys.stderr)
        args = dict(name=name, build_directory=str(torch_dir), verbose=verbose, **load_args)
        if prepare:
            args.update(prepare())
        try:
            return cpp_ext.load(**args)
        except (ImportError, OSError) as err:  # e.g. a truncated .so from a killed link
            print(f"nanogpt: rebuilding {name} from scratch after: {err}", file=sys.stderr)
            shutil.rmtree(torch_dir)
            torch_dir.mkdir()
            return cpp_ext.load(**args)


def load(verbose: bool = False):
    """Builds (first time: about a minute) or loads (about a second) the JIT extension."""
    ispc = find_ispc()
    sanitize = sanitize_flags()
    name = "nanogpt_ext" + ("" if ispc else "_cpp") + ("_sanitize" if sanitize else "") + "_" + cpu_key()
    folder = build_root() / name
    cflags, ldflags = CXX_FLAGS + sanitize, LD_FLAGS + sanitize

    def ispc_objects() -> dict:
        if not ispc:
            return {}
        objects, header_dir = compile_ispc(ispc, folder)
        return dict(extra_cflags=cflags + ["-DNANOGPT_WITH_ISPC"], extra_ldflags=objects + ldflags,
                    extra_include_paths=[str(header_dir)])

    return locked_jit(name, folder, verbose, prepare=ispc_objects, sources=sources(), extra_cflags=cflags,
                      extra_ldflags=ldflags, extra_include_paths=[])


def describe(ispc: str | None = None) -> dict:
    """What a build from this checkout uses (for build_info)."""
    ispc = ispc if ispc is not None else find_ispc()
    info = {"cxx_flags": " ".join(CXX_FLAGS + sanitize_flags())}
    if ispc:
        info["ispc"] = f"{ispc_version(ispc)} ({ispc}), targets " + ", ".join(ISPC_TARGETS)
    else:
        info["ispc"] = "not found: C++ twin kernels"
    return info
