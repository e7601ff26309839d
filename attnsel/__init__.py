"""attnsel: choose the attention backend per diffusion-pipeline component, run it on the fastest kernel."""

import torch  # noqa: F401  (loads libtorch before our native libraries)

from . import _C  # noqa: F401
from . import bridges as _bridges
from .backends import Backend, backend_aliases, backend_names, normalize_backend_name
from .context import (
    ContextThreadPoolExecutor,
    component_attention_backend,
    force_attention_backend,
    get_component_attn_backend_name,
    get_component_forced_attn_backend,
    get_forced_attn_backend,
    run_with_context,
)
from .ops import attention
from .selection import Explanation, explain_attn_backend, explain_call, get_attn_backend

_bridges.detect()

from . import nn  # noqa: E402

from .config import AttentionConfig, get_config, parse_component_backends, set_config  # noqa: E402
from .loader import ComponentLoader  # noqa: E402
from .pipeline import ComposedPipeline, DenoisingStage  # noqa: E402
from .sdk import get_cmake_dir, get_include  # noqa: E402
from .tracing import Trace, trace  # noqa: E402

__all__ = [
    "AttentionConfig",
    "Backend",
    "ComponentLoader",
    "ComposedPipeline",
    "DenoisingStage",
    "ContextThreadPoolExecutor",
    "Explanation",
    "Trace",
    "attention",
    "backend_aliases",
    "backend_names",
    "component_attention_backend",
    "explain_attn_backend",
    "explain_call",
    "force_attention_backend",
    "get_attn_backend",
    "get_component_attn_backend_name",
    "get_component_forced_attn_backend",
    "get_cmake_dir",
    "get_config",
    "get_include",
    "get_forced_attn_backend",
    "nn",
    "normalize_backend_name",
    "parse_component_backends",
    "run_with_context",
    "set_config",
    "trace",
]
__version__ = "0.1.0"

from . import tuning as _tuning  # noqa: E402

_tuning.load()  # this machine's tuning table into the planner (nothing to do when no file exists)
_tuning.autotune_from_env()
