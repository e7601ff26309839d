"""The `attnsel` command: run the embedded tiny pipeline, list backends, explain per-component choices.

    attnsel run --prompt "a red fox" --steps 4 --output out.png [--seed N] [backend flags]
    attnsel backends
    attnsel explain [backend flags]

Backend flags (from `AttentionConfig.add_cli_args`): --attention-backend NAME, --component-attention-backends
VALUE (string or JSON), --component-attention-backends.<component> NAME, --config FILE.
Exit codes: 0 success; 2 usage or configuration error (one line on stderr); 1 I/O failure.
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
    sub = parser.add_subparsers(dest="command", metavar="{run,backends,explain}", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", allow_abbrev=False, help="run the embedded tiny text-to-image pipeline",
                         description="Run the embedded tiny pipeline (text encoder, DiT, VAE) and write a PNG.")
    run.add_argument("--prompt", default="a tiny red fox", help="text prompt (default: %(default)r)")
    run.add_argument("--steps", type=_positive_int, default=4, help="denoising steps (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    run.add_argument("--output", "-o", default="out.png", help="PNG file to write (default: %(default)s)")
    _add_placement_args(run)
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
    _add_placement_args(explain)
    AttentionConfig.add_cli_args(explain)
    return parser


def _add_placement_args(parser: argparse.ArgumentParser) -> None:
    from .pipeline import PIPELINE_DTYPES

    parser.add_argument("--device", default="cpu",
                        help="where the pipeline runs: cpu, cuda or cuda:N; layers select backends for it "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=list(PIPELINE_DTYPES),
                        help="weights and activations (default: %(default)s)")


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


def cmd_run(ns: argparse.Namespace, out: TextIO) -> int:
    from .pipeline import DenoisingStage
    from .png import write_png

    output = Path(ns.output)
    if not output.parent.is_dir():
        raise UsageError(f"argument --output: directory {str(output.parent)!r} does not exist")
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

    image = pipeline(ns.prompt, steps=ns.steps, seed=ns.seed, progress=progress, sequence_parallel=sp)
    if sp is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
        if sp.rank != 0:
            return 0
    path = write_png(ns.output, image)
    print("components:", file=out)
    for line in _component_lines(pipeline, with_times=True):
        print(line, file=out)
    backend = DenoisingStage._infer_transformer_attention_backend(pipeline.modules["transformer"])
    print(f"transformer attention backend: {backend}", file=out)
    print(f"wrote {path} ({image.shape[-1]}x{image.shape[-2]} RGB PNG) in {time.perf_counter() - start:.2f}s total",
          file=out, flush=True)
    return 0


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


COMMANDS = {"run": cmd_run, "backends": cmd_backends, "explain": cmd_explain}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `attnsel` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        try:
            ns = parser.parse_args(argv)
        except UsageError as err:
            raise UsageError(_abbreviation_hint(parser, argv, str(err))) from None
        except ValueError as err:  # the config's flag rewriter reports through ValueError
            raise UsageError(str(err)) from None
        return COMMANDS[ns.command](ns, sys.stdout)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ValueError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
