"""The build never hangs: a build killed half-way does not block the next one, and two
processes starting at once build once and both load. Driven through nanogpt._build's locked
JIT loader with a tiny pybind module (seconds to compile), in a private build folder."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from nanogpt import _build
    src = Path({folder!r}) / "tiny.cpp"
    mod = _build.locked_jit("tiny_ext", Path({folder!r}) / "build", sources=[str(src)])
    print("loaded", mod.answer())
""")


def start(folder: Path) -> subprocess.Popen:
    script = SCRIPT.format(root=str(ROOT), folder=str(folder))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # own process group: kill takes ninja too


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "tiny.cpp").write_text(
        "#include <pybind11/pybind11.h>\n"
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(\"answer\", [] { return 42; }); }\n")
    return tmp_path


def test_killed_build_does_not_block_the_next(folder):
    first = start(folder)
    lock = folder / "build" / "torch" / "lock"  # torch's own lock: present while it builds
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert lock.exists(), "the build never started"
    os.killpg(first.pid, signal.SIGKILL)  # the build and its compiler, half-way
    first.wait()
    assert lock.exists()  # what used to make every later start wait forever

    second = start(folder)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "loaded 42" in out
    assert "left by a build that was killed" in err


def test_two_processes_at_once_build_once(folder):
    procs = [start(folder) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert all("loaded 42" in out for out, _ in results)
    assert sum("compiling tiny_ext" in err for _, err in results) == 1


def test_failed_ispc_compile_leaves_no_partial_objects(tmp_path):
    """A compile that dies after writing part of its output must not be mistaken for a build."""
    from nanogpt import _build

    ispc = _build.find_ispc()
    if ispc is None:
        pytest.skip("no ispc on this machine")
    fake = tmp_path / "dying_ispc"  # answers --version like ispc, writes a junk object, dies
    fake.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exec "{ispc}" --version\n'
                    'while [ $# -gt 0 ]; do [ "$1" = -o ] && echo junk > "$2"; shift; done\nexit 9\n')
    fake.chmod(0o755)
    out = tmp_path / "build"
    with pytest.raises(subprocess.CalledProcessError):
        _build.compile_ispc(str(fake), out)
    assert not list(out.iterdir())  # neither a build folder nor the failed one's partial folder
    objects, _ = _build.compile_ispc(ispc, out)  # the next build compiles for real
    assert all(Path(o).stat().st_size > 1000 for o in objects)


def test_build_info_reads_the_build_spec(ext):
    """build_info() is what the build wrote next to the module (nanogpt/_build.py's build_spec,
    shared by the JIT build and setup.py) plus what the binary says of itself."""
    from nanogpt import _build

    spec = _build.read_spec(ext.extension())
    info = ext.build_info()
    assert spec["build"] == info["build"] == "jit"  # the tests run from the checkout
    assert spec["sources"] == _build.sources()
    assert info["cxx_flags"] == " ".join(spec["cxx_flags"])
    assert spec["sanitize"] == bool(_build.sanitize_flags()) == info.get("sanitize", False)
    assert f"-march={_build.march()}" in spec["cxx_flags"]
    if _build.march() == "haswell":  # CI's AVX2 build
        assert info["cxx_simd"] == "avx2"
    assert (spec["ispc"] is not None) == (info["tile_kernel"] == "ispc")
    if spec["ispc"]:
        assert spec["ispc"]["version"].startswith(info["ispc_version"])  # 1.26.0 and the binary's 1.26
        assert all(Path(o).exists() for o in spec["objects"])


def test_march_names_a_cpu(monkeypatch):
    """NANOGPT_MARCH (CI's AVX2 build on an AVX-512 host) takes a GCC -march name, nothing else."""
    from nanogpt import _build

    monkeypatch.setenv("NANOGPT_MARCH", "haswell")
    assert _build.march() == "haswell"
    assert "-march=haswell" in _build.build_spec(None, Path("unused"), "jit")["cxx_flags"]
    monkeypatch.setenv("NANOGPT_MARCH", "native -O0")
    with pytest.raises(ValueError, match="NANOGPT_MARCH"):
        _build.march()
