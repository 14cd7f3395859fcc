"""Every Triton kernel compiled ahead of time for sm_90 on a machine without a GPU (Triton's bundled ptxas).

The interpreter tests check indexing and masking, but not whether the real compiler accepts a kernel: this
catches frontend and ptxas errors (and shared-memory overflows of a tuning-table entry) in CI. The launches
come from the same plans the GPU path uses.
"""
from __future__ import annotations

import pytest

from fa3jax.backends.triton import launch, plan_common, plan_decode, plan_dense, plan_varlen, tables
from fa3jax.masking import Window
from fa3jax.spec import AttentionSpec, KVCacheSpec, VarlenSpec
from fa3jax.tuning import Tuning

triton = pytest.importorskip("triton")

_INT_ARRAYS = {"cu_seqlens_q", "cu_seqlens_k", "seqused_k", "offsets", "segment_ids", "seqlens_k",
               "cache_seqlens", "leftpad", "batch_idx", "page_table"}
_F32_ARRAYS = {"lse", "delta", "dlse", "out_acc", "lse_acc", "sinks"}
_SMEM_LIMIT = 227 * 1024  # sm90 per block


def _pointer(name: str, dtype: str) -> str:
    if name in _INT_ARRAYS:
        return "*i32"
    if name in _F32_ARRAYS:
        return "*fp32"
    return {"bfloat16": "*bf16", "float16": "*fp16"}[dtype]


def _compile(l: plan_common.Launch, dtype: str):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel(l)
    names = iter(fn.arg_names)
    sig = {}
    for kind, value in l.args:
        sig[next(names)] = _pointer(value, dtype) if kind == "array" else {"i32": "i32", "f32": "fp32"}[kind]
    for name, _, _ in l.outputs:
        sig[next(names)] = _pointer(name, dtype)
    const = dict(l.constexprs)
    sig.update({k: "constexpr" for k in const})
    # jax-triton specializes every array argument as 16-byte aligned (tt.divisibility 16), as Triton's JIT does
    # for aligned tensors. Without the hint the loads cannot become cp.async, the loops are not multi-buffered,
    # and metadata.shared comes out far below what the GPU asks for (d=128 fwd 128x128/8w/4st: 64 KiB offline
    # vs 288 KiB on the H100). Keys are (index in fn.arg_names,), as in triton/tools/compile.py.
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items() if t.startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": l.num_warps, "num_stages": l.num_stages})


def _dense(d, dtype, window, softcap=0.0):
    return AttentionSpec(mode="dense", batch=2, seqlen_q=4096, seqlen_k=4096, num_heads_q=16, num_heads_k=4,
                         head_dim=d, dtype=dtype, softmax_scale=d ** -0.5, window=Window(*window), softcap=softcap)


def _launches():
    yield "dense-d128-causal", _dense(128, "bfloat16", (-1, 0))
    yield "dense-d72-fp16-window-softcap", _dense(72, "float16", (256, 16), 30.0)
    yield "dense-d256-full", _dense(256, "bfloat16", (-1, -1))
    yield "dense-d256-causal", _dense(256, "bfloat16", (-1, 0))  # its own table entry
    yield "dense-d64-full", _dense(64, "float16", (-1, -1))
    vs = _dense(128, "bfloat16", (-1, 0)).replace(mode="varlen", batch=5, varlen=VarlenSpec(3000, 3000, True))
    yield "varlen-d128-causal-seqused", vs
    # the varlen forward's own tile (tables.lookup_varlen_fwd), unmasked
    yield "varlen-d128-full", vs.replace(window=Window(-1, -1), varlen=VarlenSpec(3000, 3000, False))
    # MLA (value head dim below the q/k one) on the q/k head dim's table entry, and attention sinks
    yield "dense-mla192-128-causal-sinks", _dense(192, "bfloat16", (-1, 0)).replace(head_dim_v=128, has_sinks=True)
    yield "dense-mla192-128-full", _dense(192, "bfloat16", (-1, -1)).replace(head_dim_v=128)
    yield "dense-mla128-64-full-sinks", _dense(128, "bfloat16", (-1, -1)).replace(head_dim_v=64, has_sinks=True)
    yield "varlen-mla192-128-causal-sinks", vs.replace(head_dim=192, head_dim_v=128, has_sinks=True)
    # packed sequences: segment ids join the element mask (every visited tile takes the masked path)
    yield "dense-d128-causal-segments", _dense(128, "bfloat16", (-1, 0)).replace(has_segment_ids=True)
    yield "dense-d72-fp16-window-softcap-segments-sinks", _dense(72, "float16", (256, 16), 30.0).replace(
        has_segment_ids=True, has_sinks=True)
    for paged in (False, True):
        kv = KVCacheSpec(capacity=32768, cache_batch=128 if paged else 1, paged=paged, page_size=256 if paged else 0,
                         pages_per_seq=128 if paged else 0, seqlen_new=1, rotary_dim=0, rotary_interleaved=False,
                         has_cache_batch_idx=False, has_cache_leftpad=True, num_splits=0, return_updated_cache=False)
        ks = AttentionSpec(mode="kvcache", batch=1, seqlen_q=1, seqlen_k=32768, num_heads_q=32, num_heads_k=8,
                           head_dim=128, dtype="bfloat16", softmax_scale=128 ** -0.5, window=Window(-1, 0),
                           kvcache=kv)
        yield f"decode-{'paged' if paged else 'contiguous'}", ks
        yield f"decode-{'paged' if paged else 'contiguous'}-sinks", ks.replace(has_sinks=True)


def _plans(spec):
    if spec.mode == "dense":
        return [plan_dense.plan_forward(spec, "sm90"), *plan_dense.plan_backward(spec, "sm90")]
    if spec.mode == "varlen":
        return [plan_varlen.plan_forward(spec, "sm90"), *plan_varlen.plan_backward(spec, "sm90")]
    policy = tables.DECODE["paged" if spec.kvcache.paged else "contiguous"]
    return [l for sched in plan_decode.SCHEDULES
            for l in plan_decode.plan_forward(spec, "sm90", tune=Tuning(decode=policy._replace(schedule=sched)))]


@pytest.mark.parametrize("spec", [c[1] for c in _launches()], ids=[c[0] for c in _launches()])
def test_kernels_compile_for_sm90(spec):
    launches = _plans(spec)
    if spec.mode == "kvcache":
        assert [l.kernel for l in launches] == ["_decode_fwd", "_decode_combine", "_decode_fwd_persistent",
                                                "_decode_combine_streamk"], "split + combine, stream-K + combine"
    for l in launches:
        k = _compile(l, spec.dtype)
        assert k.asm.get("cubin"), l.kernel
        assert k.metadata.shared <= _SMEM_LIMIT, (l.kernel, k.metadata.shared)
