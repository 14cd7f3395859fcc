"""The implementations compared: fa3jax's backends, flash-attn3-jax and jax.nn.dot_product_attention, per suite."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

import fa3jax
from fa3jax import registry

from .common import DENSE, DTYPES, FA3_NAME
from .env import flash_attn3, on_gpu

@dataclasses.dataclass
class Impl:
    """One implementation. ``check(cfg)`` returns '' when it can run ``cfg`` else why not; ``forward(cfg)``
    returns ``f(q, k, v) -> out``; ``note(cfg)`` says anything worth recording (e.g. a composed backward)."""

    name: str
    forward: Callable
    check: Callable = lambda cfg: ""
    note: Callable = lambda cfg: ""
    sinks: bool = False  # forward(cfg) takes (q, k, v, sinks): sinks (hq,) float32, differentiated in fwd+bwd
    deterministic: bool = False  # forward(cfg) calls flash_mha(..., deterministic=True); same arguments


SINKS = "+sinks"  # suffix of an fa3jax impl's variant called with sinks= (the attn suite's --sinks)
DET = "+det"  # suffix of an fa3jax impl's variant called with deterministic=True (the attn suite's --deterministic)
VARIANTS = (SINKS, DET)  # each variant's row carries "<suffix without +>_ratio": its time / the plain impl's


def variant_suffix(name: str) -> Optional[str]:
    """The variant suffix ``name`` ends with (``+sinks``, ``+det``), None for a plain impl."""
    return next((v for v in VARIANTS if name.endswith(v)), None)


def ratio_field(suffix: str) -> str:
    """The row field holding a variant's time ratio to its plain impl: ``+sinks`` -> ``sinks_ratio``."""
    return suffix.lstrip("+") + "_ratio"


def fa3jax_impl(backend: str, sinks: bool = False, deterministic: bool = False) -> Impl:
    """``flash_mha(..., backend=backend)``; with ``sinks``, the variant ``fa3jax:<backend>+sinks`` whose forward
    takes a 4th argument, the per-head sink logits; with ``deterministic``, the variant ``fa3jax:<backend>+det``
    (``deterministic=True``: a fixed-order backward, which may cost time or pick another backward backend)."""
    def forward(cfg):
        kw = dict(is_causal=cfg.causal, deterministic=deterministic, backend=backend)
        if sinks:
            return lambda q, k, v, s: fa3jax.flash_mha(q, k, v, sinks=s, **kw)
        return lambda q, k, v: fa3jax.flash_mha(q, k, v, **kw)

    def support(cfg):
        q, k, v = (jax.ShapeDtypeStruct(shape, DTYPES[cfg.dtype]) for shape in (cfg.shape, cfg.shape_k, cfg.shape_v))
        s = jax.ShapeDtypeStruct((cfg.heads,), jnp.float32) if sinks else None
        return fa3jax.supports(fa3jax.flash_mha, q, k, v, backend=backend, is_causal=cfg.causal, sinks=s,
                               deterministic=deterministic)

    name = f"fa3jax:{backend}" + (SINKS if sinks else "") + (DET if deterministic else "")
    return Impl(name, forward, *_support_checks(support, backend), sinks=sinks, deterministic=deterministic)


def with_variants(impls: list[Impl], sinks: bool = False, deterministic: bool = False) -> list[Impl]:
    """``impls`` with each plain fa3jax impl followed by its ``+sinks`` variant (``sinks``) and its ``+det``
    variant (``deterministic``; without sinks, so that its ratio isolates deterministic=True). Adjacent:
    interleaved rounds then time each variant and its plain impl under the same clocks."""
    out = []
    for impl in impls:
        out.append(impl)
        if impl.name.startswith("fa3jax:") and not (impl.sinks or impl.deterministic):
            backend = impl.name.split(":", 1)[1]
            out += [fa3jax_impl(backend, sinks=True)] if sinks else []
            out += [fa3jax_impl(backend, deterministic=True)] if deterministic else []
    return out


def _no_mla(cfg, who: str) -> str:
    """Why ``who`` cannot run an MLA config ('' for a config without one)."""
    return f"{who}: v's head dim must equal q/k's (no MLA)" if getattr(cfg, "headdim_v", None) else ""


def _support_checks(support: Callable, backend: str) -> tuple[Callable, Callable]:
    """``check`` and ``note`` of an fa3jax impl from ``support(cfg) -> fa3jax.Support``."""

    def check(cfg):
        s = support(cfg)
        if not s.supported:
            return s.reason
        if cfg.mode == "fwd+bwd" and s.backward is None:
            return f"no backward: {s.reason}"
        return ""

    def note(cfg):
        s = support(cfg)
        if backend == "auto":  # which backends auto chose for this row
            return s.forward if cfg.mode != "fwd+bwd" else f"{s.forward} fwd, {s.backward} bwd"
        if cfg.mode != "fwd+bwd":
            return ""
        return f"backward by {s.backward}" if s.backward and s.backward != backend else ""

    return check, note


def _fa3_impl(mod) -> Impl:
    def forward(cfg):
        return lambda q, k, v: mod.flash_mha(q, k, v, is_causal=cfg.causal)

    def check(cfg):
        if not on_gpu():
            return "flash-attn3-jax needs a GPU"
        if cfg.dtype not in ("bf16", "fp16"):
            return "flash-attn3-jax: bf16/fp16 only"
        return _no_mla(cfg, "flash-attn3-jax")

    return Impl(FA3_NAME, forward, check)


def _jax_nn_impl(implementation: str) -> Impl:
    def forward(cfg):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=cfg.causal,
                                                            implementation=implementation)

    def check(cfg):
        if implementation == "cudnn" and not on_gpu():
            return "cudnn needs an NVIDIA GPU"
        return _no_mla(cfg, "jax.nn.dot_product_attention")

    return Impl(f"jax.nn:{implementation}", forward, check)


def attn_impls() -> tuple[list[Impl], dict]:
    """Every implementation that could run in this process, and {name: reason} for those that cannot at all."""
    impls, skipped = [], {}
    if on_gpu():  # what a user gets by default: the registry's forward and backward choice per row
        impls.append(fa3jax_impl("auto"))
    for name, ok, reason in fa3jax.backends_info():
        if ok:
            impls.append(fa3jax_impl(name))
        else:
            skipped[f"fa3jax:{name}"] = reason or "unavailable"
    mod, reason = flash_attn3()
    if mod is not None:
        impls.append(_fa3_impl(mod))
    else:
        skipped[FA3_NAME] = reason
    for implementation in ("cudnn", "xla"):
        impls.append(_jax_nn_impl(implementation))
    return impls, skipped


ALL_ATTN_IMPL_NAMES = (("fa3jax:auto",) + tuple(f"fa3jax:{n}" for n in registry.ORDER)
                       + (FA3_NAME, "jax.nn:cudnn", "jax.nn:xla"))


@dataclasses.dataclass
class DecodeImpl:
    """A KV-cache impl (decode and prefill suites); ``note(cfg)``: which backend ``auto`` chose."""

    name: str
    fn: Callable  # f(q, kc, vc, seqlens, page_table) -> out
    check: Callable = lambda cfg: ""
    group: str = ""  # rows with the same group are variants of one impl ("best" is taken over them)
    note: Callable = lambda cfg: ""


def _kvcache_shapes(cfg):
    """ShapeDtypeStructs (q, cache, cache_seqlens, page_table) of a decode or prefill config."""
    dt = DTYPES[cfg.dtype]
    q = jax.ShapeDtypeStruct((cfg.batch, cfg.q_len, cfg.heads_q, cfg.headdim), dt)
    if cfg.layout == "paged":
        npg = cfg.batch * (cfg.cache // cfg.page_size)
        c = jax.ShapeDtypeStruct((npg, cfg.page_size, cfg.heads_k, cfg.headdim), dt)
        pt = jax.ShapeDtypeStruct((cfg.batch, cfg.cache // cfg.page_size), jnp.int32)
    else:
        c = jax.ShapeDtypeStruct((cfg.batch, cfg.cache, cfg.heads_k, cfg.headdim), dt)
        pt = None
    return q, c, jax.ShapeDtypeStruct((cfg.batch,), jnp.int32), pt


def fa3jax_kvcache_impl(backend: str, causal: bool = False) -> DecodeImpl:
    """``flash_mha_with_kvcache(..., num_splits=0, backend=backend)`` (``causal``: bottom-right, for prefill)."""

    def fn(q, kc, vc, sl, pt):
        return fa3jax.flash_mha_with_kvcache(q, kc, vc, cache_seqlens=sl, page_table=pt, is_causal=causal,
                                             num_splits=0, backend=backend)

    def support(cfg):
        q, c, sl, pt = _kvcache_shapes(cfg)
        return fa3jax.supports(fa3jax.flash_mha_with_kvcache, q, c, c, cache_seqlens=sl, page_table=pt,
                               is_causal=causal, num_splits=0, backend=backend)

    def check(cfg):
        s = support(cfg)
        return "" if s.supported else s.reason

    def note(cfg):  # the registry's choice for this row
        return f"auto: {support(cfg).forward}" if backend == "auto" else ""

    return DecodeImpl(f"fa3jax:{backend}", fn, check, note=note)


def kvcache_impls(causal: bool = False) -> tuple[list[DecodeImpl], dict]:
    """fa3jax's backends (and ``auto`` on a GPU) with ``num_splits=0``, and flash-attn3-jax with num_splits 1, 4
    and 16 (group ``flash-attn3-jax``): the decode suite's impls, or with ``causal`` the prefill suite's."""
    impls, skipped = [], {}
    if on_gpu():  # what a user gets by default; per-call timing (--per-call) judges its choice with dispatch
        impls.append(fa3jax_kvcache_impl("auto", causal))
    for name, ok, reason in fa3jax.backends_info():
        if ok:
            impls.append(fa3jax_kvcache_impl(name, causal))
        else:
            skipped[f"fa3jax:{name}"] = reason or "unavailable"
    mod, reason = flash_attn3()
    if mod is None:
        skipped[FA3_NAME] = reason
    else:
        for splits in (1, 4, 16):
            def fn(q, kc, vc, sl, pt, _s=splits):
                return mod.flash_mha_with_kvcache(q, kc, vc, cache_seqlens=sl, page_table=pt, is_causal=causal,
                                                  num_splits=_s)

            impls.append(DecodeImpl(f"{FA3_NAME}:s{splits}", fn,
                                    lambda cfg: "" if on_gpu() else "flash-attn3-jax needs a GPU", group=FA3_NAME))
    return impls, skipped


def decode_impls() -> tuple[list[DecodeImpl], dict]:
    return kvcache_impls(causal=False)


def prefill_impls() -> tuple[list[DecodeImpl], dict]:
    return kvcache_impls(causal=True)


@dataclasses.dataclass
class VarlenImpl:
    """A varlen impl (``forward(cfg)`` returns ``f(q, k, v, cu_seqlens) -> out`` on packed tokens) and its
    dense-equal-tokens baseline, an attn-suite :class:`Impl` run on ``cfg.dense()`` (None: no baseline)."""

    name: str
    varlen: Impl
    dense: Optional[Impl]


ALL_VARLEN_IMPL_NAMES = ("fa3jax:cuda", "fa3jax:triton", "fa3jax:xla", FA3_NAME)


def fa3jax_varlen_impl(backend: str) -> Impl:
    def forward(cfg):
        m = cfg.max_seqlen
        return lambda q, k, v, cu: fa3jax.flash_mha_varlen(q, k, v, cu, cu, max_seqlen_q=m, max_seqlen_k=m,
                                                           is_causal=cfg.causal, backend=backend)

    def support(cfg):
        sds = jax.ShapeDtypeStruct(cfg.shape, DTYPES[cfg.dtype])
        cu = jax.ShapeDtypeStruct((cfg.seqs + 1,), jnp.int32)
        return fa3jax.supports(fa3jax.flash_mha_varlen, sds, sds, sds, cu, cu, max_seqlen_q=cfg.max_seqlen,
                               max_seqlen_k=cfg.max_seqlen, is_causal=cfg.causal, backend=backend)

    return Impl(f"fa3jax:{backend}", forward, *_support_checks(support, backend))


def _fa3_varlen_impl(mod) -> Impl:
    def forward(cfg):
        m = cfg.max_seqlen
        # by keyword: 0.2.3 has seqused_k between cu_seqlens_k and max_seqlen_q, which its README omits
        return lambda q, k, v, cu: mod.flash_mha_varlen(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m,
                                                        max_seqlen_k=m, is_causal=cfg.causal)

    def check(cfg):
        if not hasattr(mod, "flash_mha_varlen"):
            return "flash_attn3_jax has no flash_mha_varlen"
        return _fa3_impl(mod).check(cfg)

    return Impl(FA3_NAME, forward, check)


def varlen_impls() -> tuple[list[VarlenImpl], dict]:
    impls, skipped = [], {}
    for name, ok, reason in fa3jax.backends_info():
        if ok:
            impls.append(VarlenImpl(f"fa3jax:{name}", fa3jax_varlen_impl(name),
                                    dataclasses.replace(fa3jax_impl(name), name=f"{DENSE}fa3jax:{name}")))
        else:
            skipped[f"fa3jax:{name}"] = reason or "unavailable"
    mod, reason = flash_attn3()
    if mod is not None:
        impls.append(VarlenImpl(FA3_NAME, _fa3_varlen_impl(mod),
                                dataclasses.replace(_fa3_impl(mod), name=DENSE + FA3_NAME)))
    else:
        skipped[FA3_NAME] = reason
    return impls, skipped
