"""The `attnsel` command: run the embedded tiny pipeline, list backends, explain per-component choices.

    attnsel run --prompt "a red fox" --steps 4 --output out.png [--seed N] [backend flags]
    attnsel run --model PATH [...]      # a local diffusers pipeline, through attnsel.diffusers
    attnsel backends
    attnsel explain [backend flags] [--preset diffusion | --shapes FILE]
    attnsel tune (--preset diffusion | --shapes FILE) [--device D] [--reps N] [--dry-run]

Backend flags (from `AttentionConfig.add_cli_args`): --attention-backend NAME, --component-attention-backends
VALUE (string or JSON; keys `component` or `component.role`), --component-attention-backends.<key> NAME,
--config FILE; also spelled with underscores.
Exit codes: 0 success (and -h); 2 usage or configuration error, for any argv (one line on stderr, never a
traceback); 1 I/O failure writing the output.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

PROG = "attnsel"
# `attnsel backends` checks availability for this representative layer shape (the tiny pipeline's head_dim).
PROBE_HEAD_SIZE = 64
PROBE_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}


class UsageError(Exception):
    """A command-line error: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block and exit
        raise UsageError(message)


def _one_line(message: object) -> str:
    text = " ".join(str(message).split())
    return text[len("attnsel: "):] if text.startswith("attnsel: ") else text


def build_parser() -> _Parser:
    from .config import AttentionConfig

    parser = _Parser(prog=PROG, allow_abbrev=False,
                     description="Choose the attention backend per diffusion-pipeline component.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--cmake-dir", action=_PrintPath, nargs=0, what="get_cmake_dir",
                        help="print the directory of attnsel's CMake package (for attnsel_DIR) and exit")
    parser.add_argument("--include-dir", action=_PrintPath, nargs=0, what="get_include",
                        help="print the directory of attnsel's C++ headers and exit")
    sub = parser.add_subparsers(dest="command", metavar="{run,backends,explain,tune}", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", allow_abbrev=False, help="run the embedded tiny text-to-image pipeline",
                         description="Run the embedded tiny pipeline (text encoder, DiT, VAE) and write a PNG.")
    run.add_argument("--prompt", default="a tiny red fox", help="text prompt (default: %(default)r)")
    run.add_argument("--steps", type=_positive_int, default=4, help="denoising steps (default: %(default)s)")
    run.add_argument("--seed", type=_seed, default=0, help="noise seed (default: %(default)s)")
    run.add_argument("--output", "-o", default="out.png", help="PNG file to write (default: %(default)s)")
    run.add_argument("--record-shapes", metavar="FILE",
                     help="write the distinct attention call shapes of the run to FILE (JSON, the format of "
                          "`attnsel tune --shapes`)")
    _add_placement_args(run)
    _add_model_args(run)
    _add_sequence_parallel_args(run)
    AttentionConfig.add_cli_args(run)

    sub.add_parser("backends", allow_abbrev=False, help="list every backend, its aliases and where it can run",
                   description=f"List every backend and alias, and whether it can run here on CPU and CUDA "
                               f"(checked for head_size {PROBE_HEAD_SIZE}, {PROBE_DTYPES['cpu']} on CPU, "
                               f"{PROBE_DTYPES['cuda']} on CUDA).")

    explain = sub.add_parser("explain", allow_abbrev=False,
                             help="show each component's backend and the priority level that chose it",
                             description="Build the tiny pipeline's layers (without running) and show, per "
                                         "component, the backend and the level that chose it: explicit > forced > "
                                         "component > global > auto.")
    explain.add_argument("--reasons", action="store_true", help="also print every selection reason")
    _add_shape_args(explain, required=False, what="instead, show the plan (backend, source, tuned times) of each "
                                                  "call of")
    _add_placement_args(explain)
    AttentionConfig.add_cli_args(explain)
    _add_tune_parser(sub)
    return parser


def _add_placement_args(parser: argparse.ArgumentParser) -> None:
    from .pipeline import PIPELINE_DTYPES

    parser.add_argument("--device", default="cpu",
                        help="where the pipeline runs: cpu, cuda or cuda:N; layers select backends for it "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=list(PIPELINE_DTYPES),
                        help="weights and activations (default: %(default)s)")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("diffusers pipeline (instead of the embedded one; needs attnsel[diffusers])")
    group.add_argument("--model", metavar="PATH", default=None,
                       help="local folder of a diffusers pipeline (save_pretrained / a downloaded snapshot); "
                            "loaded without network")
    group.add_argument("--height", type=_positive_int, default=None, help="image height (default: the pipeline's)")
    group.add_argument("--width", type=_positive_int, default=None, help="image width (default: the pipeline's)")
    group.add_argument("--frames", type=_positive_int, default=None,
                       help="frames, for video pipelines (default: the pipeline's)")


def _add_sequence_parallel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ulysses-degree", type=_positive_int, default=1,
                        help="sequence-parallel Ulysses degree of the transformer (launch with torchrun "
                             "--nproc-per-node ULYSSES*RING -m attnsel run ...; default: %(default)s)")
    parser.add_argument("--ring-degree", type=_positive_int, default=1,
                        help="sequence-parallel ring degree of the transformer (default: %(default)s)")


def _sequence_parallel(ns: argparse.Namespace):
    """None for one process; else join torchrun's process group (this rank's GPU on CUDA) and build the groups."""
    if ns.ulysses_degree * ns.ring_degree == 1:
        return None
    import torch

    from . import distributed

    try:
        sp = distributed.init_from_env(ns.ulysses_degree, ns.ring_degree, torch.device(ns.device))
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"argument --ulysses-degree/--ring-degree: {err}") from None
    if ns.device == "cuda":
        ns.device = f"cuda:{torch.cuda.current_device()}"
    return sp


def _pipeline(ns: argparse.Namespace, config):
    from .pipeline import PIPELINE_DTYPES, ComposedPipeline

    try:
        return ComposedPipeline(config=config, device=ns.device, dtype=PIPELINE_DTYPES[ns.dtype])
    except ValueError as err:
        raise UsageError(f"argument --device/--dtype: {err}") from None


class _PrintPath(argparse.Action):
    """Prints an SDK location and exits 0, like --version (used as `python -m attnsel --cmake-dir`)."""

    def __init__(self, *args, what: str, **kwargs):
        self.what = what
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import sdk

        print(getattr(sdk, self.what)())
        parser.exit(0)


def _version() -> str:
    from . import __version__

    return __version__


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _seed(value: str) -> int:
    # The range torch.Generator.manual_seed takes (beyond it torch raises a RuntimeError-like overflow error).
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or not -(2 ** 63) <= n < 2 ** 64:
        raise argparse.ArgumentTypeError(f"expected an integer that fits 64 bits, got {value!r}")
    return n


def _abbreviation_hint(parser: _Parser, argv: Sequence[str], message: str) -> str:
    """Name the full flag when an unrecognized argument is an abbreviation of one (abbreviations are refused)."""
    if not message.startswith("unrecognized arguments"):
        return message
    options: set[str] = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options.update(sub._option_string_actions)
    for token in argv:
        name = token.split("=", 1)[0]
        if name.startswith("--") and len(name) > 2 and name not in options:
            meant = sorted(o for o in options if o.startswith(name))
            if meant:
                return f"abbreviated option {name} is not accepted; write it in full: {' or '.join(meant)}"
    return message


# -- commands -------------------------------------------------------------------------------------------------
def _config_from(ns: argparse.Namespace):
    from .config import AttentionConfig

    return AttentionConfig.from_cli_args(ns)


def _describe_config(config) -> str:
    overrides = ",".join(f"{k}={v}" for k, v in config.component_attention_backends.items()) or "none"
    return f"--attention-backend={config.attention_backend or 'none'}, component overrides: {overrides}"


def _component_lines(pipeline, with_times: bool) -> list[str]:
    rows = pipeline.report()
    width = max((len(r["component"]) for r in rows), default=0)
    lines = []
    for r in rows:
        line = f"  {r['component']:<{width}}  backend: {r['backend']}; chosen by: {r['why']}"
        if with_times:
            line += f"; time: load {r['load_seconds']:.2f}s, run {r['run_seconds']:.2f}s"
        lines.append(line)
    return lines


def _recording(path: str | None):
    """Records the run's attention call shapes when --record-shapes is given."""
    import contextlib

    from .tuning import record_shapes

    return record_shapes() if path is not None else contextlib.nullcontext([])


def _write_recorded(path: str | None, recorded, out: TextIO) -> None:
    if path:
        from .tuning import write_shapes

        write_shapes(path, recorded)
        print(f"recorded {len(recorded)} attention call shapes to {path}", file=out)


def cmd_run(ns: argparse.Namespace, out: TextIO) -> int:
    from .pipeline import DenoisingStage
    from .png import write_png
    from .tracing import trace

    output = Path(ns.output)
    if not output.parent.is_dir():
        raise UsageError(f"argument --output: directory {str(output.parent)!r} does not exist")
    if ns.record_shapes is not None and not Path(ns.record_shapes).parent.is_dir():
        raise UsageError(f"argument --record-shapes: directory {str(Path(ns.record_shapes).parent)!r} does not exist")
    if ns.model is not None:
        if ns.ulysses_degree * ns.ring_degree > 1:
            raise UsageError("arguments --ulysses-degree/--ring-degree split the embedded pipeline's transformer; "
                             "they do not apply to --model")
        return _run_model(ns, out)
    if (ns.height, ns.width, ns.frames) != (None, None, None):
        raise UsageError("arguments --height/--width/--frames need --model (the embedded pipeline has a fixed size)")
    config = _config_from(ns)
    start = time.perf_counter()
    sp = _sequence_parallel(ns)
    if sp is not None and sp.rank != 0:
        out = io.StringIO()  # rank 0 alone reports and writes the image
    pipeline = _pipeline(ns, config)
    print(f"attnsel run: prompt={ns.prompt!r} steps={ns.steps} seed={ns.seed} device={pipeline.device} "
          f"dtype={ns.dtype} ({_describe_config(config)})", file=out, flush=True)
    if sp is not None:
        print(f"sequence parallel: ulysses_degree={sp.ulysses_degree} ring_degree={sp.ring_degree} "
              f"({sp.world_size} processes; transformer tokens split over them)", file=out, flush=True)
    pipeline.load_modules()
    print(f"loaded {', '.join(pipeline.component_names)} in {time.perf_counter() - start:.2f}s", file=out, flush=True)

    def progress(stage: str, step: int, total: int, seconds: float) -> None:
        label = f"denoising step {step}/{total}" if stage == "denoise" else f"{stage} {step}/{total}"
        print(f"  [{label}] {seconds:.2f}s", file=out, flush=True)

    with _recording(ns.record_shapes) as recorded, trace() as calls:
        image = pipeline(ns.prompt, steps=ns.steps, seed=ns.seed, progress=progress, sequence_parallel=sp)
    if sp is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
        if sp.rank != 0:
            return 0
    _write_recorded(ns.record_shapes, recorded, out)
    path = write_png(ns.output, image)
    print("components:", file=out)
    for line in _component_lines(pipeline, with_times=True):
        print(line, file=out)
    backend = DenoisingStage._infer_transformer_attention_backend(pipeline.modules["transformer"])
    print(f"transformer attention backend: {backend}", file=out)
    print(calls.summary(), file=out)
    print(f"wrote {path} ({image.shape[-1]}x{image.shape[-2]} RGB PNG) in {time.perf_counter() - start:.2f}s total",
          file=out, flush=True)
    return 0


def _run_model(ns: argparse.Namespace, out: TextIO) -> int:
    """`attnsel run --model PATH`: a diffusers pipeline from a local folder, its attention routed through attnsel."""
    import inspect

    from .pipeline import PIPELINE_DTYPES
    from .selection import cuda_unavailable_reason
    from .tracing import trace

    model = Path(ns.model)
    if not model.is_dir():
        raise UsageError(f"argument --model: {ns.model!r} is not a local folder (attnsel loads pipelines from disk "
                         "only, without network: download the pipeline first and pass its folder)")
    if not (model / "model_index.json").is_file():
        raise UsageError(f"argument --model: {ns.model!r} has no model_index.json (not a diffusers pipeline folder)")
    if ns.device.startswith("cuda") and cuda_unavailable_reason():
        raise UsageError(f"argument --device: {ns.device}: {cuda_unavailable_reason()}")
    try:
        import diffusers
        import transformers  # noqa: F401  (the text encoders)

        from . import diffusers as adapter
    except ImportError as err:
        raise UsageError(f"argument --model needs diffusers and transformers ({err}): "
                         "pip install 'attnsel[diffusers]'") from None
    config = _config_from(ns)
    for library in (diffusers, sys.modules["transformers"]):  # our lines only: no loading bars or library warnings
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()  # the denoising loop's bar stays
    start = time.perf_counter()
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(model), local_files_only=True,
                                                           dtype=PIPELINE_DTYPES[ns.dtype])
        pipe.to(ns.device)
    except (OSError, ValueError, TypeError, ImportError) as err:
        raise UsageError(f"argument --model: cannot load {ns.model!r}: {err}") from None
    print(f"attnsel run: {type(pipe).__name__} from {ns.model} prompt={ns.prompt!r} steps={ns.steps} seed={ns.seed} "
          f"device={ns.device} dtype={ns.dtype} ({_describe_config(config)}); loaded in "
          f"{time.perf_counter() - start:.2f}s", file=out, flush=True)
    report = adapter.apply(pipe, config)
    adapter.check_runnable(report, ns.device, PIPELINE_DTYPES[ns.dtype])
    print("attention layers:", file=out)
    print(report, file=out, flush=True)

    accepted = inspect.signature(pipe.__call__).parameters
    kwargs = {"num_inference_steps": ns.steps, "output_type": "pil",
              "generator": _generator(ns.device, ns.seed)}
    for flag, name in (("height", "height"), ("width", "width"), ("frames", "num_frames")):
        value = getattr(ns, flag)
        if value is not None:
            if name not in accepted:
                raise UsageError(f"argument --{flag}: {type(pipe).__name__} takes no {name}")
            kwargs[name] = value
    with _recording(ns.record_shapes) as recorded, trace() as calls:
        result = pipe(ns.prompt, **kwargs)
    _write_recorded(ns.record_shapes, recorded, out)
    frames = getattr(result, "frames", None)
    if frames is not None:  # video pipelines: a batch of frame lists
        path = _write_gif(Path(ns.output), list(frames[0]))
        what = f"{len(frames[0])} frames, animated GIF"
    else:
        image = result.images[0]
        path = Path(ns.output)
        image.save(path, format="PNG")
        what = f"{image.width}x{image.height} PNG"
    print(calls.summary(), file=out)
    print(f"wrote {path} ({what}) in {time.perf_counter() - start:.2f}s total", file=out, flush=True)
    return 0


def _generator(device: str, seed: int):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def _write_gif(output: Path, frames: list) -> Path:
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("a video pipeline's frames are written as an animated GIF, which needs Pillow: "
                         "pip install pillow") from None
    path = output if output.suffix.lower() == ".gif" else output.with_suffix(".gif")
    images = [f if isinstance(f, Image.Image) else Image.fromarray(f) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=125, loop=0)
    return path


def _feature_text(d: dict) -> str:
    """One line of what a registered backend takes (its descriptor)."""
    f = d["features"]
    dtypes = [n for key, n in (("f32", "float32"), ("f16", "float16"), ("bf16", "bfloat16")) if d[key]]
    head = f"{d['min_head']}..{d['max_head']}" if d["max_head"] < (1 << 20) else f">= {d['min_head']}"
    if d["head_multiple"] > 1:
        head += f" (multiple of {d['head_multiple']})"
    masks = "+".join(m for m, on in (("bool", f["bool_mask"]), ("additive", f["additive_mask"])) if on) or "none"
    if f["key_padding_mask_only"] and masks != "none":
        masks += " (key-padding only)"
    causal = ("yes" if f["causal_any_lengths"] else "Sq == Sk only") if f["causal"] else "no"
    flags = [name for name, on in (("GQA", f["grouped_query"]), ("Sq != Sk", f["different_lengths"]),
                                   ("Dv != D", f["different_value_head"]), ("lse", f["lse"]),
                                   ("backward", f["backward"]), ("deterministic", f["deterministic"])) if on]
    parts = [f"dtypes {', '.join(dtypes) or 'none'}", f"head_dim {head}", f"masks {masks}", f"causal {causal}"]
    if flags:
        parts.append(", ".join(flags))
    if d["min_sm"]:
        parts.append(f"sm >= {d['min_sm'] // 10}.{d['min_sm'] % 10}")
    rank = d["auto_rank"]
    parts.append(f"auto rank {rank}" if rank >= 0 else "auto: only when tuned")
    return "; ".join(parts)


def cmd_backends(ns: argparse.Namespace, out: TextIO) -> int:
    from . import _C
    from .backends import backend_aliases, backend_names

    aliases: dict[str, list[str]] = {}
    for alias, target in backend_aliases().items():
        aliases.setdefault(target, []).append(alias)
    print(f"attnsel backends (whether each runs here is checked for a head_size {PROBE_HEAD_SIZE} call, "
          f"{PROBE_DTYPES['cpu']} on CPU, {PROBE_DTYPES['cuda']} on CUDA):", file=out)
    for i, name in enumerate(backend_names()):
        alias_text = f" (aliases: {', '.join(sorted(aliases[name]))})" if name in aliases else ""
        print(f"{name}{alias_text}", file=out)
        for device in ("cpu", "cuda"):
            probe = _C.CallSignature(1, 1, 1, 1, 1, PROBE_HEAD_SIZE, dtype=PROBE_DTYPES[device], device=device)
            reasons = _C.refusal_reasons(i, probe)
            prefix = f"{name}: "
            reasons = [r[len(prefix):] if r.startswith(prefix) else r for r in reasons]
            status = "available" if not reasons else "not available: " + "; ".join(reasons)
            print(f"  {device:<4} {status}", file=out)
            descriptor = _C.backend_descriptor(i, device)
            if descriptor is not None:
                library = f"{descriptor['library']}: " if descriptor["library"] else ""
                print(f"       {library}{_feature_text(descriptor)}", file=out)
    print("aliases: " + ", ".join(f"{a} -> {t}" for a, t in sorted(backend_aliases().items())), file=out)
    return 0


def cmd_explain(ns: argparse.Namespace, out: TextIO) -> int:
    from .pipeline import DenoisingStage

    config = _config_from(ns)
    if ns.preset or ns.shapes:
        return _explain_shapes(ns, config, out)
    pipeline = _pipeline(ns, config)
    pipeline.load_modules()  # builds the layers (which pick their backends); runs nothing
    print(f"attnsel explain ({_describe_config(config)}; device={pipeline.device} dtype={ns.dtype}); "
          f"priority: explicit > forced > component > global > auto", file=out)
    for line, record in zip(_component_lines(pipeline, with_times=False), pipeline.records.values()):
        print(line, file=out)
        if ns.reasons:
            for reason in record.reasons():
                print(f"      - {reason}", file=out)
    backend = DenoisingStage._infer_transformer_attention_backend(pipeline.modules["transformer"])
    print(f"transformer attention backend: {backend}", file=out)
    return 0


# -- tune (and the shape plans of explain) ----------------------------------------------------------------------
def _add_shape_args(parser: argparse.ArgumentParser, required: bool, what: str) -> None:
    from .tuning import PRESETS

    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--preset", choices=PRESETS,
                       help=f"{what} a preset: diffusion = Flux, SD3, SDXL, Wan, HunyuanVideo, CogVideoX, VAE "
                            f"mid-blocks, CLIP/T5 (bf16 and fp16 on CUDA; small stand-ins on CPU)")
    group.add_argument("--shapes", metavar="FILE",
                       help=f"{what} the shapes in FILE: a JSON list of objects with batch, heads, q_len, kv_len, "
                            f"head_dim, dtype and optional kv_heads, head_dim_v, causal, mask "
                            f"(none/bool/additive/key_padding/additive_key_padding), device, name")


def _add_tune_parser(sub) -> None:
    tune = sub.add_parser("tune", allow_abbrev=False, help="measure the fastest backend per call shape for `auto`",
                          description="Time every backend that accepts each call (after checking its output "
                                      "against a float32 reference) and write the tuning table `auto` reads.")
    _add_shape_args(tune, required=True, what="tune")
    tune.add_argument("--device", default=None,
                      help="cpu, cuda or cuda:N: where to tune (default: cuda when a GPU is visible, else cpu; a "
                           "shapes file's own device keys win)")
    tune.add_argument("--reps", type=_positive_int, default=None,
                      help="timed calls per backend, at most (default: 20 on CUDA, 10 on CPU; fewer when calls "
                           "are slow)")
    tune.add_argument("--dry-run", action="store_true", help="list the shapes and their buckets; time nothing")


def _shapes_from(ns: argparse.Namespace, device: str) -> list:
    from . import tuning

    try:
        if ns.preset:
            return tuning.preset(ns.preset, device)
        return tuning.read_shapes(ns.shapes, default_device=device)
    except ValueError as err:
        raise UsageError(f"argument --{'preset' if ns.preset else 'shapes'}: {err}") from None


def _tune_device(value: str | None) -> str:
    import re

    from .selection import cuda_unavailable_reason

    if value is None:
        return "cpu" if cuda_unavailable_reason() else "cuda"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise UsageError(f"argument --device: expected cpu, cuda or cuda:N, got {value!r}")
    return value


class _Progress:
    """A text progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: int, width: int = 24):
        self.total, self.stream, self.width = total, sys.stderr, width
        self.tty = self.stream.isatty()

    def show(self, done: int, text: str) -> None:
        filled = self.width * done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {text}"
        if self.tty:
            print(f"\r\033[K{line[:160]}", end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


def _result_table(rows: list) -> list[str]:
    """rows: [(label, entry)] -> the lines of a table: shape, each backend's ms (or '-' refused), winner."""
    names: list[str] = []
    for _, entry in rows:
        names += [n for n, r in entry["results"].items() if "ms" in r and n not in names]
    width = max([len("shape")] + [len(label) for label, _ in rows])
    head = f"{'shape':<{width}}  " + "  ".join(f"{n:>10}" for n in names) + "  winner"
    lines = [head]
    for label, entry in rows:
        cells = []
        for n in names:
            r = entry["results"].get(n, {})
            cells.append(f"{r['ms']:>10.4g}" if "ms" in r else f"{'-':>10}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells) + f"  {entry['winner'] or 'none (all refused)'}")
    return lines


def cmd_tune(ns: argparse.Namespace, out: TextIO) -> int:
    from . import tuning

    device = _tune_device(ns.device)
    shapes = _shapes_from(ns, device)
    for i, shape in enumerate(shapes):
        if shape.device_type == "cuda" and not ns.dry_run:
            from .selection import cuda_unavailable_reason

            if cuda_unavailable_reason():
                raise UsageError(f"shape {i} ({shape.label()}) is on {shape.device}: {cuda_unavailable_reason()}")
    if ns.dry_run:
        print(f"attnsel tune --dry-run: {len(shapes)} shapes", file=out)
        for shape in shapes:
            print(f"  {shape.label()}  ({shape.device}, bucket {shape.signature().bucket()})", file=out)
        return 0
    reps = ns.reps or (20 if any(s.device_type == "cuda" for s in shapes) else 10)
    bar = _Progress(len(shapes))
    try:
        done, paths = tuning.tune(shapes, reps=reps, progress=lambda i, s, name: bar.show(i, f"{s.label()}: {name}"))
        bar.show(len(shapes), "done")
    finally:
        bar.close()
    print(f"attnsel tune: {len(done)} shapes, median ms of up to {reps} calls per backend "
          f"('-': refused or disagreed, see the table file)", file=out)
    for line in _result_table([(shape.label(), entry) for shape, _, entry in done]):
        print(line, file=out)
    buckets: dict[str, list[str]] = {}
    for shape, bucket, _ in done:
        buckets.setdefault(bucket, []).append(shape.label())
    for labels in buckets.values():
        if len(labels) > 1:
            print(f"note: {', '.join(labels)} share one bucket; the table keeps the last measurement", file=out)
    for kind, path in paths.items():
        if path is None:
            print(f"{kind} results kept in memory only (the cache directory is not writable)", file=out)
        else:
            print(f"wrote the {kind} tuning table: {path}", file=out)
    return 0


def _explain_shapes(ns: argparse.Namespace, config, out: TextIO) -> int:
    from . import _C
    from .backends import Backend, to_backend
    from .context import ComponentScope, native_view

    device = _tune_device(ns.device)
    shapes = _shapes_from(ns, device)
    global_id = None if config.attention_backend is None else int(to_backend(config.attention_backend))
    print(f"attnsel explain: the plan of each call ({_describe_config(config)}; measured = tuning table ms)",
          file=out)
    labels = [s.label() + (f" [{s.component}{'.' + s.role if s.role else ''}]" if s.component else "") for s in shapes]
    width = max(len(label) for label in labels)
    for shape, label in zip(shapes, labels):
        sig = shape.signature()
        # The policy a layer of this shape's component and role would get (component.role > component > global),
        # as the loader gives it: a component scope when a key matches, else the global flag, else auto.
        backend, key = config.resolve(shape.component, shape.role or None) if shape.component else (None, None)
        try:
            if key is not None:
                chosen, source, _, reasons, measured = _C.explain_call(
                    sig, None, native_view(ComponentScope(shape.component, backend)))
                source = f"component key {key}"
            else:
                chosen, source, _, reasons, measured = _C.explain_call(sig, global_id, None)
                if global_id is not None:
                    source = "global --attention-backend"
            plan = f"{Backend(chosen)} ({source}{', measured' if measured else ''})"
        except ValueError as err:
            plan, reasons = f"cannot run: {_one_line(err)}", []
        entry = _C.tuning_entry(sig.bucket())
        times = "none" if entry is None else \
            ", ".join(f"{Backend(i)} {ms:.4g}" for i, ms in sorted(entry, key=lambda e: e[1]))
        print(f"  {label:<{width}}  {plan}; measured: {times}", file=out)
        if ns.reasons:
            for reason in reasons:
                print(f"      - {reason}", file=out)
    return 0


COMMANDS = {"run": cmd_run, "backends": cmd_backends, "explain": cmd_explain, "tune": cmd_tune}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `attnsel` command; returns the exit code (0 ok, 2 usage/config error, 1 I/O failure).

    Errors are one line on stderr, never a traceback.
    """
    try:
        from .config import check_argv

        argv = check_argv(sys.argv[1:] if argv is None else argv)
        parser = build_parser()
        try:
            ns = parser.parse_args(argv)
        except UsageError as err:
            raise UsageError(_abbreviation_hint(parser, argv, str(err))) from None
        except ValueError as err:  # the config's flag rewriter reports through ValueError
            raise UsageError(str(err)) from None
        return COMMANDS[ns.command](ns, sys.stdout)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ValueError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
