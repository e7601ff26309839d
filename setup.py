"""Build attnsel: setup.py only drives CMakeLists.txt (the one build truth).

Environment: ATTNSEL_FORCE_CUDA=1 builds the CUDA kernel even when it cannot be detected;
ATTNSEL_DISABLE_CUDA=1 never builds it; MAX_JOBS caps parallel compile jobs; TORCH_CUDA_ARCH_LIST
picks GPU architectures (e.g. "8.0;9.0a"); ATTNSEL_BUILD_TYPE (default Release).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _want_cuda(torch) -> bool:
    if os.environ.get("ATTNSEL_DISABLE_CUDA") == "1":
        return False
    if os.environ.get("ATTNSEL_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


class CMakeBuild(build_ext):
    def run(self) -> None:
        # setuptools clears `inplace` while building; remember it for build_extension.
        self._attnsel_in_source = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def copy_extensions_to_source(self) -> None:
        # In-place builds already wrote everything into the source tree (see build_extension).
        if not getattr(self, "_attnsel_in_source", False):
            super().copy_extensions_to_source()

    def build_extension(self, ext: Extension) -> None:
        try:
            import pybind11
            import torch
        except ImportError as exc:  # build isolation would fetch a multi-GB torch: refuse instead
            raise RuntimeError(
                "attnsel builds against the installed torch and pybind11: install them first, then "
                "`pip install --no-build-isolation .`"
            ) from exc
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # setuptools builds in-place/editable extensions in build/ and copies only the module file back;
        # the shared libraries and the SDK must sit beside it, so build those straight into the source tree.
        if getattr(self, "_attnsel_in_source", False):
            out_dir = ROOT / "attnsel"
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda(torch)
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={os.environ.get('ATTNSEL_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DATTNSEL_PY_OUTPUT_DIR={out_dir}",
            f"-DATTNSEL_WITH_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        print(f"attnsel: configuring (CUDA kernel: {'on' if cuda else 'off'})", flush=True)
        subprocess.run(args, check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"attnsel: building with {jobs} jobs", flush=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        # Headers and the CMake package for native callers live inside the package (see README).
        subprocess.run(["cmake", "--install", str(build_dir), "--prefix", str(out_dir), "--component", "sdk"],
                       check=True)


setup(
    ext_modules=[Extension("attnsel._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
