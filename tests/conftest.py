import pytest

import attnsel
from attnsel import _C


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
