"""The component loader, the composed pipeline and the embedded tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnsel
from attnsel import _C, Backend, component_attention_backend, force_attention_backend
from attnsel.config import AttentionConfig, get_config, set_config
from attnsel.loader import ComponentLoader, attention_layers
from attnsel.models import TinyDiT, TinyTextEncoder, TinyVAEDecoder
from attnsel.pipeline import ComposedPipeline, ComponentSpec, DenoisingStage




def cfg(backend=None, components=None) -> AttentionConfig:
    return AttentionConfig(attention_backend=backend, component_attention_backends=components)


class TinyAttnModule(nn.Module):
    """A user component with one attnsel attention layer; `backend` makes its choice explicit."""

    def __init__(self, backend=None):
        super().__init__()
        self.attn = attnsel.nn.Attention(1, 64, backend=backend)


# -- loader -----------------------------------------------------------------------------------------------------
def test_load_native_builds_in_component_scope():
    loader = ComponentLoader(cfg(components="vae=torch_sdpa"))
    vae = loader.load_native("vae")
    assert isinstance(vae, TinyVAEDecoder)
    layer = vae.mid_attn.attn
    assert layer.head_dim == 512
    assert layer.backend == Backend.TORCH_SDPA
    assert layer.selection.source == "component" and layer.selection.component == "vae"
    record = loader.records["vae"]
    assert record.kind == "native" and record.matched_key == "vae" and record.override_applied == 1
    # A component without override still builds inside a (named) scope; selection falls to auto.
    dit = loader.load_native("transformer", TinyDiT, depth=1)
    assert {l.selection.source for _, l in attention_layers(dit)} == {"auto"}
    assert {l.selection.component for _, l in attention_layers(dit)} == {"transformer"}


def test_load_customized_sees_component_context():
    seen = {}

    def factory(width):
        seen["name"] = attnsel.get_component_attn_backend_name()
        seen["backend"] = attnsel.get_component_forced_attn_backend()
        return TinyAttnModule()

    loader = ComponentLoader(cfg(components={"text-encoder": "torch_sdpa"}))
    module = loader.load_customized("text_encoder", factory, 3)
    assert seen == {"name": "text_encoder", "backend": Backend.TORCH_SDPA}
    assert module.attn.backend == Backend.TORCH_SDPA
    assert loader.records["text_encoder"].kind == "customized"
    assert attnsel.get_component_attn_backend_name() is None  # the scope ends with construction
    # "package.module:Class" strings name a factory too.
    vae = loader.load_customized("vae", "attnsel.models:TinyVAEDecoder")
    assert vae.mid_attn.attn.selection.source == "auto"


def test_loader_uses_global_config_unless_given_one():
    set_config(cfg(components="vae=torch_sdpa"))
    assert ComponentLoader().load_native("vae").mid_attn.attn.backend == Backend.TORCH_SDPA
    # An explicit config wins and its global backend applies only while loading.
    vae = ComponentLoader(cfg(backend="torch_sdpa")).load_native("vae")
    assert vae.mid_attn.attn.selection.source == "global"
    assert get_config().component_attention_backends == {"vae": "torch_sdpa"}
    assert _C.global_backend() is None


def test_loader_names_the_component_when_a_backend_cannot_run():
    with pytest.raises(ValueError, match=r"component 'vae'.*'fa'.*cannot run"):
        ComponentLoader(cfg(components="vae=fa3")).load_native("vae")


# -- pipeline: override checks ---------------------------------------------------------------------------------
def small_components(**extra):
    """User components that build fast: one attention layer each."""
    comps = {"text_encoder": TinyAttnModule, "transformer": TinyAttnModule, "vae": TinyAttnModule}
    comps.update(extra)
    return comps


def test_suffix_2_falls_back_through_the_pipeline():
    pipe = ComposedPipeline(["text_encoder", "text_encoder_2", "transformer", "vae"],
                            config=cfg(components="text-encoder=torch_sdpa"))
    modules = pipe.load_modules()
    for name in ("text_encoder", "text_encoder_2"):
        assert {l.backend for _, l in attention_layers(modules[name])} == {Backend.TORCH_SDPA}
        assert pipe.records[name].matched_key == "text_encoder"
    assert pipe.records["text_encoder_2"].describe_sources() == (
        "component 'text_encoder_2' via 'text_encoder' (text_encoder=torch_sdpa)")
    assert pipe.records["transformer"].source_counts == {"auto": 8}
    # The second encoder is a model of its own (seeded by its name), not a clone of the first.
    w1, w2 = (modules[n].token_embedding.weight for n in ("text_encoder", "text_encoder_2"))
    assert w1.shape == w2.shape and not torch.equal(w1, w2)
    image = pipe("two encoders", steps=1, seed=0)  # both encoders' tokens reach the transformer
    assert image.shape == (1, 3, 64, 64)


def test_own_key_wins_over_the_suffix_fallback():
    pipe = ComposedPipeline(small_components(text_encoder_2=TinyAttnModule),
                            config=cfg(components="text_encoder=torch_sdpa,text_encoder_2=native"))
    pipe.load_modules()
    assert pipe.records["text_encoder_2"].matched_key == "text_encoder_2"
    assert pipe.modules["text_encoder_2"].attn.backend == Backend.NATIVE


def test_unknown_component_override_suggests_a_name():
    pipe = ComposedPipeline(small_components(), config=cfg(components="vea=torch_sdpa"))
    with pytest.raises(ValueError, match=r"'vea' names no component.*did you mean 'vae'\?"):
        pipe.load_modules()
    with pytest.raises(ValueError, match=r"did you mean 'transformer'\?"):
        ComposedPipeline(small_components(), config=cfg(components="transfomer=native")).load_modules()
    with pytest.raises(ValueError, match=r"'zzz' names no component[^?]*$"):
        ComposedPipeline(small_components(), config=cfg(components="zzz=native")).load_modules()


def test_override_on_a_component_without_attention_is_an_error():
    pipe = ComposedPipeline(small_components(text_encoder_2=nn.Identity),
                            config=cfg(components="text_encoder_2=torch_sdpa"))
    with pytest.raises(ValueError, match=r"text_encoder_2=torch_sdpa was applied to no attention layer.*no attnsel"):
        pipe.load_modules()
    # ...unless the override says exactly that.
    ok = ComposedPipeline(small_components(text_encoder_2=nn.Identity),
                          config=cfg(components="text_encoder_2=no_attention"))
    ok.load_modules()
    assert ok.records["text_encoder_2"].layers == []


def test_override_outranked_by_forced_or_explicit_is_an_error():
    with force_attention_backend("native"):
        pipe = ComposedPipeline(small_components(), config=cfg(components="vae=torch_sdpa"))
        with pytest.raises(ValueError, match=r"vae=torch_sdpa was applied to no attention layer.*forced: 1"):
            pipe.load_modules()
    explicit = {"vae": ComponentSpec(TinyAttnModule, kwargs={"backend": "native"})}
    pipe = ComposedPipeline(small_components(**explicit), config=cfg(components="vae=torch_sdpa"))
    with pytest.raises(ValueError, match=r"higher priority level \(explicit: 1\)"):
        pipe.load_modules()


def test_override_applied_to_some_layers_is_fine():
    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = attnsel.nn.Attention(1, 64, backend="native")
            self.b = attnsel.nn.Attention(1, 64)

    pipe = ComposedPipeline(small_components(vae=Half), config=cfg(components="vae=torch_sdpa"))
    pipe.load_modules()
    assert pipe.records["vae"].source_counts == {"explicit": 1, "component": 1}
    assert "explicit (layer argument) x1" in pipe.records["vae"].describe_sources()


# -- pipeline: priority levels ---------------------------------------------------------------------------------
def sources(pipe, name):
    return {(layer.backend, layer.selection.source) for _, layer in pipe.records[name].layers}


def test_priority_levels_through_the_pipeline():
    pipe = ComposedPipeline(small_components(), config=cfg("torch_sdpa", "vae=native"))
    pipe.load_modules()
    assert sources(pipe, "text_encoder") == {(Backend.TORCH_SDPA, "global")}
    assert sources(pipe, "vae") == {(Backend.NATIVE, "component")}

    set_config(cfg("native"))  # the global config, with no pipeline config
    with force_attention_backend("torch_sdpa"):
        pipe = ComposedPipeline(small_components())
        pipe.load_modules()
    for name in ("text_encoder", "transformer", "vae"):
        assert sources(pipe, name) == {(Backend.TORCH_SDPA, "forced")}
        assert pipe.records[name].describe_sources() == "forced (force_attention_backend)"

    set_config(None)
    pipe = ComposedPipeline(small_components())
    pipe.load_modules()
    assert sources(pipe, "transformer") == {(Backend.NATIVE, "auto")}


def test_component_scope_from_outside_does_not_leak_into_loading():
    with component_attention_backend("outer", "torch_sdpa"):
        pipe = ComposedPipeline(small_components())
        pipe.load_modules()
    assert {l.selection.component for r in pipe.records.values() for _, l in r.layers} == {
        "text_encoder", "transformer", "vae"}
    assert sources(pipe, "vae") == {(Backend.NATIVE, "auto")}


# -- denoising stage -------------------------------------------------------------------------------------------
def test_infer_transformer_attention_backend_single_and_mixed():
    with component_attention_backend("transformer", "torch_sdpa"):
        dit = TinyDiT(depth=2)
    assert DenoisingStage._infer_transformer_attention_backend(dit) == Backend.TORCH_SDPA
    assert DenoisingStage(dit, steps=1).attention_backend == Backend.TORCH_SDPA

    dit.blocks[0].self_attn.attn = attnsel.nn.Attention(2, 64, backend="native")
    mixed = DenoisingStage._infer_transformer_attention_backend(dit)
    assert mixed == "mixed: torch_sdpa (3 layers), native (1 layer)"
    assert DenoisingStage._infer_transformer_attention_backend(nn.Linear(2, 2)) is None


# -- running ---------------------------------------------------------------------------------------------------
def test_models_have_the_specified_head_dims():
    te, dit, vae = TinyTextEncoder(), TinyDiT(), TinyVAEDecoder()
    assert {l.head_dim for _, l in attention_layers(te)} == {64}
    assert {l.head_dim for _, l in attention_layers(dit)} == {64}
    assert [(l.num_heads, l.head_dim) for _, l in attention_layers(vae)] == [(1, 512)]
    assert len(attention_layers(dit)) == 8  # 4 blocks x (self + cross)
    # Seeded: the same weights every time, independent of the global RNG.
    torch.manual_seed(123)
    again = TinyDiT()
    assert all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), again.state_dict().values()))


def test_run_is_deterministic_and_depends_on_prompt_and_seed():
    pipe = ComposedPipeline()
    calls = []
    a = pipe("a red fox", steps=2, seed=7, progress=lambda *args: calls.append(args[:3]))
    b = pipe("a red fox", steps=2, seed=7)
    assert calls == [("text_encoder", 1, 1), ("denoise", 1, 2), ("denoise", 2, 2), ("vae", 1, 1)]
    assert a.shape == (1, 3, 64, 64) and a.abs().max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, pipe("a red fox", steps=2, seed=8))
    assert not torch.equal(a, pipe("a blue fox", steps=2, seed=7))
    assert all(r.run_seconds > 0 and r.load_seconds > 0 for r in pipe.records.values())
    report = {row["component"]: row for row in pipe.report()}
    assert report["vae"]["backends"] == {"native": 1} and report["vae"]["why"] == "auto"


def test_native_and_torch_sdpa_give_close_images():
    native = ComposedPipeline(config=cfg("native"))("a lighthouse", steps=2, seed=3)
    sdpa_pipe = ComposedPipeline(config=cfg("torch_sdpa"))
    sdpa = sdpa_pipe("a lighthouse", steps=2, seed=3)
    assert {b for r in sdpa_pipe.records.values() for b in r.backend_counts} == {Backend.TORCH_SDPA}
    torch.testing.assert_close(native, sdpa, atol=2e-4, rtol=0)


def test_layers_select_for_the_pipeline_dtype_and_device(monkeypatch):
    import attnsel.nn

    seen = []
    real = attnsel.nn.explain_attn_backend

    def spy(head_dim, dtype, device, *args):
        seen.append((dtype, str(device)))
        return real(head_dim, dtype, device, *args)

    monkeypatch.setattr(attnsel.nn, "explain_attn_backend", spy)
    pipe = ComposedPipeline(dtype=torch.bfloat16)
    modules = pipe.load_modules()
    assert len(seen) == 11 and set(seen) == {(torch.bfloat16, "cpu")}  # 2 + 8 + 1 layers, all built for bf16
    assert {p.dtype for m in modules.values() for p in m.parameters()} == {torch.bfloat16}
    # The text encoder and the transformer run in bf16 (the VAE's bf16 convolutions are slow on CPUs without
    # bf16 instructions; the GPU test runs the whole pipeline).
    with torch.no_grad():  # inference, as the pipeline runs it
        context = modules["text_encoder"]("a red fox")
        assert context.dtype == torch.bfloat16
        latent = torch.randn(1, 4, 16, 16).to(torch.bfloat16)
        v = modules["transformer"](latent, torch.tensor([500.0]), context)
    assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()
    # Same weights as the float32 build, rounded: the seed does not depend on the dtype.
    ref = ComposedPipeline().load_modules()
    w, w32 = modules["transformer"].proj_out.weight, ref["transformer"].proj_out.weight
    assert torch.equal(w, w32.to(torch.bfloat16))


@pytest.mark.parametrize("device, dtype, match", [
    ("tpu", torch.float32, "not a torch device"),
    ("meta", torch.float32, "runs on cpu or cuda"),
    ("cpu", torch.int8, "valid: float32, bfloat16, float16"),
])
def test_bad_placement_is_a_value_error(device, dtype, match):
    with pytest.raises(ValueError, match=match):
        ComposedPipeline(device=device, dtype=dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pipeline_on_cuda(dtype):
    pipe = ComposedPipeline(device="cuda", dtype=dtype)
    image = pipe("a lighthouse", steps=2, seed=3)
    assert image.device.type == "cpu" and image.dtype == torch.float32 and torch.isfinite(image).all()
    ref = ComposedPipeline()("a lighthouse", steps=2, seed=3)  # float32 on the CPU
    assert (image - ref).abs().mean() < 0.05, (image - ref).abs().mean()
    report = {row["component"]: row for row in pipe.report()}
    # head_dim 512 goes to our kernel first where the GPU has the shared memory for it, else to PyTorch SDPA.
    assert set(report["vae"]["backends"]) <= {"native", "torch_sdpa"}
    assert report["transformer"]["why"] == "auto"
