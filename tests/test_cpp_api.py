"""The C++ API and the Python API agree, and the C++ SDK is installed inside the package.

`_C._testing.run_in_native_scope` enters a C++ `attnsel::ComponentScope` (what a native caller does); `_C._testing.select_thread`
selects with this thread's native context (what `attnsel::select_backend` does in C++).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import attnsel
from attnsel import Backend, _C, sdk

ROOT = Path(__file__).resolve().parents[1]
HEAD, DTYPE, DEVICE = 64, "float32", "cpu"


def python_view():
    e = attnsel.explain_attn_backend(HEAD, torch.float32, DEVICE)
    return int(e.backend), e.source, e.component or "", list(e.reasons)


def native_view():
    backend, source, component, reasons = _C._testing.select_thread(HEAD, DTYPE, DEVICE)
    return backend, source, component, list(reasons)


def both():
    return python_view(), native_view()


# ---- one process, two languages -----------------------------------------------------------------------------


def test_cpp_scope_is_seen_from_python():
    py, native = _C._testing.run_in_native_scope("vae", int(Backend.TORCH_SDPA), both)
    assert py == native
    assert py[:3] == (int(Backend.TORCH_SDPA), "component", "vae")
    assert attnsel.get_component_attn_backend_name() is None  # the C++ scope ended with the call


def test_cpp_scope_without_override_falls_through_in_both():
    py, native = _C._testing.run_in_native_scope("transformer", None, both)
    assert py == native
    assert py[:3] == (int(Backend.NATIVE), "auto", "transformer")
    _C.set_global_backend(int(Backend.TORCH_SDPA))
    py, native = _C._testing.run_in_native_scope("transformer", None, both)
    assert py == native
    assert py[:3] == (int(Backend.TORCH_SDPA), "global", "transformer")


def test_python_scope_is_seen_from_cpp():
    with attnsel.component_attention_backend("text_encoder", "torch_sdpa"):
        py, native = both()
        assert py == native
        assert py[:3] == (int(Backend.TORCH_SDPA), "component", "text_encoder")
        with attnsel.component_attention_backend("vae", " NATIVE "):
            py, native = both()
            assert py == native
            assert py[:3] == (int(Backend.NATIVE), "component", "vae")
        assert both()[1][:3] == (int(Backend.TORCH_SDPA), "component", "text_encoder")
    py, native = both()
    assert py == native
    assert py[:3] == (int(Backend.NATIVE), "auto", "")


def test_python_scope_inside_cpp_scope_restores_the_cpp_scope():
    def inside():
        with attnsel.component_attention_backend("transformer", "native"):
            inner = both()
        return inner, both()

    inner, after = _C._testing.run_in_native_scope("vae", int(Backend.TORCH_SDPA), inside)
    assert inner[0] == inner[1]
    assert inner[0][:3] == (int(Backend.NATIVE), "component", "transformer")
    assert after[0] == after[1]
    assert after[0][:3] == (int(Backend.TORCH_SDPA), "component", "vae")


def test_forced_backend_is_shared():
    def inside():
        with attnsel.force_attention_backend("torch_sdpa"):
            return both()

    py, native = _C._testing.run_in_native_scope("vae", int(Backend.NATIVE), inside)
    assert py == native
    assert py[:3] == (int(Backend.TORCH_SDPA), "forced", "vae")


def test_refusals_agree():
    def inside():
        errors = []
        for select in (python_view, native_view):
            with pytest.raises(ValueError) as info:
                select()
            errors.append(str(info.value))
        return errors

    py_error, native_error = _C._testing.run_in_native_scope("vae", int(Backend.SDPA_MATH), inside)  # CUDA-only
    assert py_error == native_error
    assert "sdpa_math" in py_error and "component 'vae'" in py_error


def test_new_threads_start_empty_in_both():
    seen = {}

    def worker():
        seen["view"] = both()

    with attnsel.component_attention_backend("vae", "torch_sdpa"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    py, native = seen["view"]
    assert py == native
    assert py[:3] == (int(Backend.NATIVE), "auto", "")


def test_cpp_scope_in_another_thread_does_not_leak():
    ready, release = threading.Event(), threading.Event()

    def worker():
        def inside():
            ready.set()
            release.wait(10)

        _C._testing.run_in_native_scope("vae", int(Backend.TORCH_SDPA), inside)

    t = threading.Thread(target=worker)
    t.start()
    assert ready.wait(10)
    try:
        py, native = both()  # the worker is inside its C++ scope right now
    finally:
        release.set()
        t.join()
    assert py == native
    assert py[:3] == (int(Backend.NATIVE), "auto", "")


# ---- the installed SDK ---------------------------------------------------------------------------------------


def test_sdk_layout():
    cmake_dir = Path(sdk.get_cmake_dir())
    include = Path(sdk.get_include())
    for name in ("attnselConfig.cmake", "attnselConfigVersion.cmake", "attnselCoreTargets.cmake",
                 "attnselTorchTargets.cmake"):
        assert (cmake_dir / name).is_file(), name
    assert (include / "attnsel" / "attnsel.h").is_file()
    assert (include / "attnsel" / "torch.h").is_file()
    assert f'set(PACKAGE_VERSION "{attnsel.__version__}")' in (cmake_dir / "attnselConfigVersion.cmake").read_text()
    # Relocatable: nothing in the package names the directory it was built or installed in.
    for f in cmake_dir.glob("*.cmake"):
        assert str(cmake_dir.parents[2]) not in f.read_text(), f


def _exported_locations() -> dict[str, Path]:
    """target -> library file, as the installed CMake package resolves it."""
    cmake_dir = Path(sdk.get_cmake_dir())
    prefix = cmake_dir.parents[2]  # <pkg>/share/cmake/attnsel -> <pkg>
    out = {}
    for f in cmake_dir.glob("attnsel*Targets-*.cmake"):
        text = f.read_text()
        for target, location in re.findall(r'_cmake_import_check_files_for_attnsel::(\w+) "([^"]+)"', text):
            out[target] = Path(location.replace("${_IMPORT_PREFIX}", str(prefix)))
    return out


def test_exported_libraries_are_the_ones_python_loaded():
    locations = _exported_locations()
    assert set(locations) == {"core", "torch"}
    lib_dir = Path(sdk.get_library_dir())
    for target, path in locations.items():
        assert path.is_file(), path
        assert path.samefile(lib_dir / f"libattnsel_{target}.so")
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps")
    loaded = {Path(line.split()[-1]) for line in maps.read_text().splitlines() if "libattnsel_" in line}
    for target, path in locations.items():
        matches = [p for p in loaded if p.name == f"libattnsel_{target}.so"]
        assert len(matches) == 1, f"libattnsel_{target}.so loaded from {matches}"  # one copy: one shared state
        assert matches[0].samefile(path)


# ---- the example, built out-of-tree against the installed package -----------------------------------------


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
@pytest.mark.skipif(os.environ.get("ATTNSEL_SKIP_CMAKE_TESTS") == "1", reason="ATTNSEL_SKIP_CMAKE_TESTS=1")
def test_example_builds_and_runs(tmp_path):
    build = tmp_path / "example"
    configure = ["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(build),
                 f"-Dattnsel_DIR={sdk.get_cmake_dir()}", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", os.environ.get("MAX_JOBS", "2")]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    r = subprocess.run([str(build / "attnsel_example")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "component: vae" in r.stdout and "source:    component" in r.stdout
    assert "example: OK" in r.stdout
