"""Builds the extension: ispc objects when ispc is found, then csrc/*.cpp with torch's JIT
loader (ninja). build_spec() is the one description of a build (sources, flags, ispc objects
and targets) that nanogpt.extension()'s JIT build and setup.py both use; each writes it as JSON
next to the module it built (SPEC_FILE), and nanogpt.build_info() reads it back from there.

ispc is looked for in $ISPC, on PATH, then in the project's .ispc/ (scripts/install_ispc.sh).
NANOGPT_ISPC=0 forces the C++-only build (the twin kernels), NANOGPT_SANITIZE=1 a build with
AddressSanitizer and UBSan, NANOGPT_MARCH=haswell (say) a build for another CPU than this one's
-march=native (CI builds for AVX2 on an AVX-512 host: the kernels' AVX2 paths, and a check that
nothing AVX-512 escapes a runtime-dispatched function); each lives in its own build folder, so
all stay cached side by side.
"""
from __future__ import annotations

import hashlib
import json
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
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast"]  # and -march (march())
LD_FLAGS = ["-fopenmp"]
ISPC_TARGETS = ("avx2-i32x8", "avx512skx-x16")
SPEC_FILE = "_build_spec.json"  # written next to the built module
ISPC_FLAGS = ["--pic", "-O2", "--enable-llvm-intrinsics", "--target=" + ",".join(ISPC_TARGETS), "-I", str(CSRC)]
# csrc/kernel_common.h is included from csrc; the llvm intrinsics are AVX-512's vscalefps (ispc/blocks.isph)


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
    """The headers that the ispc sources #include, directly or not: ispc/*.isph, and csrc/'s
    kernel_common.h (shared with C++). A quoted include is looked for beside its includer, then
    in csrc/ (ISPC_FLAGS' -I)."""
    found: set[Path] = set()
    todo = list(srcs)
    while todo:
        src = todo.pop()
        for name in re.findall(r'^#include "([^"]+)"', src.read_text(), re.M):
            path = next(p for p in (src.parent / name, CSRC / name) if p.exists())
            if path not in found:
                found.add(path)
                todo.append(path)
    return sorted(found)


def compile_ispc(ispc: str, out_dir: Path) -> tuple[list[str], Path]:
    """Compiles ispc/*.ispc for every target; returns (objects to link, header folder).

    The folder is named after a hash of the sources, the headers they include and the flags, so
    a changed kernel changes the link line, which makes torch's loader relink. It is compiled
    under a lock (out_dir + ".ispc.lock": the JIT build and setup.py alike) and a temporary name,
    renamed when complete, so a compile killed half-way leaves no partial object behind (one
    that fails removes the temporary folder too).
    """
    from filelock import FileLock

    srcs = sorted(ISPC_SRC.glob("*.ispc"))
    digest = hashlib.sha256()
    for src in srcs + ispc_headers(srcs):
        digest.update(src.read_bytes())
    digest.update(" ".join(ISPC_FLAGS + [ispc_version(ispc)]).encode())
    folder = out_dir / f"ispc-{digest.hexdigest()[:12]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".ispc.lock"):
        if not folder.exists():
            tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=out_dir))
            try:
                for src in srcs:
                    cmd = [ispc, *ISPC_FLAGS, "-o", str(tmp / f"{src.stem}.o"), "-h", str(tmp / f"{src.stem}_ispc.h"), str(src)]
                    subprocess.run(cmd, check=True)
            except BaseException:  # a failed compile removes its own partial folder
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            os.rename(tmp, folder)
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


def march() -> str:
    """The -march the C++ is built for: NANOGPT_MARCH, else native."""
    arch = os.environ.get("NANOGPT_MARCH", "native")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", arch):
        raise ValueError(f"NANOGPT_MARCH must be a GCC -march name such as haswell, got {arch!r}")
    return arch


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
    under the lock too and returns more load() arguments (the build spec's).
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

        def build():
            args = dict(name=name, build_directory=str(torch_dir), verbose=verbose, **load_args)
            return cpp_ext.load(**{**args, **(prepare() if prepare else {})})

        try:
            return build()
        except (ImportError, OSError) as err:  # e.g. a truncated .so from a killed link
            print(f"nanogpt: rebuilding {name} from scratch after: {err}", file=sys.stderr)
            shutil.rmtree(torch_dir)
            torch_dir.mkdir()
            return build()  # prepare() again: it may write into torch_dir


def build_spec(ispc: str | None, ispc_dir: Path, build: str) -> dict:
    """The one description of a build, for the JIT build and setup.py alike: C++ sources and
    flags, and with ispc its objects (compiled here, under their lock), version and targets.
    `build` says which build it is ("jit" or "installed")."""
    sanitize = sanitize_flags()
    spec = {"build": build, "sources": sources(), "cxx_flags": [*CXX_FLAGS, f"-march={march()}", *sanitize],
            "ld_flags": LD_FLAGS + sanitize,
            "include_dirs": [], "objects": [], "sanitize": bool(sanitize), "ispc": None}
    if ispc:
        objects, header_dir = compile_ispc(ispc, ispc_dir)
        spec["cxx_flags"] = spec["cxx_flags"] + ["-DNANOGPT_WITH_ISPC"]
        spec.update(include_dirs=[str(header_dir)], objects=objects)
        spec["ispc"] = {"path": ispc, "version": ispc_version(ispc), "targets": list(ISPC_TARGETS), "flags": ISPC_FLAGS}
    return spec


def write_spec(spec: dict, folder: Path) -> None:
    """Writes spec as folder/SPEC_FILE, atomically (a reader never sees half a file)."""
    tmp = folder / (SPEC_FILE + ".tmp")
    tmp.write_text(json.dumps(spec, indent=1) + "\n")
    os.replace(tmp, folder / SPEC_FILE)


def read_spec(module) -> dict:
    """The spec written next to a built module (empty for a module built without one)."""
    try:
        return json.loads((Path(module.__file__).parent / SPEC_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return {}


def load(verbose: bool = False):
    """Builds (first time: about a minute) or loads (about a second) the JIT extension."""
    ispc = find_ispc()
    arch = march()
    name = ("nanogpt_ext" + ("" if ispc else "_cpp") + ("_sanitize" if sanitize_flags() else "")
            + ("" if arch == "native" else "_" + arch.replace(".", "_").replace("-", "_")) + "_" + cpu_key())
    folder = build_root() / name

    def prepare() -> dict:  # under locked_jit's lock
        spec = build_spec(ispc, folder, "jit")
        write_spec(spec, folder / "torch")
        return dict(sources=spec["sources"], extra_cflags=spec["cxx_flags"],
                    extra_ldflags=spec["objects"] + spec["ld_flags"], extra_include_paths=spec["include_dirs"])

    return locked_jit(name, folder, verbose, prepare=prepare)
