"""The tuning table: file round trip, concurrent writers, corrupt / foreign files, unwritable cache, `auto` from
measurements, `attnsel tune`, `--record-shapes`, online tuning (ATTNSEL_AUTOTUNE=1)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import attnsel
from attnsel import _C, tuning
from attnsel.backends import Backend
from attnsel.cli import main
from attnsel.selection import call_signature, explain_call

TINY = tuning.Shape(1, 2, 33, 17, 16, "float32", name="tiny")
TINY_KP = tuning.Shape(2, 2, 24, 24, 16, "float32", mask="key_padding")


@pytest.fixture(autouse=True)
def isolated_table(tmp_path, monkeypatch):
    """Each test has its own cache dir, an empty planner table and fresh once-per-process warnings."""
    monkeypatch.setenv("ATTNSEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "_WARNED", set())
    monkeypatch.setattr(tuning, "_TRIED", set())

    def reset():
        _C.clear_tuning_table()
        tuning._ENTRIES.clear()
        tuning.set_autotune(False)

    reset()
    yield
    reset()


def python(args: list[str], env: dict, **kwargs):
    """Popen of this Python on the attnsel under test (installed or built in place), never a source checkout in the
    cwd without _C."""
    parent = str(Path(attnsel.__file__).resolve().parents[1])
    return subprocess.Popen([sys.executable, *args], env=dict(env, PYTHONPATH=parent), cwd=parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def cpu_path() -> Path:
    return tuning.table_path(tuning.device_identity("cpu"))


def entry_with(ms: dict[str, float], refused: dict[str, str] | None = None) -> dict:
    results = {name: {"ms": t} for name, t in ms.items()}
    results.update({name: {"refused": why} for name, why in (refused or {}).items()})
    return tuning._entry(TINY.to_json(), results)


def ran_sdpa(fn) -> bool:
    """Whether fn() reached PyTorch's SDPA (seen in the profiler's op events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any("scaled_dot_product" in e.name for e in prof.events())


# -- the file ---------------------------------------------------------------------------------------------------
def test_round_trip_through_the_file():
    bucket = TINY.signature().bucket()
    entry = entry_with({"native": 1.5, "torch_sdpa": 0.5}, {"sdpa_math": "not on cpu"})
    path = tuning.save("cpu", {bucket: entry})
    assert path == cpu_path() and path.parent == Path(os.environ["ATTNSEL_CACHE_DIR"])
    data = json.loads(path.read_text())
    assert data["schema"] == tuning.SCHEMA_VERSION
    assert data["identity"] == tuning.device_identity("cpu")
    assert data["identity"]["isa"] == _C.cpu_isa() and data["identity"]["torch"] == torch.__version__
    assert data["entries"][bucket]["winner"] == "torch_sdpa"
    assert data["entries"][bucket]["signature"] == TINY.to_json()
    assert _C.tuning_entry(bucket) is None  # saving alone does not touch the planner
    assert tuning.load(["cpu"]) == 1
    assert sorted(_C.tuning_entry(bucket)) == sorted([(int(Backend.NATIVE), 1.5), (int(Backend.TORCH_SDPA), 0.5)])
    assert tuning.entries("cpu")[bucket]["results"]["sdpa_math"] == {"refused": "not on cpu"}
    assert list(path.parent.glob("*.tmp")) == []


# Run twice at once with ATTNSEL_AUTOTUNE=1: each process tunes its own call online (the first `auto` call of an
# unseen bucket), then merges a burst of entries into the same table file.
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch, attnsel
    from attnsel import tuning
    who, count, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    q = torch.randn(1, 2, 40, 32 if who == "a" else 16)
    print("ready", tuning.autotune_enabled(), flush=True)
    while not go.exists():
        time.sleep(0.005)
    attnsel.attention(q, q, q)
    print(attnsel._C.CallSignature(1, 2, 2, 40, 40, q.shape[-1]).bucket(), flush=True)
    for i in range(count):
        entry = tuning._entry({"writer": who}, {"native": {"ms": float(i)}})
        assert tuning.save("cpu", {f"cpu|test|{who}|{i}": entry}) is not None
""")


def test_two_processes_tuning_at_once_lose_nothing(tmp_path):
    go, count = tmp_path / "go", 25
    env = dict(os.environ, PYTHONWARNINGS="error", ATTNSEL_AUTOTUNE="1")
    procs = [python(["-c", WRITER, who, str(count), str(go)], env) for who in ("a", "b")]
    for p in procs:
        assert p.stdout.readline().strip() == "ready True"
    go.touch()
    buckets = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        buckets.append(out.strip())
    data = json.loads(cpu_path().read_text())  # valid JSON: no torn write
    assert {f"cpu|test|{w}|{i}" for w in "ab" for i in range(count)} <= set(data["entries"])
    for bucket, head_dim in zip(buckets, (32, 16)):  # what each process tuned online is there too
        entry = data["entries"][bucket]
        assert entry["signature"]["head_dim"] == head_dim and entry["signature"]["q_len"] == 40
        assert entry["winner"] in ("native", "torch_sdpa") and entry["results"][entry["winner"]]["ms"] > 0
    assert list(cpu_path().parent.glob("*.tmp")) == []


def test_corrupt_file_warns_once_and_is_ignored():
    cpu_path().parent.mkdir(parents=True)
    cpu_path().write_text('{"schema": 1, "entries": {"cpu|x": ')
    with pytest.warns(RuntimeWarning, match="not valid JSON"):
        assert tuning.load(["cpu"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.load(["cpu"]) == 0  # once per process
        bucket = TINY.signature().bucket()
        assert tuning.save("cpu", {bucket: entry_with({"native": 1.0})}) == cpu_path()  # replaces the corrupt file
    assert bucket in json.loads(cpu_path().read_text())["entries"]


@pytest.mark.parametrize("field, value, message", [
    ("torch", "1.0.0", "torch '1.0.0'"),
    ("model", "Some Other CPU", "model 'Some Other CPU'"),
    ("kernels", "0123456789ab", "kernels '0123456789ab'"),  # measured with another build's kernels
    ("schema", 99, "schema version is 99"),
    ("schema", 1, "schema version is 1"),  # before CUDA buckets split key lengths off a multiple of 64
])
def test_foreign_file_warns_and_is_ignored(field, value, message):
    bucket = TINY.signature().bucket()
    path = tuning.save("cpu", {bucket: entry_with({"native": 1.0})})
    data = json.loads(path.read_text())
    if field == "schema":
        data["schema"] = value
    else:
        data["identity"][field] = value
    path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match=message):
        assert tuning.load(["cpu"]) == 0
    assert _C.tuning_entry(bucket) is None


def test_cuda_buckets_keep_key_lengths_off_a_multiple_of_64_apart():
    """SDPA's CUDA kernels slow down on such key lengths far more than ours: a winner measured at 4096 keys must not
    decide for 3686. Lengths on the same side share a bucket; CPU buckets do not split."""
    def bucket(q_len, kv_len, device="cuda"):
        return tuning.Shape(2, 10, q_len, kv_len, 64, "bfloat16", device=device).signature().bucket()

    assert bucket(4096, 4096) != bucket(3686, 3686)
    assert bucket(4096, 4096) == bucket(3712, 3712)  # both multiples of 64, same half-octave
    assert bucket(4250, 4250) == bucket(4429, 4429) == bucket(4675, 4675)
    assert bucket(4096, 77) == bucket(3686, 77)  # the key length decides, not the query length
    assert bucket(4096, 4096, "cpu") == bucket(3686, 3686, "cpu")


def test_unwritable_cache_dir_warns_and_keeps_results_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ATTNSEL_CACHE_DIR", str(blocker / "cache"))  # a directory below a file: never creatable
    with pytest.warns(RuntimeWarning, match="cannot write the tuning table.*in memory"):
        done, paths = tuning.tune([TINY], reps=3)
    assert paths == {"cpu": None}
    (_, bucket, entry), = done
    assert entry["winner"] in ("native", "torch_sdpa")
    q, k, v, _ = tuning.make_inputs(TINY)
    explained = explain_call(q, k, v)
    assert explained.backend == Backend[entry["winner"].upper()] and explained.measured is not None
    assert "tuning table" in explained.reasons[-1]


# -- auto from the table ----------------------------------------------------------------------------------------
def test_auto_runs_the_measured_fastest_backend():
    q, k, v, _ = tuning.make_inputs(TINY)
    bucket = call_signature(q, k, v).bucket()
    assert bucket == TINY.signature().bucket()
    _C.set_tuning_entry(bucket, [(int(Backend.NATIVE), 2.0), (int(Backend.TORCH_SDPA), 1.0)])
    assert explain_call(q, k, v).backend == Backend.TORCH_SDPA
    assert ran_sdpa(lambda: attnsel.attention(q, k, v))
    _C.set_tuning_entry(bucket, [(int(Backend.NATIVE), 1.0), (int(Backend.TORCH_SDPA), 2.0)])
    assert explain_call(q, k, v).backend == Backend.NATIVE
    assert not ran_sdpa(lambda: attnsel.attention(q, k, v))


def test_a_near_tie_goes_to_the_static_rank_and_is_recorded_as_the_winner():
    # On the CPU the static rank puts native first: within 2% of the fastest it wins, beyond it the fastest does.
    q, k, v, _ = tuning.make_inputs(TINY)
    bucket = TINY.signature().bucket()
    for native_ms, expected in ((1.015, Backend.NATIVE), (1.05, Backend.TORCH_SDPA)):
        entry = entry_with({"native": native_ms, "torch_sdpa": 1.0})
        assert entry["winner"] == "torch_sdpa"  # the fastest, until the planner has seen the entry
        tuning._remember_entry("cpu", TINY.signature(), bucket, entry)
        assert entry["winner"] == str(expected)
        explained = explain_call(q, k, v)
        assert explained.backend == expected and explained.measured is not None
        assert any("within 2% of the fastest" in r for r in explained.reasons) == (expected is Backend.NATIVE)


def test_auto_skips_a_measured_backend_that_refuses_the_call():
    q, k, v, mask = tuning.make_inputs(TINY_KP)
    bucket = call_signature(q, k, v, mask).bucket()
    assert bucket == TINY_KP.signature().bucket()
    # fa measured fastest (say, on a machine where it ran) but it takes no mask and not the CPU here: next one wins
    _C.set_tuning_entry(bucket, [(int(Backend.FA), 0.1), (int(Backend.TORCH_SDPA), 1.0), (int(Backend.NATIVE), 2.0)])
    explained = explain_call(q, k, v, attn_mask=mask)
    assert explained.backend == Backend.TORCH_SDPA
    assert any(r.startswith("fa:") for r in explained.reasons)
    assert ran_sdpa(lambda: attnsel.attention(q, k, v, attn_mask=mask))


# -- measuring --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [
    TINY, TINY_KP,
    tuning.Shape(1, 4, 20, 20, 8, "bfloat16", kv_heads=2, causal=True),
    tuning.Shape(2, 2, 9, 13, 16, "float32", mask="bool"),
    tuning.Shape(1, 2, 9, 13, 16, "float16", mask="additive"),
    tuning.Shape(2, 1, 12, 12, 8, "float32", mask="additive_key_padding", head_dim_v=16),
])
def test_inputs_match_their_shape_and_every_runnable_backend_agrees(shape):
    q, k, v, mask = tuning.make_inputs(shape)
    assert tuning.shape_of_call(q, k, v, mask, shape.causal) == tuning.Shape(**{**shape.__dict__, "name": ""})
    assert call_signature(q, k, v, mask, shape.causal).bucket() == shape.signature().bucket()
    results = tuning.measure(shape.signature(), q, k, v, mask, shape.causal, reps=3)
    assert results["native"].keys() == {"ms", "reps"} and results["native"]["ms"] > 0
    assert "ms" in results["torch_sdpa"]


def test_a_backend_that_disagrees_or_raises_is_refused(monkeypatch):
    real = tuning._ops._OP  # tuning times the op with each backend's id, the route auto takes

    def broken(q, k, v, attn_mask, is_causal, scale, backend):
        if backend == int(Backend.TORCH_SDPA):
            out, lse = real(q, k, v, attn_mask, is_causal, scale, backend)
            return out * 1.1, lse
        if backend == int(Backend.NATIVE):
            raise RuntimeError("kernel exploded")
        return real(q, k, v, attn_mask, is_causal, scale, backend)

    monkeypatch.setattr(tuning._ops, "_OP", broken)
    q, k, v, _ = tuning.make_inputs(TINY)
    results = tuning.measure(TINY.signature(), q, k, v, reps=3)
    assert "disagrees with the float32 reference" in results["torch_sdpa"]["refused"]
    assert results["native"] == {"refused": "raised RuntimeError: kernel exploded"}
    entry = tuning._entry(TINY.to_json(), results)
    assert entry["winner"] is None
    tuning.remember("cpu", {TINY.signature().bucket(): entry})
    assert _C.tuning_entry(TINY.signature().bucket()) is None  # nothing measured: auto keeps its static rank


# -- the command line -------------------------------------------------------------------------------------------
def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tune_shapes_writes_the_table_and_prints_it(tmp_path, capsys):
    shapes = tmp_path / "shapes.json"
    tuning.write_shapes(shapes, [TINY, TINY_KP])
    code, out, err = run_main(capsys, "tune", "--shapes", str(shapes), "--device", "cpu", "--reps", "3")
    assert code == 0, err
    lines = out.splitlines()
    header = next(l for l in lines if l.startswith("shape"))
    assert "native" in header and "torch_sdpa" in header and header.endswith("winner")
    assert any(l.startswith("tiny 1x2x33x16 kv17 fp32") for l in lines)
    assert f"wrote the cpu tuning table: {cpu_path()}" in out
    assert "2/2" in err  # the progress bar reached the end
    data = json.loads(cpu_path().read_text())["entries"]
    for shape in (TINY, TINY_KP):
        entry = data[shape.signature().bucket()]
        assert entry["signature"] == shape.to_json()
        assert entry["results"]["native"]["ms"] > 0 and entry["results"]["torch_sdpa"]["ms"] > 0
        assert _C.tuning_entry(shape.signature().bucket()) is not None

    code, out, _ = run_main(capsys, "explain", "--shapes", str(shapes))
    assert code == 0
    line = next(l for l in out.splitlines() if "tiny 1x2x33x16" in l)
    assert "(auto, measured)" in line and "measured: " in line and "measured: none" not in line


@pytest.mark.parametrize("content, message", [
    ("[{", "is not valid JSON"),
    ("[]", "non-empty JSON list"),
    ('[{"batch": 1, "heads": 2, "q_len": 8, "kv_len": 8, "head_dim": 16}]', "missing key 'dtype'"),
    ('[{"batch": 0, "heads": 2, "q_len": 8, "kv_len": 8, "head_dim": 16, "dtype": "fp32"}]', "'batch' must be"),
    ('[{"batch": 1, "heads": 2, "q_len": 8, "kv_len": 8, "head_dim": 16, "dtype": "fp8"}]', "'dtype' must be one"),
    ('[{"batch": 1, "heads": 2, "q_len": 8, "kv_len": 8, "head_dim": 16, "dtype": "fp32", "mask": "causal"}]',
     "'mask' must be one of none, bool"),
    ('[{"batch": 1, "heads": 3, "q_len": 8, "kv_len": 8, "head_dim": 16, "dtype": "fp32", "kv_heads": 2}]',
     "must divide"),
    ('[{"batch": 1, "heads": 2, "q_len": 8, "kv_len": 8, "head_dim": 16, "dtype": "fp32", "seq": 3}]',
     "unknown key 'seq'"),
    ('[{"batch": 1, "heads": 2, "q_len": 8, "kv_len": 8, "head_dim": 16, "dtype": "fp32", "role": "cross"}]',
     "'role' needs a 'component'"),
    ('[{"batch": 1, "heads": 2, "q_len": 8, "kv_len": 8, "head_dim": 16, "dtype": "fp32", "component": "unet",'
     ' "role": "joint"}]', "'role' must be one of self, cross"),
    ('[{"batch": 1, "heads": 2, "q_len": 8, "kv_len": 8, "head_dim": 16, "dtype": "fp32",'
     ' "component": "unet.cross"}]', "'component' must be a component name"),
])
def test_tune_rejects_a_bad_shapes_file_in_one_line(tmp_path, capsys, content, message):
    shapes = tmp_path / "shapes.json"
    shapes.write_text(content)
    code, out, err = run_main(capsys, "tune", "--shapes", str(shapes), "--device", "cpu")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("attnsel: error: argument --shapes:") and message in err
    assert not cpu_path().exists()


def test_tune_usage_errors(capsys):
    code, _, err = run_main(capsys, "tune", "--device", "cpu")
    assert code == 2 and "--preset" in err and err.count("\n") == 1
    code, _, err = run_main(capsys, "tune", "--preset", "diffusion", "--device", "tpu")
    assert code == 2 and "expected cpu, cuda or cuda:N" in err


def test_tune_preset_dry_run_lists_shapes_and_buckets(capsys):
    code, out, _ = run_main(capsys, "tune", "--preset", "diffusion", "--device", "cpu", "--dry-run")
    assert code == 0
    assert len(tuning.preset("diffusion", "cpu")) == out.count("bucket cpu|")
    cuda = tuning.preset("diffusion", "cuda")
    assert {s.dtype for s in cuda} == {"bfloat16", "float16"}
    assert {"flux-1024", "wan14b-cross", "cogvideox", "vae-mid-1024", "clip", "t5"} <= {s.name for s in cuda}


def test_record_shapes_round_trip(tmp_path, capsys):
    recorded = tmp_path / "shapes.json"
    code, out, err = run_main(capsys, "run", "--steps", "1", "--output", str(tmp_path / "o.png"),
                              "--record-shapes", str(recorded))
    assert code == 0, err
    shapes = tuning.read_shapes(recorded)
    assert shapes and len(shapes) == len(set(shapes)) and f"recorded {len(shapes)} attention call shapes" in out
    assert all(s.device == "cpu" and s.dtype == "float32" for s in shapes)
    assert any(s.q_len != s.kv_len for s in shapes)  # the transformer's cross-attention
    # each call carries the component (and role) of the layer that made it, so explain can apply overrides
    assert {s.component for s in shapes} >= {"transformer", "text_encoder"}
    assert any(s.component == "transformer" and s.role == "cross" and s.q_len != s.kv_len for s in shapes)
    code, out, _ = run_main(capsys, "tune", "--shapes", str(recorded), "--dry-run")
    assert code == 0 and out.count("bucket cpu|") == len(shapes)

    with tuning.record_shapes() as calls:  # direct calls, deduplicated, in first-call order
        for shape in (TINY, TINY_KP, TINY):
            q, k, v, mask = tuning.make_inputs(shape)
            attnsel.attention(q, k, v, attn_mask=mask)
    assert [s.signature().bucket() for s in calls] == [TINY.signature().bucket(), TINY_KP.signature().bucket()]
    assert not tuning._ops.CALL_HOOKS  # the hook is gone after the block


def test_online_tuning_in_process_measures_an_unseen_bucket_once():
    q, k, v, _ = tuning.make_inputs(TINY)
    bucket = TINY.signature().bucket()
    tuning.set_autotune(True)
    out = attnsel.attention(q, k, v)
    entry = json.loads(cpu_path().read_text())["entries"][bucket]
    assert entry["winner"] in ("native", "torch_sdpa") and _C.tuning_entry(bucket) is not None
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    first = entry["measured_at"]
    attnsel.attention(q, k, v, backend="native")  # named backends are never tuned
    attnsel.attention(q, k, v)  # the bucket is known now: no second measurement
    assert json.loads(cpu_path().read_text())["entries"][bucket]["measured_at"] == first
    assert len(tuning.entries("cpu")) == 1


def test_explain_plans_preset_shapes_without_running_them(capsys):
    code, out, _ = run_main(capsys, "explain", "--preset", "diffusion", "--device", "cuda")
    assert code == 0
    plans = [l for l in out.splitlines() if l.startswith("  ")]
    assert len(plans) == len(tuning.preset("diffusion", "cuda"))
    assert all("measured: none" in l for l in plans)  # nothing tuned in this test's table


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [
    tuning.Shape(1, 4, 300, 300, 64, "bfloat16", device="cuda"),
    tuning.Shape(2, 4, 256, 77, 128, "float16", device="cuda", mask="key_padding"),
    tuning.Shape(1, 4, 200, 200, 64, "bfloat16", device="cuda", causal=True),
])
def test_cuda_backends_agree_and_auto_takes_the_winner(shape):
    (_, bucket, entry), = tuning.tune([shape], reps=5)[0]
    refused = {n: r["refused"] for n, r in entry["results"].items() if "refused" in r}
    # A backend the descriptors let through must run and agree (sage quantises: it may legitimately disagree).
    broken = {n: why for n, why in refused.items()
              if not n.startswith("sage") and ("disagrees" in why or "raised" in why)}
    assert not broken, broken
    assert "ms" in entry["results"]["torch_sdpa"]
    q, k, v, mask = tuning.make_inputs(shape)
    assert explain_call(q, k, v, attn_mask=mask, is_causal=shape.causal).backend == Backend[entry["winner"].upper()]


def test_explain_shapes_applies_component_and_role_overrides(tmp_path, capsys):
    """A shape's component/role keys get the policy its layer would get: component.role > component > global."""
    shapes = tmp_path / "shapes.json"
    base = {"batch": 1, "heads": 2, "q_len": 33, "kv_len": 17, "head_dim": 16, "dtype": "fp32"}
    shapes.write_text(json.dumps([dict(base, name="a", component="transformer", role="cross"),
                                  dict(base, name="b", component="transformer", role="self"),
                                  dict(base, name="c", component="text_encoder_2"),
                                  dict(base, name="d", component="vae"),
                                  dict(base, name="e")]))
    code, out, err = run_main(capsys, "explain", "--shapes", str(shapes), "--attention-backend", "native",
                              "--component-attention-backends",
                              "transformer.cross=torch_sdpa,transformer=native,text_encoder=torch_sdpa")
    assert code == 0, err
    plan = {l.split()[0]: l for l in out.splitlines() if l.startswith("  ")}
    assert "torch_sdpa (component key transformer.cross)" in plan["a"]
    assert "native (component key transformer)" in plan["b"]
    assert "torch_sdpa (component key text_encoder)" in plan["c"]  # the numbered component's base
    assert "native (global --attention-backend)" in plan["d"] and "native (global --attention-backend)" in plan["e"]


def test_tune_times_a_call_shared_by_several_components_once(monkeypatch):
    timed = []
    real = tuning.tune_shape
    monkeypatch.setattr(tuning, "tune_shape", lambda shape, *a, **kw: timed.append(shape) or real(shape, *a, **kw))
    shapes = [dataclasses.replace(TINY, component="transformer"), dataclasses.replace(TINY, component="unet"), TINY_KP]
    done, _ = tuning.tune(shapes, reps=2, save_file=False)
    assert [s.component for s in timed] == ["transformer", ""] and len(done) == 3
    assert done[0][1] == done[1][1] and done[0][2] is done[1][2]
