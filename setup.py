"""Ahead-of-time build of the same sources as the JIT build: `pip install --no-build-isolation .`

(--no-build-isolation: the build needs the torch==2.13.0 already installed; an isolated build
would fetch an unpinned torch with gigabytes of CUDA packages.) Installs nanogpt with its
compiled module nanogpt._C, which `import nanogpt` prefers over a JIT build, and the build spec
next to it (nanogpt/_build_spec.json), which nanogpt.build_info() reads.
"""
import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# nanogpt/_build.py holds the build spec (sources, flags, ispc objects); loaded by path so that
# setup.py does not import the package it is building.
_spec = importlib.util.spec_from_file_location("nanogpt_build", Path(__file__).parent / "nanogpt" / "_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

spec = build.build_spec(build.find_ispc(), Path("build").resolve() / "ispc", "installed")


def relative(path: str) -> str:
    """setuptools wants sources relative to setup.py's folder."""
    p = Path(path)
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else path


class BuildWithSpec(BuildExtension):
    """build_ext that also writes the build spec next to the module it built."""

    def run(self):
        super().run()
        build.write_spec(spec, Path(self.get_ext_fullpath("nanogpt._C")).parent)


setup(
    name="nanogpt-flash",
    version="0.1.0",
    description="CPU attention as a ladder of variants, and a NanoGPT that runs on them",
    packages=find_packages(include=["nanogpt", "nanogpt.*"]),  # nanogpt.formats, nanogpt.models too
    data_files=[("share/nanogpt-flash/checkpoints", ["checkpoints/shakes2048.pt"])],  # formats/checkpoint.py finds it
    ext_modules=[CppExtension("nanogpt._C", [relative(s) for s in spec["sources"]],  # copies: CppExtension appends
                              extra_compile_args=list(spec["cxx_flags"]), extra_link_args=list(spec["ld_flags"]),
                              extra_objects=list(spec["objects"]), include_dirs=list(spec["include_dirs"]))],
    cmdclass={"build_ext": BuildWithSpec},
    python_requires=">=3.10",
    install_requires=["torch==2.13.0", "ninja", "filelock", "numpy", "tqdm", "matplotlib", "safetensors", "tokenizers"],
)
