"""attnsel.diffusers and `attnsel run --model` on tiny real diffusers pipelines (random weights, no network).

The pipelines (tests/tiny_pipelines.py) are built once per session, saved with save_pretrained and loaded back from
the folder, like a downloaded snapshot. Each run compares with diffusers' own attention and checks in the trace that
every component and role ran on the backend asked for.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

if os.environ.get("CI"):  # CI installs the extra: a missing package there is a failure, not a skip
    import diffusers
    import transformers
else:
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")

import tiny_pipelines  # noqa: E402

import attnsel  # noqa: E402
from attnsel import diffusers as adapter  # noqa: E402
from attnsel import tuning  # noqa: E402
from attnsel.cli import main  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()

# Per pipeline: the call's arguments (tiny sizes), a backend choice per component and role, and what the trace must
# then show: exactly these (component, role, backend) rows.
CASES = {
    "flux": (dict(height=16, width=16, max_sequence_length=16),
             "text-encoder=torch_sdpa,transformer.self=native,vae=native",
             {("text_encoder", "self", "torch_sdpa"), ("text_encoder_2", "self", "torch_sdpa"),
              ("transformer", "self", "native"), ("vae", "self", "native")}),
    "sd": (dict(height=16, width=16),
           "unet.self=native,unet.cross=torch_sdpa,text_encoder=native,vae=torch_sdpa",
           {("text_encoder", "self", "native"), ("unet", "self", "native"), ("unet", "cross", "torch_sdpa"),
            ("vae", "self", "torch_sdpa")}),
    "wan": (dict(height=16, width=16, num_frames=5, max_sequence_length=16),
            "transformer.self=torch_sdpa,transformer.cross=native,text_encoder=torch_sdpa,vae=native",
            {("text_encoder", "self", "torch_sdpa"), ("transformer", "self", "torch_sdpa"),
             ("transformer", "cross", "native"), ("vae", "self", "native")}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    paths = {}
    for name in CASES:
        paths[name] = root / name
        tiny_pipelines.BUILDERS[name]().save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def pipes(folders):
    loaded = {}
    for name, path in folders.items():
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        loaded[name] = pipe
    return loaded


def run(pipe, name: str) -> torch.Tensor:
    result = pipe("a red fox", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt",
                  **CASES[name][0])
    return result.frames if hasattr(result, "frames") else result.images


def config(value: str) -> attnsel.AttentionConfig:
    return attnsel.AttentionConfig.from_cli(["--component-attention-backends", value])


@pytest.mark.parametrize("name", list(CASES))
def test_each_component_and_role_runs_on_its_backend_and_remove_restores(pipes, name):
    pipe = pipes[name]
    reference = run(pipe, name)  # diffusers' and transformers' own attention
    report = adapter.apply(pipe, config(CASES[name][1]))
    try:
        expected = CASES[name][2]
        assert {(r["component"], r["role"], r["backend"]) for r in report.rows()} == expected
        with attnsel.trace() as calls:
            out = run(pipe, name)
    finally:
        adapter.remove(pipe)
    assert {(r["component"], r["role"], r["backend"]) for r in calls.rows()} == expected
    assert all(r["calls"] > 0 and r["total_ms"] > 0 for r in calls.rows())
    # Every layer of the denoiser ran (each step calls every layer once, twice with classifier-free guidance).
    denoiser = "unet" if name == "sd" else "transformer"
    layers = sum(1 for layer in report.layers if layer.component == denoiser)
    assert sum(r["calls"] for r in calls.rows() if r["component"] == denoiser) % layers == 0
    torch.testing.assert_close(out, reference, atol=2e-4, rtol=0)
    assert not torch.equal(reference, torch.zeros_like(reference))
    assert torch.equal(run(pipe, name), reference)  # removed: diffusers' own attention, bit for bit


def test_sd_report_lists_layers_per_role(pipes):
    report = adapter.apply(pipes["sd"], config("unet.cross=torch_sdpa"))
    adapter.remove(pipes["sd"])
    rows = {(r["component"], r["role"]): r for r in report.rows()}
    assert rows[("unet", "cross")]["backend"] == "torch_sdpa" and rows[("unet", "cross")]["source"] == "unet.cross"
    assert rows[("unet", "self")]["backend"] == "auto" and rows[("unet", "self")]["source"] == "auto"
    assert rows[("unet", "self")]["layers"] == rows[("unet", "cross")]["layers"] == 4  # attn1 and attn2 per block
    assert rows[("vae", "self")]["layers"] == 2  # the encoder's and the decoder's mid-block attention
    names = [layer.name for layer in report.layers if layer.component == "unet" and layer.role == "cross"]
    assert names and all(n.endswith("attn2") for n in names)
    assert "unet" in str(report) and "cross" in str(report)


def test_global_backend_applies_where_no_component_key_does(pipes):
    cfg = attnsel.AttentionConfig.from_cli(["--attention-backend", "torch_sdpa",
                                            "--component-attention-backends", "transformer=native"])
    report = adapter.apply(pipes["flux"], cfg)
    try:
        with attnsel.trace() as calls:
            run(pipes["flux"], "flux")
    finally:
        adapter.remove(pipes["flux"])
    backends = {r["component"]: r["backend"] for r in calls.rows()}
    assert backends == {"text_encoder": "torch_sdpa", "text_encoder_2": "torch_sdpa", "transformer": "native",
                        "vae": "torch_sdpa"}
    assert {r["source"] for r in report.rows() if r["component"] == "vae"} == {"--attention-backend"}


@pytest.mark.parametrize("value, needles", [
    ("transfomer=native", ["'transfomer' matches no component of this pipeline; did you mean 'transformer'?"]),
    ("text-encdoer=native", ["did you mean 'text_encoder'?"]),
    ("scheduler=native", ["'scheduler' matches no component"]),
    ("transformer.cross=native", ["transformer has no cross-attention layers (roles found: ['self'])"]),
    ("transformer.crosss=native", ["'crosss'", "['cross', 'self']"]),  # refused when parsed, or else by apply
])
def test_keys_that_match_nothing_are_errors(pipes, value, needles):
    with pytest.raises(ValueError, match=".*".join(map(re.escape, needles))):
        adapter.apply(pipes["flux"], config(value))
    adapter.apply(pipes["flux"], config("transformer=native"))  # nothing was left applied: this is no "twice"
    adapter.remove(pipes["flux"])


def test_apply_twice_is_an_error_and_remove_is_idempotent(pipes):
    adapter.apply(pipes["sd"])
    try:
        with pytest.raises(ValueError, match="already set up"):
            adapter.apply(pipes["sd"])
    finally:
        adapter.remove(pipes["sd"])
    adapter.remove(pipes["sd"])
    assert pipes["sd"].text_encoder.config._attn_implementation == "sdpa"


def test_remove_restores_diffusers_dispatch_backend(pipes):
    transformer = pipes["flux"].transformer
    processors = [m.processor for m in transformer.modules() if hasattr(m, "processor")]
    before = [p._attention_backend for p in processors]
    adapter.apply(pipes["flux"])
    assert all(p._attention_backend == "native" for p in processors)
    adapter.remove(pipes["flux"])
    assert [p._attention_backend for p in processors] == before


# -- the command line -----------------------------------------------------------------------------------------------

def trace_rows(text: str) -> set[tuple[str, str, str]]:
    lines = text.splitlines()
    start = lines.index("attention calls:") + 2  # after the header line
    rows = set()
    for line in lines[start:]:
        parts = line.split()
        if len(parts) != 5 or not line.startswith("  "):
            break
        rows.add(tuple(parts[:3]))
    return rows


def test_cli_done_when_flux(folders, tmp_path, capsys):
    out = tmp_path / "flux.png"
    rc = main(["run", "--model", str(folders["flux"]), "--steps", "1", "--height", "16", "--width", "16",
               "--output", str(out), "--component-attention-backends",
               "text-encoder=torch_sdpa,transformer.self=native,vae=torch_sdpa"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert trace_rows(captured.out) == {("text_encoder", "self", "torch_sdpa"), ("text_encoder_2", "self", "torch_sdpa"),
                                        ("transformer", "self", "native"), ("vae", "self", "torch_sdpa")}
    assert f"wrote {out} (16x16 PNG)" in captured.out


def test_cli_video_pipeline_writes_an_animated_gif(folders, tmp_path, capsys):
    from PIL import Image

    shapes = tmp_path / "shapes.json"
    rc = main(["run", "--model", str(folders["wan"]), "--steps", "1", "--height", "16", "--width", "16",
               "--frames", "5", "--output", str(tmp_path / "wan.png"), "--attention-backend", "native",
               "--record-shapes", str(shapes)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert shapes.is_file() and "attention call shapes to" in captured.out
    recorded = tuning.read_shapes(shapes)  # each call with the component and role of the layer that made it
    assert {(s.component, s.role) for s in recorded} == {("text_encoder", "self"), ("transformer", "self"),
                                                         ("transformer", "cross"), ("vae", "self")}
    with Image.open(tmp_path / "wan.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (16, 16)
    assert {backend for _, _, backend in trace_rows(captured.out)} == {"native"}
    assert {(c, r) for c, r, _ in trace_rows(captured.out)} == {("text_encoder", "self"), ("transformer", "self"),
                                                                ("transformer", "cross"), ("vae", "self")}


@pytest.mark.parametrize("model, extra, needle", [
    ("black-forest-labs/FLUX.1-dev", [], "is not a local folder"),
    ("{tmp}/missing", [], "is not a local folder"),
    ("{tmp}", [], "has no model_index.json"),
    ("{flux}", ["--component-attention-backends", "vea=native"], "did you mean 'vae'?"),
    ("{flux}", ["--frames", "3"], "argument --frames: FluxPipeline takes no num_frames"),
    ("{flux}", ["--component-attention-backends", "transformer=sdpa_flash"],
     "transformer (self): backend 'sdpa_flash' (chosen explicitly by the caller) cannot run head_size=16"),
    ("{flux}", ["--attention-backend", "fa"], "(self): backend 'fa' (chosen explicitly by the caller) cannot run"),
])
def test_cli_model_errors_exit_2_with_one_line(folders, tmp_path, capsys, model, extra, needle):
    model = model.format(tmp=tmp_path, flux=folders["flux"])
    rc = main(["run", "--model", model, "--output", str(tmp_path / "x.png"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and err.count("\n") == 1 and err.startswith("attnsel: error: ")


def test_cli_size_flags_need_a_model(tmp_path, capsys):
    assert main(["run", "--height", "16", "--output", str(tmp_path / "x.png")]) == 2
    assert "--height/--width/--frames need --model" in capsys.readouterr().err


# -- masks, grouped-query heads, causal encoders, T5's position bias ------------------------------------------------

def _compare_with_sdpa(model, **inputs):
    model.eval()
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
        adapter.apply({"text_encoder": model}, config("text_encoder=native"))
        try:
            with attnsel.trace() as calls:
                out = model(**inputs).last_hidden_state
        finally:
            adapter.remove({"text_encoder": model})
        again = model(**inputs).last_hidden_state
    assert {r["backend"] for r in calls.rows()} == {"native"} and calls.records
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, reference)
    return calls


def _padded(batch: int, length: int, vocab: int, left: bool):
    ids = torch.randint(3, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    pad = slice(0, 3) if left else slice(length - 3, length)
    mask[1, pad] = 0
    return ids, mask


@pytest.mark.parametrize("padded", [False, True])
def test_llama_grouped_query_causal_and_padding(padded):
    torch.manual_seed(0)
    model = transformers.LlamaModel(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=40))
    ids, mask = _padded(2, 11, 40, left=True)
    calls = _compare_with_sdpa(model, input_ids=ids, attention_mask=mask if padded else None)
    record = calls.records[0]
    assert record.q_shape == (2, 4, 11, 8) and record.k_shape == (2, 2, 11, 8)  # grouped-query, no repeat
    assert record.causal != padded and record.masked == padded  # a padding mask carries the causal part


def test_clip_causal_with_padding_mask():
    torch.manual_seed(0)
    model = tiny_pipelines.clip_text_model(vocab_size=40)
    ids, mask = _padded(2, 9, 40, left=False)
    calls = _compare_with_sdpa(model, input_ids=ids, attention_mask=mask)
    assert all(r.masked for r in calls.records)
    calls = _compare_with_sdpa(model, input_ids=ids)
    assert all(r.causal and not r.masked for r in calls.records)  # CLIP's text encoder is causal


@pytest.mark.parametrize("cls", ["T5EncoderModel", "UMT5EncoderModel"])
def test_t5_position_bias_with_padding_mask(cls):
    torch.manual_seed(0)
    config_cls = transformers.T5Config if cls == "T5EncoderModel" else transformers.UMT5Config
    model = getattr(transformers, cls)(config_cls(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                                  vocab_size=40, relative_attention_num_buckets=8))
    ids, mask = _padded(2, 10, 40, left=False)
    calls = _compare_with_sdpa(model, input_ids=ids, attention_mask=mask)
    assert all(r.masked and r.dtype == "float32" for r in calls.records)


def test_diffusers_attention_with_additive_mask_and_cross_role():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    x, context = torch.randn(2, 7, 32), torch.randn(2, 5, 24)
    mask = torch.zeros(2, 1, 5)
    mask[1, :, 3:] = -10000.0  # diffusers' additive padding mask
    with torch.no_grad():
        reference = attn(x, encoder_hidden_states=context, attention_mask=mask)
        report = adapter.apply({"unet": attn}, config("unet.cross=native"))
        try:
            with attnsel.trace() as calls:
                out = attn(x, encoder_hidden_states=context, attention_mask=mask)
        finally:
            adapter.remove({"unet": attn})
    assert [(layer.role, str(layer.backend)) for layer in report.layers] == [("cross", "native")]
    assert [(r.role, r.backend, r.masked, r.k_shape) for r in calls.records] == [("cross", "native", True,
                                                                                  (2, 2, 5, 16))]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_a_processor_that_bypasses_sdpa_is_an_error():
    from diffusers.models.attention_processor import Attention, AttnProcessor

    attn = Attention(query_dim=16, heads=2, dim_head=8, processor=AttnProcessor()).eval()  # baddbmm + softmax
    adapter.apply({"vae": attn})
    try:
        with pytest.raises(RuntimeError, match="ran no attention through attnsel: its processor AttnProcessor"):
            attn(torch.randn(1, 4, 16))
    finally:
        adapter.remove({"vae": attn})
    attn(torch.randn(1, 4, 16))  # hooks gone


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="expected a diffusers.DiffusionPipeline or a mapping"):
        adapter.apply(object())
    with pytest.raises(ValueError, match="mapping of component name -> torch module"):
        adapter.apply({"vae": "not a module"})


class _SdpaBlock(torch.nn.Module):
    """A block that calls SDPA in its own forward (like Wan's VAE attention): grouped-query heads, a mask, a scale."""

    def forward(self, q, k, v, mask=None, causal=False):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                                scale=0.3, enable_gqa=True)


@pytest.mark.parametrize("mask_kind", ["none", "bool_2d", "additive_4d", "causal", "no_batch"])
def test_sdpa_calls_carry_layout_masks_gqa_and_scale(mask_kind):
    torch.manual_seed(0)
    block = _SdpaBlock()
    q, k, v = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    args = {"none": (), "bool_2d": (torch.rand(7, 9) > 0.3,), "additive_4d": (torch.randn(2, 1, 7, 9),),
            "causal": (None, True), "no_batch": ()}[mask_kind]
    if mask_kind == "no_batch":
        q, k, v = q[0], k[0], v[0]
    reference = block(q, k, v, *args)
    adapter.apply({"vae": block}, config("vae=native"))
    try:
        with attnsel.trace() as calls:
            out = block(q, k, v, *args)
    finally:
        adapter.remove({"vae": block})
    assert [(r.component, r.role, r.backend) for r in calls.records] == [("vae", "self", "native")]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_output_attentions_is_refused():
    model = tiny_pipelines.clip_text_model(vocab_size=40).eval()
    adapter.apply({"text_encoder": model})
    try:
        with pytest.raises(ValueError, match="output_attentions are not supported"):
            model(input_ids=torch.randint(3, 40, (1, 5)), output_attentions=True)
    finally:
        adapter.remove({"text_encoder": model})
