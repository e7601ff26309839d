"""The `attnsel` command: run / backends / explain, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import attnsel
from attnsel import _C, backend_aliases, backend_names
from attnsel.cli import main
from attnsel.config import AttentionConfig, get_config, set_config





def read_png(path: Path) -> tuple[int, int, bytes]:
    """(width, height, raw scanlines) of an 8-bit RGB PNG, checking every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(chunks[1][1])
    assert len(raw) == height * (1 + width * 3)
    return width, height, raw


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def component_line(out: str, name: str) -> str:
    (line,) = [l for l in out.splitlines() if l.startswith("  ") and l.split()[0] == name and "backend:" in l]
    return line


# -- run --------------------------------------------------------------------------------------------------------
def test_run_writes_png_and_reports_components(tmp_path, capsys):
    target = tmp_path / "fox.png"
    code, out, err = run_main(capsys, "run", "--prompt", "a red fox", "--steps", "2", "--seed", "5",
                              "--output", str(target), "--component-attention-backends.vae=torch_sdpa")
    assert (code, err) == (0, "")
    width, height, raw = read_png(target)
    assert (width, height) == (64, 64)
    assert len(set(raw)) > 16  # an image, not a constant fill
    assert "[denoising step 1/2]" in out and "[denoising step 2/2]" in out
    te = component_line(out, "text_encoder")
    assert "backend: native (2 layers)" in te and "chosen by: auto" in te and "time: load" in te
    vae = component_line(out, "vae")
    assert "backend: torch_sdpa (1 layer)" in vae and "chosen by: component 'vae' (vae=torch_sdpa)" in vae
    assert "transformer attention backend: native" in out
    assert f"wrote {target}" in out
    # The run's config does not outlive the command.
    assert get_config() == AttentionConfig() and _C.global_backend() is None


def test_run_is_reproducible(tmp_path, capsys):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, ("1", "1", "2")):
        assert run_main(capsys, "run", "--steps", "1", "--seed", seed, "--output", str(path))[0] == 0
    assert paths[0].read_bytes() == paths[1].read_bytes() != paths[2].read_bytes()


# -- backends / explain -----------------------------------------------------------------------------------------
def test_backends_lists_every_name_and_alias(capsys):
    code, out, err = run_main(capsys, "backends")
    assert (code, err) == (0, "")
    listed = [l.split()[0] for l in out.splitlines()[1:] if l and not l.startswith(" ") and not l.startswith("aliases")]
    assert listed == backend_names()
    for alias, target in backend_aliases().items():
        assert f"{alias} -> {target}" in out
    assert "head_size 64" in out
    lines = out.splitlines()
    native = lines.index("native")
    assert lines[native + 1].split() == ["cpu", "available"]
    fa = next(i for i, l in enumerate(lines) if l.startswith("fa (aliases: fa3, fa4)"))
    assert lines[fa + 1].strip().startswith("cpu  not available: ")


def test_explain_shows_the_level_per_component(capsys):
    code, out, err = run_main(capsys, "explain", "--attention-backend", "torch_sdpa",
                              "--component-attention-backends", json.dumps({"vae": "native"}), "--reasons")
    assert (code, err) == (0, "")
    assert "chosen by: global (--attention-backend)" in component_line(out, "text_encoder")
    assert "backend: torch_sdpa (8 layers); chosen by: global" in component_line(out, "transformer")
    assert "backend: native (1 layer); chosen by: component 'vae' (vae=native)" in component_line(out, "vae")
    assert "- native: set for component 'vae'" in out
    assert "denoising" not in out  # explain builds the layers, it does not run them


def test_explain_reads_a_config_file(tmp_path, capsys):
    path = tmp_path / "attn.toml"
    path.write_text('[component_attention_backends]\ntext-encoder = "torch_sdpa"\n')
    code, out, _ = run_main(capsys, "explain", "--config", str(path))
    assert code == 0
    assert "chosen by: component 'text_encoder' (text_encoder=torch_sdpa)" in component_line(out, "text_encoder")
    assert "chosen by: auto" in component_line(out, "vae")


# -- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["run", "--attention-backend", "bogus"], "unknown attention backend 'bogus'"),
    (["explain", "--component-attention-backends", "vae=nope"], "unknown attention backend 'nope'"),
    (["run", "--component-attention-backends", "vea=torch_sdpa"], "did you mean 'vae'?"),
    (["explain", "--component-attention-backends.text-encoders", "native"], "did you mean 'text_encoder'?"),
    (["run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["run", "--prom", "x"], "abbreviated option --prom is not accepted; write it in full: --prompt"),
    (["explain", "--attention", "fa"], "write it in full: --attention-backend"),
    (["run", "--attention-backend", "fa3"], "component 'text_encoder': backend 'fa' (set by --attention-backend) "
                                            "cannot run"),
    (["explain", "--component-attention-backends.vae=fa3"], "component 'vae': backend 'fa'"),
    (["run", "--steps", "0"], "--steps: expected a positive integer"),
    (["frob"], "invalid choice: 'frob'"),
    (["run", "--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
    (["explain", "--device", "tpu"], "device 'tpu' is not a torch device; valid: cpu, cuda, cuda:N"),
    (["run", "--device", "meta"], "device 'meta': the pipeline runs on cpu or cuda"),
    ([], "required"),
])
def test_errors_exit_2_with_one_line(argv, needle, capsys, tmp_path):
    if argv[:1] == ["run"]:
        argv = argv + ["--output", str(tmp_path / "x.png")]
    code, _, err = run_main(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("attnsel: error: ")
    assert needle in err
    assert not (tmp_path / "x.png").exists()


# Issue 13's cases: deep nesting in values and files, non-string argv items, odd numbers: exit 2, one line.
@pytest.mark.parametrize("kind", ["value", "json_file", "toml_file", "toml_table_file"])
def test_deep_nesting_exits_2_with_one_line(kind, capsys, tmp_path):
    deep = "[" * 1200
    if kind == "value":
        argv = ["explain", "--component-attention-backends", deep]
    else:
        name, text = {"json_file": ("d.json", deep),
                      "toml_file": ("d.toml", "d=" + deep),
                      "toml_table_file": ("t.toml", "component_attention_backends = " + "{a=" * 1200)}[kind]
        (tmp_path / name).write_text(text)
        argv = ["explain", "--config", str(tmp_path / name)]
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "nested too deeply" in err


@pytest.mark.parametrize("argv, needle", [
    ([None], "argv[0] must be a string, got NoneType"),
    (["explain", 3], "argv[1] must be a string, got int"),
    (["run", "--seed", str(2 ** 64)], "--seed: expected an integer that fits 64 bits"),
    (["run", "--seed", "x"], "--seed: expected an integer that fits 64 bits, got 'x'"),
    (["explain", "--component-attention-backends.transformer.middle", "native"],
     "role 'middle' not in ['cross', 'self']"),
    (["explain", "--config", "/dev/zero"], "larger than"),
    (["explain", "--config", "nul\0byte.toml"], "cannot read"),
])
def test_odd_arguments_exit_2_with_one_line(argv, needle, capsys, tmp_path):
    if argv[:1] == ["run"]:
        argv = argv + ["--output", str(tmp_path / "x.png")]
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("attnsel: error: ")
    assert needle in err
    assert not (tmp_path / "x.png").exists()


def test_seed_range_is_torchs(tmp_path, capsys):
    from attnsel.cli import _seed

    assert _seed(str(-(2 ** 63))) == -(2 ** 63) and _seed("-1") == -1
    torch.Generator().manual_seed(-(2 ** 63))  # the lower end is torch's too
    argv = ["run", "--steps", "1", "--seed", str(2 ** 64 - 1), "--output", str(tmp_path / "x.png")]
    assert run_main(capsys, *argv)[0] == 0


def test_underscore_and_role_flags_reach_the_layers(capsys):
    code, out, err = run_main(capsys, "explain", "--attention_backend", "torch_sdpa",
                              "--component_attention_backends.vae", "native")
    assert (code, err) == (0, "")
    assert "chosen by: global (--attention-backend)" in component_line(out, "transformer")
    assert "backend: native (1 layer); chosen by: component 'vae' (vae=native)" in component_line(out, "vae")


def test_help_exits_0(capsys):
    code, out, err = run_main(capsys, "run", "--help")
    assert code == 0 and "--component-attention-backends" in out and "--prompt" in out


# -- python -m attnsel -----------------------------------------------------------------------------------------
def module_cmd(*argv, cwd):
    # Import the same attnsel these tests use (installed, or built in place), never a source tree without _C.
    env = {**os.environ, "PYTHONPATH": str(Path(attnsel.__file__).resolve().parents[1])}
    env.pop("ATTNSEL_ATTENTION_BACKEND", None)
    env.pop("ATTNSEL_COMPONENT_ATTENTION_BACKENDS", None)
    return subprocess.run([sys.executable, "-m", "attnsel", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_python_dash_m_runs(tmp_path):
    proc = module_cmd("run", "--prompt", "hi", "--steps", "2", "--output", "o.png",
                      "--component-attention-backends", "text-encoder=torch_sdpa,transformer=native", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_png(tmp_path / "o.png")[:2] == (64, 64)
    assert "chosen by: component 'transformer' (transformer=native)" in proc.stdout


def test_python_dash_m_error_is_one_line(tmp_path):
    proc = module_cmd("run", "--attention-backend", "fa3", "--output", "o.png", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot run" in proc.stderr
    assert not (tmp_path / "o.png").exists()


def test_device_cuda_without_a_gpu_says_why(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_main(capsys, "run", "--device", "cuda", "--output", str(tmp_path / "x.png"))
    why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
    assert code == 2 and err.count("\n") == 1 and f"device 'cuda': {why}" in err


def test_explain_reports_device_and_dtype(capsys):
    code, out, _ = run_main(capsys, "explain", "--dtype", "bfloat16", "--component-attention-backends.vae",
                            "torch_sdpa")
    assert code == 0
    assert "device=cpu dtype=bfloat16" in out.splitlines()[0]
    assert "vae           backend: torch_sdpa (1 layer); chosen by: component" in out
