"""`attnsel.diffusers`: run every attention of a diffusers pipeline through `attnsel.attention`, per component and role.

    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    report = attnsel.diffusers.apply(pipe, attnsel.AttentionConfig.from_cli(
        ["--component-attention-backends", "text-encoder=torch_sdpa,transformer.self=native"]))
    print(report)                      # per component and role: layers found, backend each resolved to
    attnsel.diffusers.remove(pipe)     # the pipeline as it was

Roles: a layer is `cross` when diffusers marks it `is_cross_attention` (UNet `attn2`, Wan's text cross-attention)
and `self` otherwise -- joint attention (Flux, SD3: text and image tokens attend together) is `self`. Transformers
text encoders have self-attention layers only. A layer's backend: `component.role` > `component` > the numbered
fallback (`text_encoder_2` -> `text_encoder`) > the config's `--attention-backend` > automatic at each call.

How the calls are routed (public extension points only):
* diffusers models: a forward pre-hook and an always-called forward hook (torch's module hooks) on every diffusers
  attention module (`Attention`, `MochiAttention`, `AttentionModuleMixin`, the classes diffusers'
  `set_attention_backend` visits) and on every other module whose own forward calls SDPA (the attention blocks of
  Wan's and other video VAEs) open a `torch.overrides.TorchFunctionMode` for the call, which sends its
  `scaled_dot_product_attention` to attnsel. Processors that use diffusers' attention dispatch are pinned to its
  `native` backend -- the `_attention_backend` attribute `ModelMixin.set_attention_backend` writes -- so that they
  end in that call. A layer whose call runs no attention through attnsel (a custom processor, context parallelism)
  is an error, never a silent pass.
* transformers models: an `attnsel` attention function registered with `AttentionInterface.register` (and
  `AttentionMaskInterface.register` with transformers' SDPA masks), switched on with `set_attn_implementation`.
"""

from __future__ import annotations

import difflib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import tracing as _trace
from .backends import Backend, to_backend
from . import ops as _ops
from .ops import attention

__all__ = ["ROLES", "Layer", "Report", "apply", "check_runnable", "remove"]

from .config import ROLES, numbered_component_base, split_component_key

IMPLEMENTATION = "attnsel"  # the name of our attention function in transformers' registry

_SDPA = torch.nn.functional.scaled_dot_product_attention


@dataclass(frozen=True)
class Layer:
    """One attention layer: where it is, its role, and the backend it resolved to (None: automatic per call)."""

    component: str
    name: str  # qualified module name inside the component
    role: str
    backend: Backend | None
    source: str  # the config key that chose the backend, "--attention-backend", or "auto"
    head_dim: int | None = None  # where the module says (for checks before a run)


@dataclass
class Report:
    """What `apply` did: per component, the attention layers found and their backends."""

    layers: list[Layer] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """Per (component, role, backend): {component, role, backend, source, layers}, in pipeline order."""
        table: dict[tuple, dict] = {}
        for layer in self.layers:
            backend = "auto" if layer.backend is None else str(layer.backend)
            row = table.setdefault((layer.component, layer.role, backend, layer.source), {
                "component": layer.component, "role": layer.role, "backend": backend, "source": layer.source,
                "layers": 0})
            row["layers"] += 1
        return list(table.values())

    def __str__(self) -> str:
        rows = self.rows()
        if not rows:
            return "attnsel.diffusers: no attention layers"
        width = max(len(r["component"]) for r in rows)
        backend_width = max(len(r["backend"]) for r in rows)
        return "\n".join(
            f"  {r['component']:<{width}}  {r['role']:<5}  {r['layers']:>3} layer{'s' if r['layers'] != 1 else ' '}"
            f"  {r['backend']:<{backend_width}}  "
            f"({'by ' + r['source'] if r['source'] != 'auto' else 'automatic per call'})"
            for r in rows)


# -- finding components and layers ------------------------------------------------------------------------------

def _components(pipe: Any) -> dict[str, nn.Module]:
    if isinstance(pipe, Mapping):
        items = dict(pipe)
        for name, module in items.items():
            if not isinstance(name, str) or not isinstance(module, nn.Module):
                raise ValueError(f"attnsel.diffusers: expected a mapping of component name -> torch module, got "
                                 f"{name!r}: {type(module).__name__}")
        return items
    components = getattr(pipe, "components", None)  # DiffusionPipeline.components: name -> object (or None)
    if not isinstance(components, Mapping):
        raise ValueError(f"attnsel.diffusers: expected a diffusers.DiffusionPipeline or a mapping of component name -> "
                         f"module, got {type(pipe).__name__}")
    return {name: m for name, m in components.items() if isinstance(m, nn.Module)}


def _diffusers_attention_classes() -> tuple[type, ...]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    return (Attention, MochiAttention, AttentionModuleMixin)


def _forward_names(module: nn.Module) -> tuple[str, ...]:
    forward = getattr(type(module).forward, "__wrapped__", type(module).forward)
    code = getattr(forward, "__code__", None)
    return () if code is None else code.co_names


def _is_transformers_attention(module: nn.Module) -> bool:
    # A transformers attention layer is one whose forward looks its attention function up in the registry.
    return "ALL_ATTENTION_FUNCTIONS" in _forward_names(module)


def _calls_sdpa(module: nn.Module) -> bool:
    # Blocks outside diffusers' attention classes that call SDPA in their own forward (Wan's VAE attention block).
    return "scaled_dot_product_attention" in _forward_names(module)


def _role(name: str, module: nn.Module) -> str:
    if getattr(module, "is_cross_attention", False) is True:
        return "cross"
    last = name.rsplit(".", 1)[-1].lower()
    return "cross" if "cross" in last or last == "encdecattention" else "self"


def _head_dim(module: nn.Module) -> int | None:
    for attr in ("head_dim", "key_value_proj_dim"):  # transformers (T5: key_value_proj_dim), newer diffusers
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    inner, heads = getattr(module, "inner_dim", None), getattr(module, "heads", None)  # diffusers' Attention
    if isinstance(inner, int) and isinstance(heads, int) and heads > 0 and inner % heads == 0:
        return inner // heads
    return None


def _pretrained_models(component: nn.Module) -> list[nn.Module]:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    return [m for m in component.modules() if isinstance(m, PreTrainedModel)]


def _find_layers(component: nn.Module) -> tuple[list[tuple[str, nn.Module, str]], list[tuple[str, nn.Module, str]]]:
    """(diffusers layers, transformers layers) of a component, each as (qualified name, module, role)."""
    ours = _diffusers_attention_classes()
    diffusers_layers, transformers_layers = [], []
    in_transformers = bool(_pretrained_models(component))
    for name, module in component.named_modules():
        if in_transformers and _is_transformers_attention(module):
            transformers_layers.append((name, module, _role(name, module)))
        elif isinstance(module, ours) or _calls_sdpa(module):
            diffusers_layers.append((name, module, _role(name, module)))
    return diffusers_layers, transformers_layers


# -- resolution -------------------------------------------------------------------------------------------------

def _base(component: str) -> str:
    return numbered_component_base(component) or component


def _resolve(config, component: str, role: str) -> tuple[Backend | None, str | None]:
    resolve = getattr(config, "resolve", None)
    if resolve is not None:  # AttentionConfig.resolve(component, role), where the config parser has it
        return resolve(component, role)
    table = config.component_attention_backends
    for name in dict.fromkeys((component, _base(component))):
        for key in (f"{name}.{role}", name):
            if key in table:
                return to_backend(table[key]), key
    return None, None


def _check_keys(config, found: dict[str, set[str]]) -> None:
    """Every configured key must name a component with attention layers, and its role a layer of that component."""
    names = sorted(found)
    for key in config.component_attention_backends:
        try:
            component, role = split_component_key(key)
        except ValueError as err:
            raise ValueError(f"attnsel.diffusers: {err}") from None
        matched = [c for c in names if c == component or _base(c) == component]
        if not matched:
            close = difflib.get_close_matches(component, sorted({*names, *map(_base, names)}), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"attnsel.diffusers: component key {key!r} matches no component of this pipeline; "
                             f"{hint}components with attention: {names}")
        roles = set().union(*(found[c] for c in matched))
        if not roles:
            raise ValueError(f"attnsel.diffusers: component key {key!r}: {', '.join(matched)} has no attention layers")
        if role is not None and role not in roles:
            raise ValueError(f"attnsel.diffusers: component key {key!r}: {', '.join(matched)} has no {role}-attention "
                             f"layers (roles found: {sorted(roles)})")


# -- routing diffusers layers -------------------------------------------------------------------------------------

def _call(layer: Layer, q, k, v, attn_mask, is_causal: bool, scale):
    if _ops.CALL_HOOKS:  # a shape recorder or online tuning is on: tell it which layer calls
        token = _ops.CALLER.set((layer.component, layer.role))
        try:
            return _call_layer(layer, q, k, v, attn_mask, is_causal, scale)
        finally:
            _ops.CALLER.reset(token)
    return _call_layer(layer, q, k, v, attn_mask, is_causal, scale)


def _call_layer(layer: Layer, q, k, v, attn_mask, is_causal: bool, scale):
    if _trace.ACTIVE:
        return _trace.run(layer.component, layer.role, layer.backend, attention, q, k, v, attn_mask=attn_mask,
                          is_causal=is_causal, scale=scale, backend=layer.backend)
    return attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, backend=layer.backend)


class _RouteSdpa(TorchFunctionMode):
    """While a diffusers attention layer runs: its scaled_dot_product_attention calls go to attnsel."""

    def __init__(self, layer: Layer) -> None:
        super().__init__()
        self.layer, self.calls = layer, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        self.calls += 1
        return _sdpa_as_attnsel(self.layer, *args, **kwargs)


def _sdpa_as_attnsel(layer: Layer, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    # SDPA's layout and mask rules are ours: (B, H, S, D), bool (True = attend) or additive masks broadcastable to
    # (B, H, Sq, Sk), top-left causal; grouped-query heads need no repeat (the op takes Hkv dividing Hq).
    if dropout_p:
        raise ValueError(f"attnsel.diffusers: {layer.component}.{layer.name}: attention dropout ({dropout_p}) is not "
                         "supported (put the model in eval mode)")
    if query.dim() == 3:  # (H, S, D) without a batch
        return _call(layer, query[None], key[None], value[None], attn_mask, is_causal, scale)[0]
    return _call(layer, query, key, value, attn_mask, is_causal, scale)


_open_routes = threading.local()  # per thread: the routes opened by pre-hooks, innermost last


def _pre_hook(layer: Layer):
    def hook(module, args):
        route = _RouteSdpa(layer)
        stack = getattr(_open_routes, "stack", None)
        if stack is None:
            stack = _open_routes.stack = []
        route.__enter__()
        stack.append(route)

    return hook


def _post_hook(layer: Layer):
    def hook(module, args, output):  # always called, also when the forward raised (then output is None)
        route = _open_routes.stack.pop()
        route.__exit__(None, None, None)
        if route.calls == 0 and output is not None:
            processor = getattr(module, "processor", None)
            raise RuntimeError(
                f"attnsel.diffusers: attention layer {layer.component}.{layer.name} ran no attention through attnsel: "
                f"its processor {type(processor).__name__} does not call scaled_dot_product_attention (custom "
                "processors and context parallelism are not supported)")

    return hook


def _native_dispatch_backend():
    from diffusers.models.attention_dispatch import AttentionBackendName

    return AttentionBackendName.NATIVE


# -- routing transformers layers ------------------------------------------------------------------------------------

_TRANSFORMERS_LAYERS: "weakref.WeakKeyDictionary[nn.Module, Layer]" = weakref.WeakKeyDictionary()
_registered = False


def _register_transformers() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _transformers_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # masks as for SDPA: bool, or None when causal
    _registered = True


def _with_position_bias(bias: torch.Tensor, mask, causal: bool, q_len: int, kv_len: int) -> torch.Tensor:
    """T5's relative position bias folded into one additive mask (bool masks become the dtype's lowest value)."""
    if causal:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=bias.device).tril()
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.finfo(bias.dtype).min)
    return bias + mask


def _transformers_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            position_bias=None, **kwargs):
    """transformers' attention-function signature: (B, H, S, D) in, ((B, S, H, D) output, no weights) out."""
    layer = _TRANSFORMERS_LAYERS.get(module)
    if layer is None:
        raise ValueError(f"attnsel.diffusers: {type(module).__name__} uses attn_implementation={IMPLEMENTATION!r} "
                         "but was not set up by attnsel.diffusers.apply")
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions"):
        raise ValueError(f"attnsel.diffusers: {layer.component}.{layer.name}: softcap and output_attentions are not "
                         "supported")
    if dropout:
        raise ValueError(f"attnsel.diffusers: {layer.component}.{layer.name}: attention dropout ({dropout}) is not "
                         "supported (put the model in eval mode)")
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(causal and q_len > 1 and attention_mask is None)  # a mask given already holds the causal part
    if position_bias is not None:
        attention_mask = _with_position_bias(position_bias, attention_mask, causal, q_len, kv_len)
        causal = False
    out = _call(layer, query, key, value, attention_mask, causal, scaling)
    return out.transpose(1, 2).contiguous(), None


# -- apply / remove --------------------------------------------------------------------------------------------------

@dataclass
class _Applied:
    hooks: list = field(default_factory=list)
    dispatch_backends: list = field(default_factory=list)  # (processor, its previous _attention_backend)
    implementations: list = field(default_factory=list)  # (PreTrainedModel, its previous attn_implementation)
    transformers_layers: list = field(default_factory=list)


_APPLIED: "weakref.WeakKeyDictionary[nn.Module, _Applied]" = weakref.WeakKeyDictionary()


def apply(pipe: Any, config=None) -> Report:
    """Route every attention of `pipe` (a DiffusionPipeline or a mapping name -> module) through attnsel.

    `config` (an `AttentionConfig`; default: the process-wide one) chooses the backend per component and role.
    A key naming no component (did-you-mean in the error) or a role no layer of that component has is a ValueError.
    Returns the report of the layers found and their backends; `remove(pipe)` undoes everything.
    """
    if config is None:
        from .config import get_config

        config = get_config()
    components = _components(pipe)
    for name, module in components.items():
        if module in _APPLIED:
            raise ValueError(f"attnsel.diffusers: component {name!r} is already set up; call "
                             "attnsel.diffusers.remove first")
    found = {name: _find_layers(module) for name, module in components.items()}
    _check_keys(config, {name: {role for *_, role in d + t} for name, (d, t) in found.items()})
    global_backend = None if config.attention_backend is None else to_backend(config.attention_backend)

    def layer(component: str, name: str, attn: nn.Module, role: str) -> Layer:
        backend, key = _resolve(config, component, role)
        if backend is None and global_backend is not None:
            backend, key = global_backend, "--attention-backend"
        return Layer(component, name, role, backend, key or "auto", _head_dim(attn))

    report = Report()
    for component, (diffusers_layers, transformers_layers) in found.items():
        module = components[component]
        state = _APPLIED[module] = _Applied()
        try:
            for name, attn, role in diffusers_layers:
                site = layer(component, name, attn, role)
                processor = getattr(attn, "processor", None)
                if hasattr(processor, "_attention_backend"):  # diffusers' dispatch: pin it to native SDPA
                    state.dispatch_backends.append((processor, processor._attention_backend))
                    processor._attention_backend = _native_dispatch_backend()
                state.hooks.append(attn.register_forward_pre_hook(_pre_hook(site)))
                state.hooks.append(attn.register_forward_hook(_post_hook(site), always_call=True))
                report.layers.append(site)
            if transformers_layers:
                _register_transformers()
                for name, attn, role in transformers_layers:
                    site = layer(component, name, attn, role)
                    _TRANSFORMERS_LAYERS[attn] = site
                    state.transformers_layers.append(attn)
                    report.layers.append(site)
                for model in _pretrained_models(module):
                    if model.config._attn_implementation != IMPLEMENTATION:
                        state.implementations.append((model, model.config._attn_implementation))
                        model.set_attn_implementation(IMPLEMENTATION)
                        if model.config._attn_implementation != IMPLEMENTATION:
                            raise ValueError(f"attnsel.diffusers: component {component!r} ({type(model).__name__}) "
                                             "cannot switch its attention implementation")
        except BaseException:
            remove({component: module})
            raise
    return report


def check_runnable(report: Report, device, dtype) -> None:
    """Raise ValueError now if a layer's chosen backend cannot run on `device`/`dtype` (where its head size is known).

    The calls check this anyway; checking before a run gives the reason before any work is done.
    """
    from .selection import explain_attn_backend

    for layer in report.layers:
        if layer.backend is not None and layer.head_dim is not None:
            try:
                explain_attn_backend(layer.head_dim, dtype, device, selected=layer.backend)
            except ValueError as err:
                reason = str(err).removeprefix("attnsel: ")
                raise ValueError(f"attnsel.diffusers: {layer.component} ({layer.role}): {reason}") from None


def remove(pipe: Any) -> None:
    """Undo `apply`: hooks removed, dispatch backends and attention implementations as they were."""
    for module in _components(pipe).values():
        state = _APPLIED.pop(module, None)
        if state is None:
            continue
        for handle in state.hooks:
            handle.remove()
        for processor, previous in state.dispatch_backends:
            processor._attention_backend = previous
        for model, previous in reversed(state.implementations):
            model.set_attn_implementation(previous)
        for attn in state.transformers_layers:
            _TRANSFORMERS_LAYERS.pop(attn, None)
