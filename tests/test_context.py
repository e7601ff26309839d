"""Component context isolation: nesting, exceptions, threads, asyncio tasks, pools, and C++ <-> Python scopes."""

import asyncio
import random
import threading

import pytest
import torch

import attnsel
from attnsel import Backend, _C


def current():
    return attnsel.get_component_attn_backend_name(), attnsel.get_component_forced_attn_backend()


def test_nesting_and_exceptions_restore():
    assert current() == (None, None)
    with attnsel.component_attention_backend("text_encoder", "torch_sdpa"):
        assert current() == ("text_encoder", Backend.TORCH_SDPA)
        with pytest.raises(RuntimeError):
            with attnsel.component_attention_backend("vae", "native"):
                assert current() == ("vae", Backend.NATIVE)
                raise RuntimeError("boom")
        assert current() == ("text_encoder", Backend.TORCH_SDPA)
        assert _C.current_component() == (int(Backend.TORCH_SDPA), "text_encoder", True, None, None)
    assert current() == (None, None)
    assert _C.current_component() is None


def test_forced_backend_nesting_and_exceptions():
    with attnsel.force_attention_backend("fa3") as forced:
        assert forced == Backend.FA and attnsel.get_forced_attn_backend() == Backend.FA
        with pytest.raises(KeyError):
            with attnsel.force_attention_backend(None):
                assert attnsel.get_forced_attn_backend() is None
                raise KeyError("x")
        assert attnsel.get_forced_attn_backend() == Backend.FA
    assert attnsel.get_forced_attn_backend() is None


def test_bad_scope_arguments():
    with pytest.raises(ValueError):
        with attnsel.component_attention_backend("", "native"):
            pass
    with pytest.raises(ValueError, match="valid options"):
        with attnsel.component_attention_backend("vae", "nope"):
            pass
    with pytest.raises(ValueError, match="valid options"):
        with attnsel.force_attention_backend("nope"):
            pass
    assert current() == (None, None)


def test_threads_start_empty_and_stay_isolated():
    n = 32
    barrier = threading.Barrier(n)
    errors = []

    def worker(i):
        try:
            assert current() == (None, None), "a new thread must start with no component"
            backend = ["native", "torch_sdpa"][i % 2]
            with attnsel.component_attention_backend(f"component_{i}", backend):
                barrier.wait()  # everyone is inside a scope at once
                for _ in range(50):
                    e = attnsel.explain_attn_backend(64, torch.float32)
                    assert e.component == f"component_{i}" and e.backend.name.lower() == backend
                    assert _C.current_component()[1] == f"component_{i}"
                    assert _C._testing.select_thread(64, "float32", "cpu")[2] == f"component_{i}"
                barrier.wait()
            assert current() == (None, None)
        except Exception as exc:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(exc)
            barrier.abort()

    with attnsel.component_attention_backend("main", "native"):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert current() == ("main", Backend.NATIVE)
    assert not errors, errors[0]


def test_asyncio_tasks_on_one_thread_never_see_each_other():
    async def task(i):
        rng = random.Random(i)
        name = f"task_{i}"
        backend = ["native", "torch_sdpa"][i % 2]
        assert current() == (None, None)
        with attnsel.component_attention_backend(name, backend):
            await asyncio.sleep(0)
            assert attnsel.explain_attn_backend(64, torch.float32).component == name
            if i % 3 == 0:  # nesting across awaits
                with attnsel.component_attention_backend(name + "_inner", "torch_sdpa"):
                    await asyncio.sleep(0)
                    assert current() == (name + "_inner", Backend.TORCH_SDPA)
                assert current()[0] == name
            if i % 7 == 0:  # exceptions across awaits
                try:
                    with attnsel.component_attention_backend(name + "_fail", "native"):
                        await asyncio.sleep(rng.random() / 1000)
                        raise ValueError("expected")
                except ValueError:
                    pass
            await asyncio.sleep(rng.random() / 1000)
            e = attnsel.explain_attn_backend(64, torch.float32)
            assert (e.component, e.backend.name.lower()) == (name, backend)
        assert current() == (None, None)
        return i

    async def main():
        return await asyncio.gather(*(task(i) for i in range(1000)))

    assert sorted(asyncio.run(main())) == list(range(1000))
    assert current() == (None, None)


def test_task_inherits_scope_of_its_creator():
    async def child():
        return current()

    async def main():
        with attnsel.component_attention_backend("transformer", "torch_sdpa"):
            return await asyncio.create_task(child())

    assert asyncio.run(main()) == ("transformer", Backend.TORCH_SDPA)


def test_pool_helper_carries_scope():
    with attnsel.component_attention_backend("vae", "torch_sdpa"):
        with attnsel.ContextThreadPoolExecutor(max_workers=4) as pool:
            seen = list(pool.map(lambda _: (current(), _C.current_component()[1]), range(16)))
        plain = threading.Thread  # a plain thread does not inherit
        result = []
        t = plain(target=lambda: result.append(current()))
        t.start()
        t.join()
    assert seen == [(("vae", Backend.TORCH_SDPA), "vae")] * 16
    assert result == [(None, None)]


def test_native_scope_seen_from_python_and_python_scope_seen_from_native():
    # a C++ attnsel::ComponentScope entered from Python: Python's getters and selection see it
    def inside():
        e = attnsel.explain_attn_backend(64, torch.float32)
        return current(), e.backend, e.source

    assert _C._testing.run_in_native_scope("vae", int(Backend.TORCH_SDPA), inside) == (
        ("vae", Backend.TORCH_SDPA), Backend.TORCH_SDPA, "component")
    assert current() == (None, None)
    # a Python scope nested inside the native one wins, and the native one comes back after it
    def nested():
        with attnsel.component_attention_backend("text_encoder", "native"):
            inner = (current(), _C.current_component())
        return inner, current()

    inner, after = _C._testing.run_in_native_scope("vae", int(Backend.TORCH_SDPA), nested)
    assert inner == (("text_encoder", Backend.NATIVE), (int(Backend.NATIVE), "text_encoder", True, None, None))
    assert after == ("vae", Backend.TORCH_SDPA)
    # a Python scope seen from C++: the native selector using the thread's context agrees with Python
    with attnsel.component_attention_backend("transformer", "torch_sdpa"):
        backend_id, source, component, _ = _C._testing.select_thread(64, "float32", "cpu")
        assert (Backend(backend_id), source, component) == (Backend.TORCH_SDPA, "component", "transformer")
        assert attnsel.get_attn_backend(64, torch.float32) == Backend(backend_id)
