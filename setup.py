"""Ahead-of-time build of the same sources as the JIT build: `pip install --no-build-isolation .`

(--no-build-isolation: the build needs the torch==2.13.0 already installed; an isolated build
would fetch an unpinned torch with gigabytes of CUDA packages.) Installs nanogpt with its
compiled module nanogpt._C, which `import nanogpt` prefers over a JIT build.
"""
import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# nanogpt/_build.py holds the sources and flags; loaded by path so that setup.py does not
# import the package it is building.
spec = importlib.util.spec_from_file_location("nanogpt_build", Path(__file__).parent / "nanogpt" / "_build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

cflags, objects, includes = list(build.CXX_FLAGS), [], []
ispc = build.find_ispc()
if ispc:
    objects, header_dir = build.compile_ispc(ispc, Path("build") / "ispc")
    cflags.append("-DNANOGPT_WITH_ISPC")
    includes.append(str(header_dir.resolve()))

setup(
    name="nanogpt-flash",
    version="0.1.0",
    description="CPU attention as a ladder of variants, and a NanoGPT that runs on them",
    packages=find_packages(include=["nanogpt", "nanogpt.*"]),  # nanogpt.formats, nanogpt.models too
    data_files=[("share/nanogpt-flash/checkpoints", ["checkpoints/shakes2048.pt"])],  # formats/checkpoint.py finds it
    ext_modules=[CppExtension("nanogpt._C", [str(Path(s).relative_to(Path.cwd())) if Path(s).is_relative_to(Path.cwd()) else s
                                             for s in build.sources()],
                              extra_compile_args=cflags, extra_link_args=build.LD_FLAGS,
                              extra_objects=objects, include_dirs=includes)],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch==2.13.0", "ninja", "filelock", "numpy", "tqdm", "matplotlib"],
)
