import pytest

import attnsel
from attnsel import _C


@pytest.fixture(autouse=True)
def clean_attnsel_state():
    """Every test starts and ends with no global flag, no forced backend and no component scope."""
    def reset():
        if hasattr(attnsel, "set_config"):
            attnsel.set_config(None)
        _C.set_global_backend(None)
        _C.set_forced_backend(None)
        _C.set_current_component(None)

    reset()
    yield
    reset()
