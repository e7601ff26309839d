import atexit
import os
import shutil
import tempfile

import pytest

# The suite never reads or writes the user's tuning table, and never tunes online (set before attnsel loads it).
os.environ["ATTNSEL_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnsel-test-cache-")
atexit.register(shutil.rmtree, os.environ["ATTNSEL_CACHE_DIR"], True)
os.environ.pop("ATTNSEL_AUTOTUNE", None)

import attnsel  # noqa: E402
from attnsel import _C  # noqa: E402


@pytest.fixture(autouse=True)
def clean_attnsel_state(monkeypatch):
    """Every test starts and ends with no global flag, no forced backend, no component scope and no ATTNSEL_ env."""
    monkeypatch.delenv("ATTNSEL_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("ATTNSEL_COMPONENT_ATTENTION_BACKENDS", raising=False)

    def reset():
        if hasattr(attnsel, "set_config"):
            attnsel.set_config(None)
        _C.set_global_backend(None)
        _C.set_forced_backend(None)
        _C.set_current_component(None)

    reset()
    yield
    leaked_forced = _C.forced_backend()
    reset()
    assert leaked_forced is None, "a test left a forced backend behind"
