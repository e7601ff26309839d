"""Locations of the C++ SDK installed inside this package: headers and the CMake package.

    cmake -Dattnsel_DIR="$(python -I -c 'import attnsel.sdk; print(attnsel.sdk.get_cmake_dir())')" \
          -DCMAKE_PREFIX_PATH="$(python -I -c 'import torch; print(torch.utils.cmake_prefix_path)')" ...

(-I keeps a source checkout in the current directory from shadowing the installed package.) The CMake package's
targets: attnsel::core (torch-free) and attnsel::torch; the libraries are the files `import attnsel` loads.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _sdk_path(*parts: str, marker: str) -> str:
    path = _PACKAGE_DIR.joinpath(*parts)
    if not (path / marker).is_file():
        raise FileNotFoundError(
            f"attnsel's C++ SDK is not installed at {path} (no {marker}); build attnsel with setup.py or pip, which "
            "installs the CMake component `sdk` into the package"
        )
    return str(path)


def get_include() -> str:
    """The directory to add to the include path: it holds <attnsel/attnsel.h> and <attnsel/torch.h>."""
    return _sdk_path("include", marker="attnsel/attnsel.h")


def get_cmake_dir() -> str:
    """The directory holding attnselConfig.cmake (use as attnsel_DIR, or put it in CMAKE_PREFIX_PATH)."""
    return _sdk_path("share", "cmake", "attnsel", marker="attnselConfig.cmake")


def get_library_dir() -> str:
    """The directory of libattnsel_core.so / libattnsel_torch.so: the same files `import attnsel` loads."""
    return _sdk_path("lib", marker="libattnsel_core.so")
