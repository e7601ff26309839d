"""attnsel.trace(): what ran, per component, role and backend; nesting, threads, and no cost when closed."""

from __future__ import annotations

import threading

import pytest
import torch

import attnsel
from attnsel import tracing
from attnsel.cli import main


def qkv(batch=1, heads=2, length=5, head_dim=16, device="cpu"):
    return [torch.randn(batch, heads, length, head_dim, device=device) for _ in range(3)]


def test_records_component_backend_shapes_and_time():
    with attnsel.component_attention_backend("vae", "torch_sdpa"):
        layer = attnsel.nn.Attention(2, 16)
    q, k, v = qkv()
    with attnsel.trace() as t:
        out = layer(q, k, v)
        layer(q, k, v, is_causal=True)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    first, second = t.records
    assert (first.component, first.backend, first.q_shape, first.dtype, first.device) == (
        "vae", "torch_sdpa", (1, 2, 5, 16), "float32", "cpu")
    assert (first.causal, second.causal, first.masked) == (False, True, False)
    assert first.milliseconds > 0
    assert t.rows() == [{"component": "vae", "role": None, "backend": "torch_sdpa", "calls": 2,
                         "total_ms": pytest.approx(first.milliseconds + second.milliseconds)}]


def test_records_the_layer_role():
    with attnsel.component_attention_backend("transformer", "native", roles={"cross": "torch_sdpa"}):
        cross = attnsel.nn.Attention(2, 16, role="cross")
        self_attn = attnsel.nn.Attention(2, 16, role="self")
    with attnsel.trace() as t:
        cross(*qkv())
        self_attn(*qkv())
    assert [(r["component"], r["role"], r["backend"]) for r in t.rows()] == [
        ("transformer", "cross", "torch_sdpa"), ("transformer", "self", "native")]


def test_automatic_selection_records_the_backend_that_ran():
    layer = attnsel.nn.Attention(2, 16)  # no component, no flag: automatic, planned per call
    q, k, v = qkv()
    with attnsel.trace() as t:
        layer(q, k, v)
    assert layer.policy is None
    assert [r.backend for r in t.records] == [str(attnsel.explain_call(q, k, v).backend)]
    assert t.records[0].component is None


def test_summary_table():
    with attnsel.component_attention_backend("text_encoder", "native"):
        layer = attnsel.nn.Attention(2, 16)
    with attnsel.trace() as t:
        assert t.summary() == "attention calls: none recorded"
        for _ in range(3):
            layer(*qkv())
    lines = t.summary().splitlines()
    assert lines[0] == "attention calls:"
    assert lines[1].split() == ["component", "role", "backend", "calls", "total", "ms"]
    assert lines[2].split()[:4] == ["text_encoder", "-", "native", "3"]
    assert str(t) == t.summary()


def test_nested_traces_both_record_and_closing_restores():
    layer = attnsel.nn.Attention(2, 16, backend="native")
    assert tracing.ACTIVE == ()
    with attnsel.trace() as outer:
        layer(*qkv())
        with attnsel.trace() as inner:
            layer(*qkv())
        assert tracing.ACTIVE == (outer,)
        layer(*qkv())
    assert tracing.ACTIVE == ()
    layer(*qkv())  # no trace open: recorded nowhere
    assert (len(outer.records), len(inner.records)) == (3, 1)
    assert inner.records[0] is outer.records[1]


def test_a_trace_cannot_be_opened_twice_and_closes_on_errors():
    t = attnsel.trace()
    with pytest.raises(RuntimeError, match="boom"):
        with t:
            with pytest.raises(ValueError, match="already open"):
                t.__enter__()
            raise RuntimeError("boom")
    assert tracing.ACTIVE == ()


def test_calls_from_every_thread_are_recorded():
    with attnsel.component_attention_backend("transformer", "native"):
        layer = attnsel.nn.Attention(2, 16)
    inputs = qkv()
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(25):
            layer(*inputs)

    with attnsel.trace() as t:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert t.rows()[0]["calls"] == 100 and len(t.records) == 100


def test_run_prints_the_trace_of_the_embedded_pipeline(tmp_path, capsys):
    assert main(["run", "--steps", "1", "--output", str(tmp_path / "o.png"),
                 "--component-attention-backends", "vae=torch_sdpa"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    table = lines[lines.index("attention calls:") + 2:]
    backends = {line.split()[0]: line.split()[2] for line in table if line.startswith("  ")}
    assert backends["vae"] == "torch_sdpa"
    assert {"text_encoder", "transformer", "vae"} <= set(backends)


def test_cuda_calls_are_timed_with_events():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    layer = attnsel.nn.Attention(2, 64, dtype=torch.bfloat16, device="cuda", backend="torch_sdpa")
    q, k, v = (x.to(torch.bfloat16) for x in qkv(head_dim=64, device="cuda"))
    with attnsel.trace() as t:
        layer(q, k, v)
    assert t.records[0].device.startswith("cuda") and t.records[0].milliseconds > 0
