"""ctypes front for the dev build of the native CUDA attention (tools/cuda_dev/build.sh).

attention(q, k, v, attn_mask=None, is_causal=False, scale=None, variant=None, out=None, return_lse=False) mirrors
attnsel.attention(..., backend="native") for [B, H, S, D] CUDA tensors, without the extension (layouts the kernel
cannot stream run on contiguous copies, as in the extension). attn_mask: bool (True = attend) or additive (float32
or q's dtype), broadcastable to [B, Hq, Sq, Sk]; a 2-D mask is (B, Sk). return_lse: also the [B, Hq, Sq] fp32
log-sum-exp, as (out, lse).
variant None takes ATTNSEL_DEV_VARIANT (default -1, the kernels' default), so tests/test_cuda_kernel.py run with
ATTNSEL_TEST_DEV_HARNESS=1 (and pytest's --noconftest: no extension to import) can check a variant.
"""
import ctypes
import math
import os

import torch

_LIBS = {}
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _lib(path=None):
    """The dev library at path (default: ATTNSEL_DEV_LIB, else build/ here); several can be loaded side by side."""
    if path is None:
        path = os.environ.get(
            "ATTNSEL_DEV_LIB", os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "libattnsel_dev.so")
        )
    if path not in _LIBS:
        lib = ctypes.CDLL(os.path.abspath(path))
        f = lib.attnsel_dev_forward
        P, I64P = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
        f.argtypes = [P, P, P, P, ctypes.c_int, I64P, I64P, I64P, I64P, I64P, ctypes.c_int, ctypes.c_float,
                      P, ctypes.c_int, ctypes.c_int, I64P, ctypes.c_int, ctypes.c_int, ctypes.c_int, P, P]
        f.restype = ctypes.c_char_p
        _LIBS[path] = lib
    return _LIBS[path]


def _arr(xs):
    return (ctypes.c_int64 * len(xs))(*xs)


class Refused(RuntimeError):
    pass


def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, variant=None, out=None, return_lse=False,
              lib=None):
    """lib: path of the dev library to call (default: see _lib)."""
    if variant is None:
        variant = int(os.environ.get("ATTNSEL_DEV_VARIANT", "-1"))
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, _ = k.shape
    mask, mask_kind, mask_dtype, mask_strides = None, 0, 0, [0, 0, 0, 0]
    if attn_mask is not None:
        m = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
        m = m.expand(B, Hq, Sq, Sk)
        mask, mask_kind = m.data_ptr(), 1 if m.dtype == torch.bool else 2
        mask_dtype = _DT.get(m.dtype, 0)
        mask_strides = list(m.stride())
    Dv = v.shape[-1]
    if out is None:
        out = torch.empty((B, Hq, Sq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device) if return_lse else None
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    major, minor = torch.cuda.get_device_capability(q.device)
    stream = torch.cuda.current_stream(q.device).cuda_stream

    def run(q, k, v):
        msg = _lib(lib).attnsel_dev_forward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), _DT[q.dtype],
            _arr([B, Hq, Hkv, Sq, Sk, D, Dv]), _arr(q.stride()), _arr(k.stride()), _arr(v.stride()),
            _arr(out.stride()), int(is_causal), float(scale), mask, mask_kind, mask_dtype, _arr(mask_strides), major,
            minor, int(variant), ctypes.c_void_p(stream), None if lse is None else lse.data_ptr())
        return msg.decode() if msg else ""

    msg = run(q, k, v)
    if msg.startswith("refused:") and not all(t.is_contiguous() for t in (q, k, v)):
        msg = run(q.contiguous(), k.contiguous(), v.contiguous())
    if msg:
        raise (Refused if msg.startswith("refused:") else RuntimeError)(msg)
    return (out, lse) if return_lse else out
