"""The composed pipeline: resolve and load every component in its backend scope, then encode -> denoise -> decode.

`ComposedPipeline.load_modules()` checks the per-component overrides against the pipeline before and after
loading: an override naming a component the pipeline does not have is an error (with a did-you-mean), and so is
one that ended up choosing the backend of no attention layer (the component has none, or every layer was decided
at a higher priority level: an explicit layer argument or a forced backend).
"""

from __future__ import annotations

import contextlib
import difflib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from .backends import Backend
from .config import numbered_component_base
from .context import ROLES
from .loader import ComponentLoader, LoadedComponent, attention_layers, using_config
from .selection import cuda_unavailable_reason

DEFAULT_COMPONENTS = ("text_encoder", "transformer", "vae")

# progress(stage, step, total, seconds): called after each text encoder, denoising step and decode.
ProgressFn = Callable[[str, int, int, float], None]


@dataclass(frozen=True)
class ComponentSpec:
    """How to build one component: `factory=None` = the embedded model (load_native), else load_customized."""

    factory: Any = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    family: tuple[str, ...] = ()  # more config keys to try after the component's own name


def _as_spec(value: Any) -> ComponentSpec:
    if isinstance(value, ComponentSpec):
        return value
    return ComponentSpec(factory=value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class TextEncodingStage:
    """Runs every text encoder (text_encoder, text_encoder_2, ...) and concatenates their tokens."""

    def __init__(self, encoders: list[tuple[str, Any]]):
        self.encoders = encoders

    def __call__(self, prompt: str, records: Mapping[str, LoadedComponent], progress: ProgressFn | None = None):
        outputs = []
        for i, (name, encoder) in enumerate(self.encoders):
            start = time.perf_counter()
            outputs.append(encoder(prompt))
            elapsed = time.perf_counter() - start
            if name in records:
                records[name].run_seconds += elapsed
            if progress:
                progress(name, i + 1, len(self.encoders), elapsed)
        return torch.cat(outputs, dim=1)


class DenoisingStage:
    """Euler sampler over a linear flow-matching schedule: x <- x + (sigma_next - sigma) * v(x, t, text).

    sequence_parallel: an `attnsel.distributed.SequenceParallel` to run the transformer in (every rank runs the
    sampler on the same latent; the transformer's blocks split its tokens), or None.
    """

    def __init__(self, transformer: Any, steps: int, sequence_parallel: Any = None):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        self.transformer = transformer
        self.steps = steps
        self.sequence_parallel = sequence_parallel
        self.attention_backend = self._infer_transformer_attention_backend(transformer)

    @staticmethod
    def _infer_transformer_attention_backend(transformer: Any) -> Backend | str | None:
        """The backend of the transformer's attention layers.

        One backend for every layer -> that `Backend`. A mix -> a string that says so explicitly, most-used first,
        e.g. ``"mixed: native (6 layers), torch_sdpa (2 layers)"`` (never a silent pick of one of them).
        No `attnsel.nn.Attention` layer -> None.
        """
        counts = Counter(layer.backend for _, layer in attention_layers(transformer))
        if not counts:
            return None
        if len(counts) == 1:
            return next(iter(counts))
        parts = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0].name.lower()))
        return "mixed: " + ", ".join(f"{b.name.lower()} ({_plural(n, 'layer')})" for b, n in parts)

    def __call__(self, latent: torch.Tensor, context: torch.Tensor, progress: ProgressFn | None = None,
                 record: LoadedComponent | None = None) -> torch.Tensor:
        sigmas = torch.linspace(1.0, 0.0, self.steps + 1)
        for i in range(self.steps):
            start = time.perf_counter()
            t = (sigmas[i] * 1000).expand(latent.shape[0])
            with self.sequence_parallel or contextlib.nullcontext():
                velocity = self.transformer(latent, t, context)
            latent = latent + (sigmas[i + 1] - sigmas[i]) * velocity
            elapsed = time.perf_counter() - start
            if record is not None:
                record.run_seconds += elapsed
            if progress:
                progress("denoise", i + 1, self.steps, elapsed)
        return latent


class DecodingStage:
    def __init__(self, vae: Any):
        self.vae = vae

    def __call__(self, latent: torch.Tensor, progress: ProgressFn | None = None,
                 record: LoadedComponent | None = None) -> torch.Tensor:
        start = time.perf_counter()
        image = self.vae(latent)
        elapsed = time.perf_counter() - start
        if record is not None:
            record.run_seconds += elapsed
        if progress:
            progress("vae", 1, 1, elapsed)
        return image


PIPELINE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_placement(device: torch.device | str, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for the pipeline, or a ValueError that lists the valid options / says why not here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device; valid: cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the pipeline runs on cpu or cuda")
    if dev.type == "cuda":
        why = cuda_unavailable_reason()
        if why:
            raise ValueError(f"device {device!r}: {why}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dtype not in PIPELINE_DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not supported; valid: {', '.join(PIPELINE_DTYPES)}")
    return dev, dtype


class ComposedPipeline:
    """The tiny text-to-image pipeline, each component built in its own attention-backend scope.

    components: component name -> `ComponentSpec`, a factory (class, function or "package.module:Class" for
    `load_customized`), or None for the embedded model (`load_native`). Defaults to text_encoder, transformer, vae.
    Extra text encoders (`text_encoder_2`, ...) are run too and their tokens concatenated.
    config: an `AttentionConfig`; None = `attnsel.get_config()` when loading.
    device, dtype: where the embedded models run (their layers select backends for that device and dtype); custom
    factories get only their spec's kwargs and place themselves. The image comes back as float32 on the CPU.
    """

    def __init__(self, components: Mapping[str, Any] | Iterable[str] | None = None, *, config=None,
                 weights_seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if components is None:
            components = {name: None for name in DEFAULT_COMPONENTS}
        elif not isinstance(components, Mapping):
            components = {name: None for name in components}
        self.specs: dict[str, ComponentSpec] = {name.replace("-", "_"): _as_spec(v) for name, v in components.items()}
        self.config = config
        self.weights_seed = weights_seed
        self.device, self.dtype = check_placement(device, dtype)
        self.loader = ComponentLoader(config)
        self.modules: dict[str, Any] = {}

    @property
    def component_names(self) -> list[str]:
        return list(self.specs)

    @property
    def records(self) -> dict[str, LoadedComponent]:
        """Per loaded component: backend(s), the level that chose them, the matched override, load/run time."""
        return self.loader.records

    # -- loading -----------------------------------------------------------------------------------------------
    def _overrides(self) -> dict[str, Any]:
        return dict(getattr(self.loader.config, "component_attention_backends", None) or {})

    def _check_unknown_overrides(self) -> dict[str, list[str]]:
        """key -> components it applies to; raise for keys that apply to none."""
        used: dict[str, list[str]] = {}
        for name, spec in self.specs.items():
            _, key = self.loader.resolve(name, spec.family)
            if key is not None:
                used.setdefault(key, []).append(name)
            for role in ROLES:  # role keys (transformer.cross) apply to the component they name
                for candidate in (name, *spec.family):
                    _, role_key = self.loader.config.resolve(candidate, role)
                    if role_key is not None and "." in role_key:
                        used.setdefault(role_key, []).append(name)
                        break
        unknown = [key for key in self._overrides() if key not in used]
        if unknown:
            key = unknown[0]
            names = self.component_names
            lowered = {n.lower(): n for n in names}
            close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.5)
            hint = f"; did you mean {lowered[close[0]]!r}?" if close else ""
            raise ValueError(
                f"component attention backend override {key!r} names no component of this pipeline "
                f"(components: {', '.join(names)}){hint}"
            )
        return used

    def _check_overrides_applied(self, used: Mapping[str, list[str]]) -> None:
        overrides = self._overrides()
        for key, names in used.items():
            records = [self.records[n] for n in names]
            if "." in key:  # a role key: some layer of that role must have taken it
                role = key.split(".", 1)[1]
                of_role = [layer for r in records for _, layer in r.layers if layer.role == role]
                if not of_role:
                    roles = sorted({layer.role or "none" for r in records for _, layer in r.layers})
                    comps = ", ".join(repr(n) for n in names)
                    raise ValueError(f"component attention backend override {key}={overrides[key]} matches no "
                                     f"attention layer: {comps} has no {role!r} layers (its layers' roles: "
                                     f"{', '.join(roles) or 'no attention layers'})")
                if any(layer.selection.source == "component" for layer in of_role):
                    continue
            elif any(r.override_applied for r in records):
                continue
            requested = records[0].requested_backend
            layers = sum(len(r.layers) for r in records)
            if layers == 0 and requested == Backend.NO_ATTENTION:
                continue  # `no_attention` on a component without attention states the fact: nothing to apply
            comps = ", ".join(repr(n) for n in names)
            value = overrides.get(key, requested.name.lower() if requested is not None else "?")
            if layers == 0:
                why = f"component {comps} has no attnsel attention layers"
            else:
                levels = Counter()
                for r in records:
                    levels.update(r.source_counts)
                why = (f"all {_plural(layers, 'attention layer')} of {comps} chose their backend at a higher "
                       f"priority level ({', '.join(f'{s}: {n}' for s, n in sorted(levels.items()))})")
            raise ValueError(f"component attention backend override {key}={value} was applied to no attention layer: "
                             f"{why}")

    def load_modules(self) -> dict[str, Any]:
        """Resolve every component's backend, load it through the loader and check that each override applied."""
        with using_config(self.config):
            used = self._check_unknown_overrides()
            self.modules = {}
            for name, spec in self.specs.items():
                kwargs = dict(spec.kwargs)
                if spec.factory is None:
                    kwargs.setdefault("seed", self.weights_seed)
                    kwargs.setdefault("device", self.device)
                    kwargs.setdefault("dtype", self.dtype)
                    module = self.loader.load_native(name, None, family=spec.family, **kwargs)
                else:
                    module = self.loader.load_customized(name, spec.factory, family=spec.family, **kwargs)
                if hasattr(module, "eval"):
                    module.eval()
                self.modules[name] = module
            self._check_overrides_applied(used)
        return self.modules

    # -- running -----------------------------------------------------------------------------------------------
    def _require(self, name: str) -> Any:
        if name not in self.modules:
            raise ValueError(f"the pipeline has no {name!r} component (components: {', '.join(self.component_names)})")
        return self.modules[name]

    @torch.no_grad()
    def __call__(self, prompt: str, steps: int = 4, seed: int = 0, progress: ProgressFn | None = None,
                 sequence_parallel: Any = None) -> torch.Tensor:
        """Generate one image, (1, 3, H, W) in [-1, 1]; the same prompt, steps and seed give the same image.

        sequence_parallel: an `attnsel.distributed.SequenceParallel` the transformer runs in (every rank calls this
        with the same arguments and gets the same image); None = one process.
        """
        if not self.modules:
            self.load_modules()
        for record in self.records.values():
            record.run_seconds = 0.0
        encoders = [(n, m) for n, m in self.modules.items() if (numbered_component_base(n) or n) == "text_encoder"]
        if not encoders:
            raise ValueError(f"the pipeline has no text encoder (components: {', '.join(self.component_names)})")
        transformer, vae = self._require("transformer"), self._require("vae")
        context = TextEncodingStage(encoders)(prompt, self.records, progress)
        shape = (1, transformer.latent_channels, transformer.latent_size, transformer.latent_size)
        # Noise from a CPU generator: the same seed gives the same starting latent on every device.
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.device, self.dtype)
        denoise = DenoisingStage(transformer, steps, sequence_parallel)
        latent = denoise(noise, context, progress, self.records.get("transformer"))
        return DecodingStage(vae)(latent, progress, self.records.get("vae")).float().cpu()

    def report(self) -> list[dict[str, Any]]:
        """One dict per loaded component: backends, level(s), override key, reasons and seconds."""
        rows = []
        for name, r in self.records.items():
            rows.append({
                "component": name,
                "kind": r.kind,
                "backends": {b.name.lower(): n for b, n in r.backend_counts.items()},
                "backend": r.describe_backends(),
                "sources": dict(r.source_counts),
                "why": r.describe_sources(),
                "override": r.matched_key,
                "reasons": r.reasons(),
                "load_seconds": r.load_seconds,
                "run_seconds": r.run_seconds,
            })
        return rows
