"""Hopper (sm_90a) CUDA backend: FlashAttention-3 style forward and backward kernels behind XLA FFI.

The compiled part lives in ``_fa3jax_cuda`` (built only with ``FA3JAX_BUILD_CUDA=1``); everything here works,
and reports unavailability, without it. Forward and backward serve dense and varlen calls, MLA (a value head dim
below the q/k one) too where built; where the backward kernel does not serve a call (see check_backward: head dims
or MLA pairs built without a backward), the registry pairs this forward (and its LSE, which follows every backend's
convention) with another backend's backward. Any head dim up to the largest built one is served (by the smallest
kernel that holds it, chosen in the C++ dispatch; MLA pairs by their exact kernel only); see _kernel_head_dim for
the few that need padded copies.
``kvcache_forward`` serves KV-cache calls (contiguous and paged caches, of the page sizes the serving kernel reads:
build_info's kvcache_head_dims; appended k/v, leftpad, batch_idx, GQA, masks, softcap, sinks; head dims that are
multiples of 8, by the same kernel choice), with split-KV (``num_splits``; 0 = the C++ rule fwd_kvcache_num_splits)
combined by LSE in the same FFI call, and the query heads of one kv head packed into one tile for decode; ``auto``'s
order for them is fa3jax.registry's.
Every FFI call gets its device workspace (tile counter, split-KV parts, the backward's fp32 dQ accumulator) as one
more result, a uint8 buffer that XLA allocates and this module drops (_ffi_call), sized at trace time by the
extension's own functions: no XLA scratch, which a CUDA graph that XLA captures around the call would outlive.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jaxlib import xla_client

from ... import tuning
from ...spec import AttentionSpec
from ..base import Backend
from . import targets

_EXT_NAME = __name__ + "._fa3jax_cuda"
_NOT_BUILT = "fa3jax was installed without the CUDA extension; rebuild with FA3JAX_BUILD_CUDA=1"
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16"}
# The persistent kernel numbers its (query block, head, batch) tiles with int32; query blocks are >= 64 rows.
_MAX_TILES = 2**31 - 1
# Varlen loads read through packed-rows TMA views (launch.h encode_rows_view) that hold sequences of up to 2^30 rows
# (no sequence is longer than the total) and rows below 2^34 bytes (fwd_check / bwd_check).
_MAX_VARLEN_ROWS = 2**30
_MAX_VARLEN_ROW_BYTES = 2**34 - 1
_MAX_GRID_YZ = 65535  # CUDA's grid y/z limit


def _check_varlen_views(spec: AttentionSpec) -> None:
    """Refuses varlen calls the kernels' packed-rows TMA views cannot address (fwd_check / bwd_check mirror)."""
    if max(spec.seqlen_q, spec.seqlen_k) > _MAX_VARLEN_ROWS:
        raise NotImplementedError(f"cuda: varlen totals above {_MAX_VARLEN_ROWS} rows exceed the kernel's TMA views "
                                  f"({spec.seqlen_q=}, {spec.seqlen_k=})")
    itemsize = jnp.dtype(spec.dtype).itemsize
    row_bytes = max(spec.num_heads_q, spec.num_heads_k) * max(spec.head_dim, spec.head_dim_v) * itemsize
    if row_bytes > _MAX_VARLEN_ROW_BYTES:
        raise NotImplementedError(f"cuda: varlen rows of {row_bytes} bytes exceed the kernel's TMA views (< 2^34; "
                                  f"{spec.num_heads_q=}, {spec.num_heads_k=}, {spec.head_dim=}, {spec.head_dim_v=})")


_register_lock = threading.Lock()
_registered = False


@functools.lru_cache(maxsize=None)
def _load_extension():
    """(module, None) or (None, reason). Never raises."""
    try:
        if importlib.util.find_spec(_EXT_NAME) is None:
            return None, _NOT_BUILT
    except Exception as e:  # noqa: BLE001 - a broken package layout is also "not available"
        return None, f"cuda: cannot look up the CUDA extension: {type(e).__name__}: {e}"
    try:
        return importlib.import_module(_EXT_NAME), None
    except Exception as e:  # noqa: BLE001
        return None, f"cuda: the CUDA extension failed to load: {type(e).__name__}: {e}"


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What the extension was compiled with ({} when not built / not loadable)."""
    ext, _ = _load_extension()
    if ext is None:
        return {}
    try:
        return dict(ext.build_info())
    except Exception:  # noqa: BLE001
        return {}


def _register_targets(ext) -> None:
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        handlers = ext.handlers()
        # XLA reads CUDA-graph compatibility from the registration, not from the handler's own traits: declared only
        # by builds whose workspace is an XLA result (scratch memory would be freed under a replayed graph).
        extra = ({"traits": xla_client.CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE}
                 if _has_workspace_result() else {})
        for target, key in targets.HANDLERS.items():
            if key in handlers:  # an extension built before a target lacks it; check_forward refuses its calls
                jax.ffi.register_ffi_target(target, handlers[key], platform="CUDA", **extra)
        _registered = True


class CudaBackend(Backend):
    name = "cuda"

    def availability(self) -> tuple[bool, str]:
        try:
            ext, reason = _load_extension()
            if ext is None:
                return False, reason
            try:
                platform = jax.default_backend()
            except Exception as e:  # noqa: BLE001
                return False, f"cuda: no JAX backend: {type(e).__name__}: {e}"
            if platform != "gpu":
                return False, f"cuda: JAX default backend is {platform!r}, not 'gpu'"
            dev = jax.devices()[0]
            cc = getattr(dev, "compute_capability", None)
            if cc is None:
                return False, f"cuda: cannot read the compute capability of {dev}"
            if str(cc) != "9.0":
                return False, f"cuda: needs a Hopper GPU (compute capability 9.0), found {cc} ({dev.device_kind})"
            return True, ""
        except Exception as e:  # noqa: BLE001 - availability never raises
            return False, f"cuda: availability check failed: {type(e).__name__}: {e}"

    def _check_common(self, spec: AttentionSpec, instances_key: str, mla_key: str, mla_feature: str,
                      what: str) -> None:
        """Refusals shared by the forward and backward kernels (compiled instantiations, features): build_info's
        ``instances_key`` lists the (dtype, d) kernels, ``mla_key`` the (dtype, d, d_v) ones of an extension with
        ``mla_feature``."""
        ext, reason = _load_extension()
        if ext is None:
            raise NotImplementedError(reason)
        if spec.has_offsets:
            raise NotImplementedError("cuda: ring-attention block offsets are not supported")
        if spec.has_segment_ids:
            raise NotImplementedError("cuda: segment ids (packed sequences) are not supported")
        dt = _DTYPE_NAMES.get(spec.dtype)
        if dt is None:
            raise NotImplementedError(f"cuda: dtype {spec.dtype} not supported (bfloat16, float16 only)")
        if spec.head_dim_v != spec.head_dim:
            if mla_feature not in build_info().get("features", ()):
                raise NotImplementedError(f"cuda: this build of the CUDA extension predates the MLA {what} (a value "
                                          f"head dim below the q/k one); rebuild it with FA3JAX_BUILD_CUDA=1")
            built = {(str(t), int(d), int(dv)) for t, d, dv in build_info().get(mla_key, ())}
            if (dt, spec.head_dim, spec.head_dim_v) not in built:
                raise NotImplementedError(
                    f"cuda: no MLA {what} kernel for (dtype={spec.dtype}, head_dim={spec.head_dim}, "
                    f"head_dim_v={spec.head_dim_v}) in this build (built: {sorted(built)}); rebuild with "
                    f"FA3JAX_HEAD_DIMS entries D x D_V, e.g. 192x128")
        else:
            instances = {(str(t), int(d)) for t, d in build_info().get(instances_key, ())}
            if targets.FEATURE_ANY_HEAD_DIM in build_info().get("features", ()):
                # Served by the narrowest kernel that holds the (padded) head dim; the C++ dispatch picks it
                # (fwd_kernel_dim / bwd_kernel_dim), this only asks whether one exists.
                d = _kernel_head_dim(spec)
                if not any(t == dt and d <= hd for t, hd in instances):
                    raise NotImplementedError(
                        f"cuda: no {what} kernel for (dtype={spec.dtype}, head_dim={spec.head_dim}) in this build: "
                        f"none with a head dim >= {d} (built: {sorted(instances)}); rebuild with FA3JAX_HEAD_DIMS "
                        f"/ FA3JAX_DTYPES")
            elif (dt, spec.head_dim) not in instances:
                raise NotImplementedError(
                    f"cuda: no {what} kernel for (dtype={spec.dtype}, head_dim={spec.head_dim}) in this build "
                    f"(built: {sorted(instances)}; an extension built before any-head-dim support serves only "
                    f"those); rebuild with FA3JAX_BUILD_CUDA=1, FA3JAX_HEAD_DIMS / FA3JAX_DTYPES")
        if spec.seqlen_k < 1:
            raise NotImplementedError("cuda: seqlen_k == 0 is not supported" if spec.mode == "dense" else
                                      "cuda: varlen with no key rows (total_k == 0) is not supported")
        if not spec.softmax_scale > 0:
            raise NotImplementedError("cuda: softmax_scale must be > 0")

    def _check_kvcache(self, spec: AttentionSpec) -> None:
        """Refusals of the KV-cache forward (csrc fwd_check's kvcache_check says the same in C++)."""
        ext, reason = _load_extension()
        if ext is None:
            raise NotImplementedError(reason)
        info = build_info()
        if targets.FEATURE_KVCACHE not in info.get("features", ()):
            raise NotImplementedError("cuda: this build of the CUDA extension predates the KV-cache forward; rebuild "
                                      "it with FA3JAX_BUILD_CUDA=1")
        dt = _DTYPE_NAMES.get(spec.dtype)
        if dt is None:
            raise NotImplementedError(f"cuda: dtype {spec.dtype} not supported (bfloat16, float16 only)")
        if spec.head_dim_v != spec.head_dim:
            raise NotImplementedError(f"cuda: no MLA KV-cache kernel (value head dim below the q/k one); got "
                                      f"{spec.head_dim_v=}, {spec.head_dim=}")
        if targets.FEATURE_ANY_HEAD_DIM in info.get("features", ()):
            if spec.head_dim % 8:
                # The dense path pads q/k/v to a multiple of 8; here that would copy the whole caches per call.
                raise NotImplementedError(f"cuda: the KV-cache forward needs a head dim that is a multiple of 8 "
                                          f"(zero-padding would copy the caches); got {spec.head_dim=}")
            # Every head dim some kernel serves, with the key block of the one the C++ dispatch picks for it and
            # which pages that split key blocks that kernel reads (C++ fwd_kvcache_page_reads: 0 none, 1 multiples
            # of 8 rows, 2 any; absent in older builds, which read them all).
            blocks = {(str(e[0]), int(e[1])): int(e[2]) for e in info.get("kvcache_head_dims", ())}
            page_reads = {(str(e[0]), int(e[1])): int(e[3]) for e in info.get("kvcache_head_dims", ()) if len(e) > 3}
        else:  # an extension built before any-head-dim support: the instances' own head dims only
            blocks = {(str(t), int(d)): int(n) for t, d, n in info.get("kvcache_instances", ())}
            page_reads = {}
        block_n = blocks.get((dt, spec.head_dim))
        if block_n is None:
            built = sorted((t, d) for t, d, _ in info.get("kvcache_instances", ()))
            raise NotImplementedError(
                f"cuda: no KV-cache kernel for (dtype={spec.dtype}, head_dim={spec.head_dim}) in this build (built: "
                f"{built}; any_head_dim builds serve head dims up to the largest); rebuild with FA3JAX_HEAD_DIMS / "
                f"FA3JAX_DTYPES")
        kv = spec.kvcache
        if kv.capacity < 1:
            raise NotImplementedError(f"cuda: an empty cache ({kv.capacity=}) is not supported")
        # Pages of a multiple of the key block hold whole key blocks (one TMA load each); other page sizes need a
        # kernel that reads key blocks spanning pages (C++ fwd_kvcache_load), which older builds lack.
        if kv.paged and kv.page_size % block_n:
            if targets.FEATURE_KVCACHE_ANY_PAGE not in info.get("features", ()):
                raise NotImplementedError(f"cuda: this build of the CUDA extension needs a page_size that is a "
                                          f"multiple of the kernel's key block {block_n}; got {kv.page_size=} "
                                          f"(rebuild it for any page size)")
            reads = page_reads.get((dt, spec.head_dim), 2)  # C++ fwd_kvcache_page_served says the same
            if reads < (1 if kv.page_size % 8 == 0 else 2):
                served = "a multiple of 8 rows or " if reads == 1 else ""
                raise NotImplementedError(f"cuda: the KV-cache kernel for head_dim={spec.head_dim} needs a page_size "
                                          f"that is {served}a multiple of its key block {block_n}; got "
                                          f"{kv.page_size=}")
        slot_rows = kv.page_size if kv.paged else kv.capacity
        if (kv.cache_batch * slot_rows + slot_rows + block_n >= 2**31
                or spec.batch * kv.seqlen_new + kv.seqlen_new + block_n >= 2**31):
            raise NotImplementedError(f"cuda: caches of {kv.cache_batch} x {slot_rows} rows (or {spec.batch} x "
                                      f"{kv.seqlen_new} new rows) exceed the kernel's int32 TMA coordinates")
        if not spec.softmax_scale > 0:
            raise NotImplementedError("cuda: softmax_scale must be > 0")
        tiles = -(-spec.seqlen_q // 64) * spec.num_heads_q * spec.batch
        if tiles > _MAX_TILES:
            raise NotImplementedError(f"cuda: {tiles=} query tiles exceed the kernel's int32 tile index")

    def check_forward(self, spec: AttentionSpec) -> None:
        if spec.mode == "kvcache":
            self._check_kvcache(spec)
            return
        if spec.mode not in ("dense", "varlen"):
            raise NotImplementedError(f"cuda: no forward kernel for mode {spec.mode!r} (dense and varlen only)")
        self._check_common(spec, "instances", "mla_instances", targets.FEATURE_MLA, "forward")
        features = build_info().get("features", ())
        if spec.has_sinks and targets.FEATURE_SINKS not in features:
            raise NotImplementedError("cuda: this build of the CUDA extension predates attention sinks; rebuild it "
                                      "with FA3JAX_BUILD_CUDA=1")
        rows = spec.seqlen_q
        if spec.mode == "varlen":
            if targets.FEATURE_VARLEN not in features:
                raise NotImplementedError("cuda: this build of the CUDA extension predates the varlen forward; "
                                          "rebuild it with FA3JAX_BUILD_CUDA=1")
            _check_varlen_views(spec)
            rows = min(spec.varlen.max_seqlen_q, spec.seqlen_q)  # the grid's query blocks per sequence
        tiles = -(-rows // 64) * spec.num_heads_q * spec.batch
        if tiles > _MAX_TILES:
            raise NotImplementedError(f"cuda: {tiles=} query tiles exceed the kernel's int32 tile index")

    def check_backward(self, spec: AttentionSpec) -> None:
        # Sinks need nothing here: the forward's LSE holds them, and vjp.sink_grad takes their own gradient.
        if spec.mode not in ("dense", "varlen"):
            # A cuda forward's LSE follows the shared convention, so the registry composes the next backend's
            # backward with it.
            raise NotImplementedError(f"cuda: the backward kernel serves dense and varlen calls (got {spec.mode!r})")
        # MLA pairs without a backward kernel (or an extension built before it) are composed likewise: triton's
        # (else xla's) MLA backward on this forward's LSE.
        self._check_common(spec, "bwd_instances", "bwd_mla_instances", targets.FEATURE_MLA_BWD, "backward")
        if spec.mode == "varlen":
            if targets.FEATURE_VARLEN_BWD not in build_info().get("features", ()):
                raise NotImplementedError("cuda: this build of the CUDA extension predates the varlen backward; "
                                          "rebuild it (FA3JAX_BUILD_CUDA=1 pip install .)")
            _check_varlen_views(spec)
        if spec.batch > _MAX_GRID_YZ or spec.num_heads_k > _MAX_GRID_YZ:
            raise NotImplementedError(f"cuda: the backward grid is (key blocks, heads_k, batch); {spec.batch=} and "
                                      f"{spec.num_heads_k=} must be <= {_MAX_GRID_YZ}")

    def forward(self, spec: AttentionSpec, q, k, v, args):
        self.check_forward(spec)
        ext, _ = _load_extension()
        _register_targets(ext)
        d = _kernel_head_dim(spec)
        if d != spec.head_dim:  # d_v == d here (MLA kernels are exact-match), so v and out pad alike
            out, lse = self._forward(spec, *(_pad_head_dim(x, d) for x in (q, k, v)), args)
            return out[..., :spec.head_dim], lse
        return self._forward(spec, q, k, v, args)

    def _forward(self, spec: AttentionSpec, q, k, v, args):
        """q, k, v with head dims that are multiples of 8 (the call's, or padded by forward)."""
        if spec.mode == "varlen":
            return self._varlen_forward(spec, q, k, v, args)
        b, sq, hq, _d = q.shape
        out_types = (
            jax.ShapeDtypeStruct((b, sq, hq, v.shape[-1]), q.dtype),  # v's head dim (MLA)
            jax.ShapeDtypeStruct((b, hq, sq), jnp.float32),
        )
        attrs = targets.fwd_attributes(spec, tuning.current())
        nbytes = _fwd_workspace_bytes()
        if spec.has_sinks:
            return _ffi_call(targets.FWD_SINKS_TARGET, out_types, nbytes, (q, k, v, _sinks(args)), attrs)
        return _ffi_call(targets.FWD_TARGET, out_types, nbytes, (q, k, v), attrs)

    def _varlen_forward(self, spec: AttentionSpec, q, k, v, args):
        """Packed q (total_q, hq, d), k (total_k, hk, d), v (total_k, hk, d_v) -> out (total_q, hq, d_v), lse (hq,
        total_q). The index arrays arrive sanitized (fa3jax.validation.sanitize_varlen); the kernel clamps them
        again for its own safety."""
        total_q, hq, _d = q.shape
        out_types = (jax.ShapeDtypeStruct((total_q, hq, v.shape[-1]), q.dtype),
                     jax.ShapeDtypeStruct((hq, total_q), jnp.float32))
        operands = [q, k, v, args.cu_seqlens_q, args.cu_seqlens_k]
        if spec.varlen.has_seqused_k:
            operands.append(args.seqused_k)
        if spec.has_sinks:
            operands.append(_sinks(args))
        return _ffi_call(targets.FWD_VARLEN_TARGET, out_types, _fwd_workspace_bytes(), operands,
                         targets.varlen_fwd_attributes(spec))

    def kvcache_forward(self, spec: AttentionSpec, q, k_cache, v_cache, args):
        """q (b, lq, hq, d) with rotary applied, the caches as the caller passed them (contiguous (slots, capacity,
        hk, d) or paged (num_pages, page_size, hk, d)) and the sanitized ``KVCacheArgs``: the kernel attends to each
        row's cache keys [leftpad, cache_seqlens) and then to its new keys where they are (k_new/v_new, not the
        cache: backends/base.py's contract), clamping every index again for its own safety. ``num_splits``
        (spec.kvcache.num_splits, 0 = automatic) is resolved to a count by the C++ rule at trace time (the count
        sizes the workspace result) and goes to the kernel, which cuts each row's key blocks into that many parts
        and merges them by LSE (sinks counted once); an extension built before split-KV runs one pass per row (equal
        results up to rounding)."""
        self.check_forward(spec)
        ext, _ = _load_extension()
        _register_targets(ext)
        kv = spec.kvcache
        b, lq, hq, d = spec.batch, spec.seqlen_q, spec.num_heads_q, spec.head_dim
        out_types = (jax.ShapeDtypeStruct((b, lq, hq, d), q.dtype), jax.ShapeDtypeStruct((b, hq, lq), jnp.float32))
        i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
        # The kernel clamps cache_seqlens as validation does (seq_info.h KVCacheSeq): the raw ones, where given,
        # leave the clamp no XLA op of its own.
        seqlens = args.cache_seqlens if args.raw_cache_seqlens is None else args.raw_cache_seqlens
        operands = [q, k_cache, v_cache, i32(seqlens)]
        if kv.seqlen_new:
            operands += [args.k_new.astype(q.dtype), args.v_new.astype(q.dtype)]
        if kv.has_cache_leftpad:
            operands.append(i32(args.leftpad))
        if kv.has_cache_batch_idx and not kv.paged:
            operands.append(i32(args.batch_idx))
        if kv.paged:
            operands.append(i32(args.page_table))
        if spec.has_sinks:
            operands.append(_sinks(args))
        splits = targets.FEATURE_KVCACHE_SPLITS in build_info().get("features", ())
        attrs = targets.kvcache_fwd_attributes(spec, splits=splits)
        nbytes = None
        if _has_workspace_result():
            # The split count resolved here (0 = automatic: the C++ rule on the current device's SMs) sizes the
            # workspace and goes to the handler, which keeps it (fwd_kvcache_num_splits returns a resolved count
            # unchanged), so the two agree on the layout whatever device runs the call.
            slot_rows = k_cache.shape[1]
            n_splits, nbytes = ext.kvcache_workspace(
                dtype=_DTYPE_NAMES[jnp.dtype(q.dtype).name], batch=b, seqlen_q=lq, heads_q=hq,
                heads_k=k_cache.shape[2], head_dim=d,
                capacity=args.page_table.shape[1] * slot_rows if kv.paged else slot_rows,
                seqlen_new=args.k_new.shape[1] if kv.seqlen_new else 0,
                requested=int(attrs[targets.ATTR_NUM_SPLITS]))
            attrs[targets.ATTR_NUM_SPLITS] = np.int32(n_splits)
        return _ffi_call(targets.FWD_KVCACHE_TARGET, out_types, nbytes, operands, attrs)

    def backward(self, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args):
        self.check_backward(spec)
        ext, _ = _load_extension()
        _register_targets(ext)
        d = _kernel_head_dim(spec)
        if d != spec.head_dim:  # d_v == d here, as in forward (MLA pairs are exact multiples of 8)
            # Zero columns of out and dout add nothing to rowsum(dO * O); those of the gradients are sliced off.
            q, k, v, out, dout = (_pad_head_dim(x, d) for x in (q, k, v, out, dout))
            return tuple(g[..., :spec.head_dim] for g in self._backward(spec, q, k, v, out, lse, dout, dlse, args))
        return self._backward(spec, q, k, v, out, lse, dout, dlse, args)

    def _backward(self, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args):
        """q, k, v, out, dout with head dims that are multiples of 8 (the call's, or padded by backward)."""
        out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                     jax.ShapeDtypeStruct(v.shape, v.dtype))
        operands = [q, k, v, out.astype(q.dtype), lse.astype(jnp.float32), dout.astype(q.dtype),
                    dlse.astype(jnp.float32)]
        varlen = spec.mode == "varlen"
        if varlen:  # packed rows, lse (hq, total_q); index arrays sanitized by validation
            operands += [args.cu_seqlens_q, args.cu_seqlens_k]
            if spec.varlen.has_seqused_k:
                operands.append(args.seqused_k)
            target, attrs = targets.BWD_VARLEN_TARGET, targets.varlen_bwd_attributes(spec)
            batch, rows = args.cu_seqlens_q.shape[0] - 1, q.shape[0]  # sequences, total_q (as the handler reads)
        else:
            target, attrs = targets.BWD_TARGET, targets.bwd_attributes(spec)
            batch, rows = q.shape[0], q.shape[1]
        nbytes = None
        if _has_workspace_result():
            ext, _ = _load_extension()
            nbytes = ext.bwd_workspace_bytes(
                dtype=_DTYPE_NAMES[jnp.dtype(q.dtype).name], batch=batch, seqlen_q=rows, heads_q=q.shape[-2],
                head_dim=q.shape[-1], head_dim_v=v.shape[-1],
                window_left=int(attrs[targets.ATTR_WINDOW_LEFT]), window_right=int(attrs[targets.ATTR_WINDOW_RIGHT]),
                softcap=float(attrs[targets.ATTR_SOFTCAP]), deterministic=bool(attrs[targets.ATTR_DETERMINISTIC]),
                varlen=varlen)
        return _ffi_call(target, out_types, nbytes, operands, attrs)


def _has_workspace_result() -> bool:
    """Whether the extension's targets take their workspace as a last result (older builds use XLA scratch)."""
    return targets.FEATURE_WORKSPACE_RESULT in build_info().get("features", ())


def _fwd_workspace_bytes():
    """The dense and varlen forwards' workspace size (the tile counter), or None for an older extension."""
    if not _has_workspace_result():
        return None
    ext, _ = _load_extension()
    return ext.fwd_workspace_bytes()


def _ffi_call(target: str, out_types, nbytes, operands, attrs: dict) -> tuple:
    """``target``'s outputs of ``out_types``. ``nbytes``: the size of the workspace result the handler takes last (a
    1-D uint8 buffer; XLA reuses its memory after the call like any temporary), dropped here; None: an extension
    built before it, no such result."""
    if nbytes is not None:
        out_types = (*out_types, jax.ShapeDtypeStruct((int(nbytes),), jnp.uint8))
    outs = tuple(jax.ffi.ffi_call(target, out_types, vmap_method="sequential")(*operands, **attrs))
    return outs[:-1] if nbytes is not None else outs


def _kernel_head_dim(spec: AttentionSpec) -> int:
    """The head dim the kernels see: the call's, rounded up to a multiple of 8. TMA needs 16-byte global strides, so
    a head dim of 2-byte elements that is not a multiple of 8 cannot be read in place (q's head stride is d); such
    calls get zero-padded copies (zero columns change no score and give output columns that are sliced off).
    Multiples of 8 below the kernel's width need no copy: the kernel's TMA loads zero-fill the missing columns."""
    return -(-spec.head_dim // 8) * 8


def _pad_head_dim(x, d: int):
    """x with its last axis zero-padded to d."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d - x.shape[-1])])


def _sinks(args):
    """The (hq,) float32 sinks of a call whose spec has them."""
    if args is None or args.sinks is None:
        raise ValueError("cuda: spec.has_sinks but the args carry no sinks")
    return jnp.asarray(args.sinks, jnp.float32)


__all__ = ["CudaBackend", "build_info"]
