"""The tuning table: which backend is fastest for a call, measured, and the file that keeps it.

`auto` asks the native planner, which looks the call's bucket up in an in-memory table (`_C.set_tuning_entry`):
the fastest measured backend that accepts the call wins, else the static rank decides. This module fills that table:

- `tune(shapes)` times every backend that accepts each call signature on random inputs (`attnsel tune`), after
  checking its output against a float32 reference; a backend that raises or disagrees is recorded as refused.
- The table file: JSON in `$ATTNSEL_CACHE_DIR` (default `$XDG_CACHE_HOME/attnsel`, else `~/.cache/attnsel`), one
  file per device model + compute capability + driver (CUDA) or CPU model + ISA, torch and attnsel version. Written
  atomically (temp file + os.replace) and merged under a file lock, so processes tuning at once lose nothing; a
  corrupt or foreign file gives one warning and is ignored. `load()` (at `import attnsel`) pushes it into the planner.
- `record_shapes()`: records the signatures of the attention calls made inside it (`attnsel run --record-shapes`).
- Online tuning (`ATTNSEL_AUTOTUNE=1`): the first `auto` call of a bucket the table lacks is timed on its own inputs
  from `attnsel.attention` / `attnsel.nn.Attention` (Python only: the C++ API and compiled graphs read the table but
  never tune), and the winner is persisted.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from . import _C
from . import ops as _ops
from .backends import Backend, backend_names

try:  # POSIX; elsewhere the merge is still atomic per writer, only not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

SCHEMA_VERSION = 2  # 2: CUDA buckets tell key lengths off a multiple of 64 apart
ENV_CACHE_DIR = "ATTNSEL_CACHE_DIR"
ENV_AUTOTUNE = "ATTNSEL_AUTOTUNE"
PRESETS = ("diffusion",)

# Agreement with the float32 reference: |out - ref| <= atol + rtol * |ref| on every checked row. Loose enough for
# low-precision accumulation orders, tight enough to catch a wrong mask, causal alignment or scale.
TOLERANCES = {"float32": (2e-3, 2e-3), "float16": (1e-2, 1e-2), "bfloat16": (3e-2, 3e-2)}
REFERENCE_ROWS = 64          # query rows checked against the reference (evenly spaced, the last included)
TIME_BUDGET_S = 1.5          # per shape: timed calls of all candidates together (reps shrink to fit, >= MIN_REPS)
MIN_REPS = 3
WARMUP_CALLS = 3
WARMUP_S = 0.05
BURST_S = 5e-4               # calls shorter than this are timed in bursts of back-to-back calls
MAX_BURST = 32
MATH_MAX_BYTES = 8 << 30     # sdpa_math materialises the fp32 scores (and their softmax): not timed beyond this


# -- shapes -----------------------------------------------------------------------------------------------------
MASK_KINDS = ("none", "bool", "additive", "key_padding", "additive_key_padding")
_SHAPE_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                 "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_REQUIRED = ("batch", "heads", "q_len", "kv_len", "head_dim", "dtype")
_OPTIONAL = ("kv_heads", "head_dim_v", "causal", "mask", "device", "name", "component", "role")
_ROLES = ("self", "cross")
_DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Shape:
    """One attention call to tune: the `--shapes` / `--record-shapes` JSON object, validated."""

    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "float32"
    kv_heads: int | None = None      # None = heads
    head_dim_v: int | None = None    # None = head_dim
    causal: bool = False
    mask: str = "none"               # one of MASK_KINDS
    device: str = "cpu"              # cpu, cuda or cuda:N
    name: str = ""                   # a label for tables
    component: str = ""              # the pipeline component whose layer made the call ("" = not known)
    role: str = ""                   # that layer's role: "self", "cross" or "" (none)

    @property
    def device_type(self) -> str:
        return self.device.split(":", 1)[0]

    def signature(self) -> "_C.CallSignature":
        kind = {"none": "none", "bool": "bool", "key_padding": "bool"}.get(self.mask, "additive")
        return _C.CallSignature(self.batch, self.heads, self.kv_heads or self.heads, self.q_len, self.kv_len,
                                self.head_dim, self.head_dim_v or 0, self.dtype, self.device_type, kind,
                                self.mask.endswith("key_padding"), self.causal)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k in _REQUIRED or k == "device"}
        for key, default in (("kv_heads", None), ("head_dim_v", None), ("causal", False), ("mask", "none"),
                             ("name", ""), ("component", ""), ("role", "")):
            if getattr(self, key) != default:
                d[key] = getattr(self, key)
        return d

    def label(self) -> str:
        text = f"{self.batch}x{self.heads}x{self.q_len}x{self.head_dim}"
        if self.kv_len != self.q_len:
            text += f" kv{self.kv_len}"
        if self.kv_heads and self.kv_heads != self.heads:
            text += f" kvh{self.kv_heads}"
        if self.head_dim_v and self.head_dim_v != self.head_dim:
            text += f" dv{self.head_dim_v}"
        if self.causal:
            text += " causal"
        if self.mask != "none":
            text += f" {self.mask}"
        text += f" {_DTYPE_SHORT[self.dtype]}"
        return f"{self.name} {text}" if self.name else text


def _positive(obj: dict, key: str, where: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def parse_shape(obj: object, where: str = "shape", default_device: str = "cpu") -> Shape:
    """A Shape from one JSON object; ValueError naming the field and the valid options on any mistake."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object with keys {', '.join(_REQUIRED)}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_REQUIRED + _OPTIONAL)}")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r} (required: {', '.join(_REQUIRED)})")
    batch, heads, q_len, kv_len, head_dim = (_positive(obj, k, where) for k in _REQUIRED[:5])
    dtype = _SHAPE_DTYPES.get(obj["dtype"]) if isinstance(obj["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"{where}: 'dtype' must be one of float32, float16, bfloat16 (or fp32, fp16, bf16), "
                         f"got {obj['dtype']!r}")
    kv_heads = _positive(obj, "kv_heads", where) if obj.get("kv_heads") is not None else None
    if kv_heads is not None and heads % kv_heads:
        raise ValueError(f"{where}: 'kv_heads' ({kv_heads}) must divide 'heads' ({heads})")
    head_dim_v = _positive(obj, "head_dim_v", where) if obj.get("head_dim_v") is not None else None
    causal = obj.get("causal", False)
    if not isinstance(causal, bool):
        raise ValueError(f"{where}: 'causal' must be true or false, got {causal!r}")
    mask = obj.get("mask", "none")
    if mask is None:
        mask = "none"
    if mask not in MASK_KINDS:
        raise ValueError(f"{where}: 'mask' must be one of {', '.join(MASK_KINDS)}, got {mask!r}")
    device = obj.get("device", default_device)
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"{where}: 'device' must be cpu, cuda or cuda:N, got {device!r}")
    name = obj.get("name", "")
    if not isinstance(name, str):
        raise ValueError(f"{where}: 'name' must be a string, got {name!r}")
    component = obj.get("component") or ""
    if not isinstance(component, str) or "." in component or component != component.strip():
        raise ValueError(f"{where}: 'component' must be a component name such as 'transformer' (no '.', no "
                         f"surrounding spaces; give the role as 'role'), got {component!r}")
    role = obj.get("role") or ""
    if role not in ("",) + _ROLES:
        raise ValueError(f"{where}: 'role' must be one of {', '.join(_ROLES)}, got {role!r}")
    if role and not component:
        raise ValueError(f"{where}: 'role' needs a 'component'")
    return Shape(batch, heads, q_len, kv_len, head_dim, dtype, kv_heads, head_dim_v, causal, mask, device, name,
                 component, role)


def read_shapes(path: str | os.PathLike, default_device: str = "cpu") -> list[Shape]:
    """The shapes of a `--shapes` file (a JSON list of objects); ValueError with the file and entry on a mistake."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"cannot read shapes file {str(path)!r}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"shapes file {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"shapes file {str(path)!r} must hold a non-empty JSON list of shape objects")
    return [parse_shape(obj, f"{path}: entry {i}", default_device) for i, obj in enumerate(data)]


def write_shapes(path: str | os.PathLike, shapes: Iterable[Shape]) -> None:
    Path(path).write_text(json.dumps([s.to_json() for s in shapes], indent=1) + "\n")


# The component (and role) that makes each preset call, so `attnsel explain --preset` applies component overrides.
_T, _T_SELF, _T_CROSS = {"component": "transformer"}, {"component": "transformer", "role": "self"}, \
    {"component": "transformer", "role": "cross"}
_U_SELF, _U_CROSS = {"component": "unet", "role": "self"}, {"component": "unet", "role": "cross"}
_VAE, _CLIP, _T5 = {"component": "vae"}, {"component": "text_encoder"}, {"component": "text_encoder_2"}


def preset(name: str, device: str = "cuda") -> list[Shape]:
    """The shapes of a preset. `diffusion` on CUDA: the attention calls of common diffusion models at common
    resolutions, bf16 and fp16; on CPU a small stand-in (same kinds of call, tiny sizes) that tunes in seconds."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    if device.split(":", 1)[0] == "cpu":
        return _cpu_preset(device)
    # name, (batch, heads, q_len, kv_len, head_dim), extra fields
    calls = [
        ("flux-1024", (1, 24, 4608, 4608, 128), _T),            # joint: 4096 image + 512 text tokens
        ("flux-512", (1, 24, 1536, 1536, 128), _T),
        ("sd3-1024", (1, 24, 4250, 4250, 64), _T),              # joint: 4096 + 154 text
        ("sd3.5-large", (1, 38, 4429, 4429, 64), _T),
        ("sdxl-self-64", (2, 10, 4096, 4096, 64), _U_SELF),          # UNet at 1024x1024, CFG batch 2
        ("sdxl-self-32", (2, 20, 1024, 1024, 64), _U_SELF),
        ("sdxl-cross-64", (2, 10, 4096, 77, 64), _U_CROSS),
        ("sdxl-cross-32", (2, 20, 1024, 77, 64), _U_CROSS),
        ("wan1.3b-self", (1, 12, 32760, 32760, 128), _T_SELF),       # 480p, 81 frames
        ("wan1.3b-cross", (1, 12, 32760, 512, 128), _T_CROSS),
        ("wan14b-self", (1, 40, 32760, 32760, 128), _T_SELF),
        ("wan14b-cross", (1, 40, 32760, 512, 128), _T_CROSS),
        ("hunyuanvideo", (1, 24, 32896, 32896, 128), _T),       # 544x960, 61 frames + 256 text tokens
        ("cogvideox", (2, 48, 17776, 17776, 64), _T),           # 17550 video + 226 text, CFG batch 2
        ("vae-mid-512", (1, 1, 4096, 4096, 512), _VAE),
        ("vae-mid-1024", (1, 1, 16384, 16384, 512), _VAE),
        ("clip", (1, 12, 77, 77, 64), {"causal": True, **_CLIP}),
        ("t5", (1, 64, 512, 512, 64), {"mask": "key_padding", **_T5}),
    ]
    return [Shape(b, h, sq, sk, d, dtype, device=device, name=n, **extra)
            for dtype in ("bfloat16", "float16") for n, (b, h, sq, sk, d), extra in calls]


def _cpu_preset(device: str) -> list[Shape]:
    calls = [
        ("joint", (1, 4, 256, 256, 64), _T),
        ("cross", (2, 4, 256, 77, 64), _T_CROSS),
        ("vae-mid", (1, 1, 256, 256, 512), _VAE),
        ("clip", (1, 4, 77, 77, 64), {"causal": True, **_CLIP}),
        ("t5", (1, 4, 128, 128, 64), {"mask": "key_padding", **_T5}),
    ]
    return [Shape(b, h, sq, sk, d, "float32", device=device, name=n, **extra) for n, (b, h, sq, sk, d), extra in calls]


def shape_of_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                  is_causal: bool, component: str | None = None, role: str | None = None) -> Shape:
    """The Shape of an actual call (what `record_shapes` writes)."""
    mask = "none"
    if attn_mask is not None:
        dims = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        padding = dims[1] == 1 and dims[2] == 1
        mask = ("key_padding" if padding else "bool") if attn_mask.dtype == torch.bool else \
            ("additive_key_padding" if padding else "additive")
    dtype = _SHAPE_DTYPES[str(q.dtype).replace("torch.", "")]
    return Shape(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], dtype,
                 k.shape[1] if k.shape[1] != q.shape[1] else None,
                 v.shape[3] if v.shape[3] != q.shape[3] else None, bool(is_causal), mask, q.device.type,
                 component=component or "", role=role or "")


# -- the table file ---------------------------------------------------------------------------------------------
_WARNED: set[str] = set()
_LOCK = threading.Lock()
# What this process knows, per device type: bucket -> entry (loaded from the file or measured here).
_ENTRIES: dict[str, dict[str, dict]] = {}


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def cache_dir() -> Path:
    """Where tuning tables live: $ATTNSEL_CACHE_DIR, else $XDG_CACHE_HOME/attnsel, else ~/.cache/attnsel."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "attnsel"
    return Path.home() / ".cache" / "attnsel"


def cpu_model() -> str:
    """This machine's CPU model name (what identifies a CPU tuning table; benchmarks record it too)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _version() -> str:
    return getattr(sys.modules.get("attnsel"), "__version__", "unknown")


@functools.lru_cache(maxsize=None)
def _driver_version() -> str:
    """The NVIDIA driver's version (e.g. 580.159.04) from NVML, else the CUDA driver API's, else "unknown".
    Asked once per process (it cannot change while the process runs; `import attnsel` and every table save need
    it, and NVML's init is not free)."""
    import ctypes

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            try:
                text = ctypes.create_string_buffer(96)
                if nvml.nvmlSystemGetDriverVersion(text, 96) == 0:
                    return text.value.decode()
            finally:
                nvml.nvmlShutdown()
    except (OSError, AttributeError):
        pass
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return "unknown"


def device_identity(device: str = "cpu") -> dict:
    """What a table's timings are only valid for: the device model (+ capability, driver) and the software."""
    kind = device.split(":", 1)[0]
    ident: dict = {"device_type": kind}
    if kind == "cuda":
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        ident.update(model=torch.cuda.get_device_name(index), capability=f"{major}.{minor}", driver=_driver_version(),
                     cuda=torch.version.cuda or "")
    else:
        ident.update(model=cpu_model(), isa=_C.cpu_isa())
    # The kernels by their sources' content: a rebuild with other kernels (the same version) measures anew.
    ident.update(torch=torch.__version__, attnsel=_version(), kernels=_C.kernels_id())
    return ident


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:48] or "unknown"


def table_path(identity: dict) -> Path:
    """The table file for a device identity (its name spells the identity out)."""
    if identity["device_type"] == "cuda":
        hw = f"sm{identity['capability'].replace('.', '')}-driver{identity['driver']}"
    else:
        hw = identity["isa"]
    name = f"tuning-{identity['device_type']}-{_slug(identity['model'])}-{hw}-torch{_slug(identity['torch'])}" \
           f"-attnsel{_slug(identity['attnsel'])}-kernels{_slug(identity['kernels'])}.json"
    return cache_dir() / name


def _read_table(path: Path, identity: dict) -> dict[str, dict]:
    """The entries of a table file; a missing file is empty, a corrupt or foreign one warns once and is empty."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        _warn_once(f"read:{path}", f"attnsel: cannot read tuning table {path} ({err}); ignoring it")
        return {}
    problem = None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        data, problem = None, f"it is not valid JSON ({err})"
    if problem is None:
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            problem = "it is not an attnsel tuning table"
        elif data.get("schema") != SCHEMA_VERSION:
            problem = f"its schema version is {data.get('schema')!r}, this attnsel reads {SCHEMA_VERSION}"
        elif data.get("identity") != identity:
            theirs = data.get("identity") if isinstance(data.get("identity"), dict) else {}
            diff = [f"{k} {theirs.get(k)!r} (here {v!r})" for k, v in identity.items() if theirs.get(k) != v]
            problem = "it was measured for another device or version: " + ", ".join(diff or ["unknown identity"])
    if problem is not None:
        _warn_once(f"foreign:{path}", f"attnsel: ignoring tuning table {path}: {problem}; run `attnsel tune` to "
                                      f"measure this machine")
        return {}
    return {b: e for b, e in data["entries"].items() if isinstance(e, dict) and isinstance(e.get("results"), dict)}


def _push(bucket: str, entry: dict) -> None:
    """Give the planner a bucket's measured times (backends that ran and agreed)."""
    timed = []
    for name, result in entry["results"].items():
        backend = _C.find_backend(name)
        if backend is not None and isinstance(result, dict) and isinstance(result.get("ms"), (int, float)):
            timed.append((backend, float(result["ms"])))
    if timed:
        _C.set_tuning_entry(bucket, timed)


def load(devices: Sequence[str] | None = None) -> int:
    """Read this machine's table files (CPU, and the current CUDA device when one is visible) and push them into
    the planner; returns how many buckets were loaded. Never raises: problems are warnings."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    count = 0
    for device in devices:
        try:
            identity = device_identity(device)
            entries = _read_table(table_path(identity), identity)
        except Exception as err:  # a broken probe must not break `import attnsel`
            _warn_once(f"load:{device}", f"attnsel: could not load the {device} tuning table: {err}")
            continue
        with _LOCK:
            _ENTRIES.setdefault(identity["device_type"], {}).update(entries)
        for bucket, entry in entries.items():
            _push(bucket, entry)
        count += len(entries)
    return count


def entries(device: str = "cpu") -> dict[str, dict]:
    """The entries this process knows for a device type (loaded or measured here): bucket -> entry."""
    with _LOCK:
        return dict(_ENTRIES.get(device.split(":", 1)[0], {}))


def save(device: str, new_entries: dict[str, dict]) -> Path | None:
    """Merge entries into the device's table file: under an exclusive lock, read what is there, add ours, write a
    temp file in the same directory and rename it over the table (readers see the old or the new file, never half).
    Returns the path, or None (with a warning) when the cache directory is not writable."""
    identity = device_identity(device)
    path = table_path(identity)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            merged = _read_table(path, identity)
            merged.update(new_entries)
            data = {"schema": SCHEMA_VERSION, "identity": identity, "entries": dict(sorted(merged.items()))}
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)  # mkstemp makes it private; the table is as readable as any cache file
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as err:
        _warn_once(f"write:{path.parent}", f"attnsel: cannot write the tuning table in {path.parent} ({err}); "
                                           f"measurements are kept in memory for this process only (set "
                                           f"{ENV_CACHE_DIR} to a writable directory)")
        return None
    return path


def remember(device: str, measured: dict[str, dict]) -> None:
    """Use measured entries now: this process's view and the planner's table."""
    with _LOCK:
        _ENTRIES.setdefault(device.split(":", 1)[0], {}).update(measured)
    for bucket, entry in measured.items():
        _push(bucket, entry)


# -- measuring --------------------------------------------------------------------------------------------------
def make_inputs(shape: Shape, seed: int = 0):
    """Random q, k, v (standard normal) and a mask of the shape's kind on its device: bool masks keep ~80% of the
    keys and always the diagonal (every query sees a key); key-padding masks drop a random tail per batch."""
    device = torch.device(shape.device)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    hkv = shape.kv_heads or shape.heads

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    q = randn(shape.batch, shape.heads, shape.q_len, shape.head_dim)
    k = randn(shape.batch, hkv, shape.kv_len, shape.head_dim)
    v = randn(shape.batch, hkv, shape.kv_len, shape.head_dim_v or shape.head_dim)
    keep = None
    if shape.mask in ("bool", "additive"):
        keep = torch.rand(shape.batch, 1, shape.q_len, shape.kv_len, generator=gen, device=device) < 0.8
        rows = torch.arange(shape.q_len, device=device)
        keep[:, :, rows, rows % shape.kv_len] = True
    elif shape.mask in ("key_padding", "additive_key_padding"):
        valid = torch.randint(max(1, shape.kv_len // 2), shape.kv_len + 1, (shape.batch,), generator=gen,
                              device=device)
        keep = (torch.arange(shape.kv_len, device=device) < valid[:, None]).view(shape.batch, 1, 1, shape.kv_len)
    mask = keep
    if keep is not None and shape.mask.startswith("additive"):
        mask = torch.zeros(keep.shape, device=device, dtype=dtype).masked_fill_(~keep, float("-inf"))
    return q, k, v, mask


def _reference_rows(q, k, v, attn_mask, is_causal, scale, rows):
    """Float32 attention for the query rows `rows` only (cheap at any length), and which rows see a key."""
    group = q.shape[1] // k.shape[1]
    qf = q[:, :, rows].float()
    kf, vf = k.float(), v.float()
    if group > 1:
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if attn_mask is not None:
        m = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if m.shape[2] != 1:
            m = m[:, :, rows]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    if is_causal:
        seen = torch.arange(k.shape[2], device=q.device)[None, :] <= rows[:, None]
        scores = scores.masked_fill(~seen, float("-inf"))
    sees_key = torch.isfinite(scores).any(-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ vf, sees_key


def _disagreement(out, ref, sees_key, rows, dtype_name) -> str:
    """'' when out agrees with the reference on the checked rows, else what differs."""
    atol, rtol = TOLERANCES[dtype_name]
    got = out[:, :, rows].float()
    if got.shape != ref.shape:
        return f"output shape {tuple(out.shape)} is wrong"
    err = (got - ref).abs()
    bad = (err > atol + rtol * ref.abs()) | ~torch.isfinite(got)
    bad &= sees_key[..., None]
    if bool(bad.any()):
        worst = float(err.masked_fill(~sees_key[..., None], 0).nan_to_num(float("inf")).max())
        return f"output disagrees with the float32 reference (max abs error {worst:.3g} > {atol:g} + {rtol:g}*|ref|)"
    return ""


def _math_too_big(backend: Backend, sig) -> str:
    if backend is not Backend.SDPA_MATH:
        return ""
    need = 2 * 4 * sig.batch * sig.heads_q * sig.seq_q * sig.seq_kv
    if need <= MATH_MAX_BYTES:
        return ""
    return f"not timed: the math kernel would materialise {need / (1 << 30):.0f} GiB of scores"


def _error_text(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"raised {type(err).__name__}: {text[:300]}"


class _Timer:
    """Per-call time of a burst of back-to-back calls: CUDA events on a GPU, perf_counter on the CPU. A burst of a
    short call takes its host cost into account where that, not the kernel, bounds back-to-back calls."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], object], calls: int = 1):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            return lambda s=start, e=end: s.elapsed_time(e) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / calls
        return lambda: ms

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def measure(sig, q, k, v, attn_mask=None, is_causal=False, scale=None, reps: int = 20,
            budget_s: float = TIME_BUDGET_S, progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Every registered backend on these inputs: {name: {"ms": median} | {"refused": why}}.

    Backends whose descriptor refuses the signature are recorded with the reasons; the others run once and are
    checked against a float32 reference (a backend that raises or disagrees is refused), then the agreeing ones
    are timed through the op (the route `auto` takes) in interleaved rounds, short calls in bursts (reps shrink so
    all calls fit in `budget_s`, at least MIN_REPS), and the median kept."""
    results: dict[str, dict] = {}
    device = q.device
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    count = min(REFERENCE_ROWS, q.shape[2])
    rows = torch.linspace(0, q.shape[2] - 1, count, device=device).round().long().unique()
    candidates: dict[str, Callable[[], object]] = {}
    with torch.no_grad():
        ref, sees_key = _reference_rows(q, k, v, attn_mask, is_causal, scale, rows)
        for name in backend_names():
            backend = Backend[name.upper()]
            if _C.backend_descriptor(int(backend), sig.device) is None:
                continue  # not a backend of this device at all
            reasons = _C.refusal_reasons(int(backend), sig) or [_math_too_big(backend, sig)]
            reasons = [r for r in reasons if r]
            if reasons:
                results[name] = {"refused": "; ".join(r[len(name) + 2:] if r.startswith(name + ": ") else r
                                                      for r in reasons)}
                continue
            if progress:
                progress(name)

            def call(backend=int(backend)):  # the op, with the backend's id: the route `auto` takes
                return _ops._OP(q, k, v, attn_mask, is_causal, scale, backend)[0]

            try:
                out = call()
                problem = _disagreement(out, ref, sees_key, rows, sig.dtype)
                del out
            except Exception as err:
                problem = _error_text(err)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
            if problem:
                results[name] = {"refused": problem}
            else:
                candidates[name] = call
        if not candidates:
            return results
        timer = _Timer(device)
        per_call: dict[str, float] = {}
        for name, call in candidates.items():  # warm up; also estimates each call's cost
            t0, n = time.perf_counter(), 0
            while n < WARMUP_CALLS or (time.perf_counter() - t0 < WARMUP_S and n < 100):
                call()
                n += 1
                timer.sync()
            per_call[name] = (time.perf_counter() - t0) / n
        # Calls shorter than BURST_S are timed in bursts of back-to-back calls (at most MAX_BURST).
        burst = {name: max(1, min(MAX_BURST, round(BURST_S / max(t, 1e-9)))) for name, t in per_call.items()}
        per_round = sum(per_call[name] * burst[name] for name in candidates)
        rounds = max(MIN_REPS, min(reps, int(budget_s / max(per_round, 1e-9))))
        samples: dict[str, list] = {name: [] for name in candidates}
        order = list(candidates.items())
        for r in range(rounds):  # each round starts one candidate later: no backend always runs first
            for name, call in order[r % len(order):] + order[:r % len(order)]:
                samples[name].append(timer.time(call, burst[name]))
        timer.sync()
        for name, got in samples.items():
            results[name] = {"ms": round(statistics.median(g() for g in got), 6), "reps": rounds}
    return results


def _entry(signature: dict, results: dict[str, dict]) -> dict:
    """winner: the fastest for now; _remember_entry replaces it with what the planner takes from these times."""
    timed = {n: r["ms"] for n, r in results.items() if "ms" in r}
    return {"signature": signature, "results": results, "winner": min(timed, key=timed.get) if timed else None,
            "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _remember_entry(device: str, sig, bucket: str, entry: dict) -> None:
    """Give the planner a new entry, and record as its winner what `auto` now takes for the signature: the fastest,
    or within 2% of it the first in the static rank (the planner's rule)."""
    remember(device, {bucket: entry})
    if entry["winner"] is not None:
        chosen, _, _, _, measured = _C.explain_call(sig, _ops.AUTO, None)
        if measured:
            entry["winner"] = str(Backend(chosen))


def tune_shape(shape: Shape, reps: int = 20, progress: Callable[[str], None] | None = None) -> tuple[str, dict]:
    """(bucket, entry) for one shape, measured on random inputs. Raises ValueError when the device is missing."""
    if shape.device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"shape {shape.label()} is on {shape.device}, but no CUDA GPU is visible here")
    sig = shape.signature()
    try:
        q, k, v, mask = make_inputs(shape)
    except torch.OutOfMemoryError as err:
        raise ValueError(f"shape {shape.label()}: its inputs do not fit in {shape.device} memory ({err})") from None
    try:
        results = measure(sig, q, k, v, mask, shape.causal, reps=reps, progress=progress)
    finally:
        del q, k, v, mask
        if shape.device_type == "cuda":
            torch.cuda.empty_cache()
    return sig.bucket(), _entry(shape.to_json(), results)


def tune(shapes: Sequence[Shape], reps: int = 20, save_file: bool = True,
         progress: Callable[[int, Shape, str], None] | None = None) -> tuple[list[tuple[Shape, str, dict]], dict]:
    """Measure every shape, push the results into the planner and (save_file) merge them into each device's table
    file after each shape (so an interrupted run keeps what it measured). Returns ([(shape, bucket, entry)],
    {device type: path or None})."""
    done: list[tuple[Shape, str, dict]] = []
    paths: dict[str, Path | None] = {}
    measured: dict[tuple[str, str], dict] = {}  # (device, bucket) -> entry: one call made by several layers is timed once
    for i, shape in enumerate(shapes):
        bucket = shape.signature().bucket()
        if (shape.device, bucket) in measured:
            done.append((shape, bucket, measured[shape.device, bucket]))
            continue
        bucket, entry = tune_shape(shape, reps, None if progress is None else
                                   (lambda name, i=i, shape=shape: progress(i, shape, name)))
        measured[shape.device, bucket] = entry
        _remember_entry(shape.device, shape.signature(), bucket, entry)
        if save_file:
            paths[shape.device_type] = save(shape.device, {bucket: entry})
        done.append((shape, bucket, entry))
    return done, paths


# -- call hooks: recording and online tuning ---------------------------------------------------------------------
@contextlib.contextmanager
def record_shapes() -> Iterator[list[Shape]]:
    """Records the distinct signatures of the attention calls (attnsel.attention and attnsel.nn.Attention) made
    inside the block, in first-call order, into the yielded list."""
    recorded: list[Shape] = []
    seen: set[Shape] = set()

    def hook(q, k, v, attn_mask, is_causal, scale, backend, component, role):
        shape = shape_of_call(q, k, v, attn_mask, is_causal, component, role)
        if shape not in seen:
            seen.add(shape)
            recorded.append(shape)

    _ops.CALL_HOOKS.append(hook)
    try:
        yield recorded
    finally:
        _ops.CALL_HOOKS.remove(hook)


_TRIED: set[str] = set()     # buckets online tuning has measured (or failed on) in this process
_TUNING = threading.local()  # guards against tuning from inside a tuning measurement


def _autotune_hook(q, k, v, attn_mask, is_causal, scale, backend, component, role) -> None:
    if backend != _ops.AUTO or getattr(_TUNING, "active", False) or q.numel() == 0 or k.numel() == 0:
        return
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return  # a CUDA graph being captured must not see timing calls
    from .selection import call_signature

    try:
        sig = call_signature(q, k, v, attn_mask, is_causal)
    except ValueError:
        return  # the op itself reports what is wrong with the call
    bucket = sig.bucket()
    with _LOCK:
        if bucket in _TRIED or _C.tuning_entry(bucket) is not None:
            return
        _TRIED.add(bucket)
    _TUNING.active = True
    try:
        results = measure(sig, q.detach(), k.detach(), v.detach(), attn_mask, is_causal, scale, reps=10,
                          budget_s=0.5)
    finally:
        _TUNING.active = False
    entry = _entry(shape_of_call(q, k, v, attn_mask, is_causal).to_json(), results)
    _remember_entry(q.device.type, sig, bucket, entry)
    save(str(q.device), {bucket: entry})


def autotune_enabled() -> bool:
    return _autotune_hook in _ops.CALL_HOOKS


def set_autotune(enabled: bool) -> None:
    """Turn online tuning on or off for this process (what ATTNSEL_AUTOTUNE=1 does at import)."""
    if enabled and not autotune_enabled():
        _ops.CALL_HOOKS.append(_autotune_hook)
    elif not enabled and autotune_enabled():
        _ops.CALL_HOOKS.remove(_autotune_hook)


def autotune_from_env() -> None:
    value = os.environ.get(ENV_AUTOTUNE, "").strip()
    if value in ("", "0"):
        return
    if value != "1":
        _warn_once("env", f"attnsel: {ENV_AUTOTUNE} must be 1 (on) or 0 (off), got {value!r}; online tuning is off")
        return
    set_autotune(True)
