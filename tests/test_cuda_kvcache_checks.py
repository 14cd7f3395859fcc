"""CPU tests of the cuda backend's KV-cache plumbing, with a stand-in for the compiled extension: which calls it
refuses (so that the registry falls back to triton/xla), the FFI operands and attributes it passes, and the
``auto`` order that keeps triton first for KV-cache calls. The kernel itself is tested on the GPU
(tests/test_cuda_backend.py, csrc/tests/test_kvcache.cu)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fa3jax import registry, validation
from fa3jax.backends import cuda
from fa3jax.backends.cuda import targets

S = jax.ShapeDtypeStruct
BF = jnp.bfloat16


class _FakeExt:
    def handlers(self):
        return {}


def _info(features=("sinks", "varlen", "varlen_bwd", "mla", "kvcache"), kv=(("bf16", 128, 128),)):
    return {"features": list(features), "kvcache_instances": list(kv), "instances": [("bf16", 128)],
            "bwd_instances": [("bf16", 128)], "mla_instances": []}


@pytest.fixture
def built(monkeypatch):
    """A cuda backend whose extension 'was built' with bf16 d=128 (key block 128) and the KV-cache target."""
    state = {"info": _info()}
    monkeypatch.setattr(cuda, "_load_extension", lambda: (_FakeExt(), None))
    monkeypatch.setattr(cuda, "build_info", lambda: state["info"])
    monkeypatch.setattr(cuda, "_register_targets", lambda ext: None)
    return state


def _spec(q_shape=(2, 3, 8, 128), cache=(2, 512, 2, 128), dtype=BF, *, page_table=None, new=0, batch_idx=None,
          leftpad=None, sinks=None, v_dim=None):
    b, lq, hq, d = q_shape
    q = S(q_shape, dtype)
    kc = S(cache, dtype)
    vc = S(cache[:3] + (v_dim or cache[3],), dtype)
    k = v = None
    if new:
        k = v = S((b, new, cache[2], cache[3]), dtype)
    return validation.validate_kvcache(
        q, kc, vc, k, v, jnp.zeros((b,), jnp.int32) + 1, batch_idx, leftpad, page_table, None, None, True,
        softmax_scale=None, is_causal=True, window_size=(-1, -1), softcap=0.0, num_splits=0,
        return_softmax_lse=True, return_updated_cache=False, sinks=sinks)


def test_serves_contiguous_paged_and_options(built):
    be = cuda.CudaBackend()
    be.check_forward(_spec())
    be.check_forward(_spec(new=3, leftpad=jnp.zeros((2,), jnp.int32), sinks=jnp.zeros((8,), jnp.float32)))
    be.check_forward(_spec(cache=(5, 512, 2, 128), batch_idx=jnp.asarray([4, 0], jnp.int32)))
    be.check_forward(_spec(cache=(9, 256, 2, 128), page_table=jnp.zeros((2, 4), jnp.int32)))
    be.check_forward(_spec(cache=(9, 128, 2, 128), page_table=jnp.zeros((2, 4), jnp.int32), new=1))


@pytest.mark.parametrize("make, words", [
    (lambda: _spec(q_shape=(2, 3, 8, 128), cache=(2, 512, 2, 128), dtype=jnp.float32), "dtype float32"),
    (lambda: _spec(q_shape=(2, 3, 8, 64), cache=(2, 512, 2, 64)), "no KV-cache kernel for .*head_dim=64"),
    # A build without kvcache_any_page (the fixture's) reads a key block from one page only.
    (lambda: _spec(cache=(9, 64, 2, 128), page_table=jnp.zeros((2, 4), jnp.int32)), "page_size that is a multiple of"),
    (lambda: _spec(cache=(9, 192, 2, 128), page_table=jnp.zeros((2, 4), jnp.int32)), "page_size that is a multiple of"),
    (lambda: _spec(cache=(9, 1, 2, 128), page_table=jnp.zeros((2, 4), jnp.int32)), "rebuild it for any page size"),
    (lambda: _spec(cache=(2, 0, 2, 128)), "empty cache"),
])
def test_refuses_what_the_kernel_cannot_serve(built, make, words):
    with pytest.raises(NotImplementedError, match=words):
        cuda.CudaBackend().check_forward(make())


_ANY_PAGE = ("sinks", "varlen", "varlen_bwd", "mla", "kvcache", targets.FEATURE_KVCACHE_ANY_PAGE)


@pytest.mark.parametrize("page_size", [1, 3, 8, 12, 16, 64, 100, 128, 192, 200, 256, 264, 300])
@pytest.mark.parametrize("new", [0, 2])
def test_any_page_build_serves_every_page_size(built, page_size, new):
    """An extension with kvcache_any_page serves page sizes that are not multiples of the key block (TMA boxes
    inside pages or the producer's row gather, chosen in C++) as well as multiples, with appended keys too."""
    built["info"] = _info(features=_ANY_PAGE)
    pt = jnp.zeros((2, max(4, -(-300 // page_size))), jnp.int32)
    cuda.CudaBackend().check_forward(_spec(cache=(9, page_size, 2, 128), page_table=pt, new=new))


def test_any_page_build_refuses_caches_past_int32_coordinates(built):
    """The kernel's page-box coordinates are int32 (C++ kvcache_check's rule): a pool of pages x page_size rows
    at 2^31 is refused with the reason, whatever the page size."""
    built["info"] = _info(features=_ANY_PAGE)
    be = cuda.CudaBackend()
    for page_size in (3, 64, 256):
        pages = 2**31 // page_size
        with pytest.raises(NotImplementedError, match="int32"):
            be.check_forward(_spec(cache=(pages, page_size, 2, 128), page_table=jnp.zeros((2, 4), jnp.int32)))


def _any_dim_info():
    """A build with any_head_dim: bf16 kernels d=64 (key block 128) and d=256 (key block 80); kvcache_head_dims lists
    every multiple of 8 they serve with the key block of the kernel the C++ dispatch picks (stand-in values)."""
    info = _info(features=("sinks", "varlen", "varlen_bwd", "mla", "kvcache", "any_head_dim"),
                 kv=(("bf16", 64, 128), ("bf16", 256, 80)))
    info["kvcache_head_dims"] = [("bf16", d, 128 if d <= 64 else 80) for d in range(8, 257, 8)]
    return info


def test_any_head_dim_build_serves_head_dims_between_its_kernels(built):
    """Head dims (multiples of 8) without a kernel of their own are accepted, and a paged cache's page size is checked
    against the key block of the kernel that serves the head dim (the C++ choice, read from kvcache_head_dims)."""
    built["info"] = _any_dim_info()
    be = cuda.CudaBackend()
    for d in (8, 40, 64, 96, 200, 256):
        be.check_forward(_spec(q_shape=(2, 3, 8, d), cache=(2, 512, 2, d), new=2))
    be.check_forward(_spec(q_shape=(2, 3, 8, 40), cache=(9, 256, 2, 40), page_table=jnp.zeros((2, 4), jnp.int32)))
    be.check_forward(_spec(q_shape=(2, 3, 8, 96), cache=(9, 160, 2, 96), page_table=jnp.zeros((2, 4), jnp.int32)))
    with pytest.raises(NotImplementedError, match="multiple of the kernel's key block 80"):
        be.check_forward(_spec(q_shape=(2, 3, 8, 96), cache=(9, 128, 2, 96), page_table=jnp.zeros((2, 4), jnp.int32)))
    with pytest.raises(NotImplementedError, match="multiple of the kernel's key block 128"):
        be.check_forward(_spec(q_shape=(2, 3, 8, 40), cache=(9, 80, 2, 40), page_table=jnp.zeros((2, 4), jnp.int32)))
    # ... which a build with kvcache_any_page serves.
    built["info"]["features"].append(targets.FEATURE_KVCACHE_ANY_PAGE)
    be.check_forward(_spec(q_shape=(2, 3, 8, 96), cache=(9, 128, 2, 96), page_table=jnp.zeros((2, 4), jnp.int32)))
    be.check_forward(_spec(q_shape=(2, 3, 8, 40), cache=(9, 80, 2, 40), page_table=jnp.zeros((2, 4), jnp.int32)))


@pytest.mark.parametrize("reads", [0, 1, 2])
def test_page_sizes_that_split_key_blocks_follow_the_kernels_page_reads(built, reads):
    """kvcache_head_dims' fourth field (C++ fwd_kvcache_page_reads) says which pages that split the key blocks of the
    kernel serving a head dim it reads: 0 none, 1 multiples of 8 rows (page boxes), 2 any (the row gather too);
    pages of whole key blocks are always served, the others refused with the reason, whatever the build's
    kvcache_any_page feature says."""
    info = _any_dim_info()
    info["features"].append(targets.FEATURE_KVCACHE_ANY_PAGE)
    info["kvcache_head_dims"] = [(t, d, n, 2 if d <= 64 else reads) for t, d, n in info["kvcache_head_dims"]]
    built["info"] = info
    be = cuda.CudaBackend()
    pt = jnp.zeros((2, 4), jnp.int32)
    be.check_forward(_spec(q_shape=(2, 3, 8, 40), cache=(9, 3, 2, 40), page_table=pt))  # d <= 64: any page
    be.check_forward(_spec(q_shape=(2, 3, 8, 96), cache=(9, 160, 2, 96), page_table=pt))  # whole 80-key blocks
    for rows in (3, 12, 64, 256):
        if reads >= (1 if rows % 8 == 0 else 2):
            be.check_forward(_spec(q_shape=(2, 3, 8, 96), cache=(9, rows, 2, 96), page_table=pt))
            continue
        served = "a multiple of 8 rows or " if reads == 1 else ""
        with pytest.raises(NotImplementedError, match=rf"head_dim=96 needs a page_size that is {served}a multiple of "
                                                      rf"its key block 80; got kv.page_size={rows}"):
            be.check_forward(_spec(q_shape=(2, 3, 8, 96), cache=(9, rows, 2, 96), page_table=pt))


@pytest.mark.parametrize("d, words", [(59, "multiple of 8 .*head_dim=59"), (3, "multiple of 8 .*head_dim=3")])
def test_any_head_dim_build_refuses_head_dims_that_are_not_multiples_of_8(built, d, words):
    """The dense path pads such head dims; the KV-cache one would have to copy the caches, so it falls back."""
    built["info"] = _any_dim_info()
    with pytest.raises(NotImplementedError, match=words):
        cuda.CudaBackend().check_forward(_spec(q_shape=(2, 3, 8, d), cache=(2, 512, 2, d)))


def test_any_head_dim_build_refuses_head_dims_above_its_widest_kernel(built):
    info = _any_dim_info()
    info["kvcache_head_dims"] = [x for x in info["kvcache_head_dims"] if x[1] <= 64]
    info["kvcache_instances"] = [("bf16", 64, 128)]
    built["info"] = info
    with pytest.raises(NotImplementedError, match=r"no KV-cache kernel for .*head_dim=72"):
        cuda.CudaBackend().check_forward(_spec(q_shape=(2, 3, 8, 72), cache=(2, 512, 2, 72)))


def test_refuses_mla_cache(built):
    spec = _spec().replace(head_dim_v=64)  # validation allows no MLA cache yet; the backend refuses one anyway
    with pytest.raises(NotImplementedError, match="MLA"):
        cuda.CudaBackend().check_forward(spec)


def test_refuses_an_extension_built_before_the_kvcache_target(built):
    built["info"] = _info(features=("sinks", "varlen", "varlen_bwd", "mla"), kv=())
    with pytest.raises(NotImplementedError, match="predates the KV-cache forward"):
        cuda.CudaBackend().check_forward(_spec())


def test_refuses_without_the_extension():
    if cuda._load_extension()[0] is not None:
        pytest.skip("the CUDA extension is built here")
    with pytest.raises(NotImplementedError, match="without the CUDA extension"):
        cuda.CudaBackend().check_forward(_spec())


def test_the_backward_stays_refused(built):
    with pytest.raises(NotImplementedError, match="dense and varlen"):
        cuda.CudaBackend().check_backward(_spec())


@pytest.mark.parametrize("splits_feature", [False, True], ids=["pre-splits-build", "splits-build"])
@pytest.mark.parametrize("paged", [False, True])
def test_ffi_operands_and_attributes(built, monkeypatch, paged, splits_feature):
    """The operands follow the FFI target's order (q, k_cache, v_cache, cache_seqlens, then k_new/v_new, leftpad,
    batch_idx, page_table, sinks as the int32 flags announce) with the sanitized index arrays; num_splits goes to an
    extension that takes it (FEATURE_KVCACHE_SPLITS) as the caller gave it, and to none other (its handler binds no
    such attribute)."""
    if splits_feature:
        built["info"]["features"].append(targets.FEATURE_KVCACHE_SPLITS)
    calls = []

    def fake_ffi_call(target, out_types, vmap_method=None):
        def run(*operands, **attrs):
            calls.append((target, operands, attrs))
            return tuple(jnp.zeros(t.shape, t.dtype) for t in out_types)
        return run

    monkeypatch.setattr(jax.ffi, "ffi_call", fake_ffi_call)
    rng = np.random.default_rng(3)
    b, lq, hq, hk, d = 2, 3, 8, 2, 128
    q = jnp.asarray(rng.standard_normal((b, lq, hq, d)), BF)
    shape = (6, 128, hk, d) if paged else (4, 300, hk, d)
    kc = jnp.asarray(rng.standard_normal(shape), BF)
    kn = jnp.asarray(rng.standard_normal((b, 2, hk, d)), BF)
    sinks = jnp.asarray(rng.standard_normal(hq), jnp.float32)
    lens = jnp.asarray([500, -3], jnp.int32)  # hostile: sanitized before the backend sees them
    idx = jnp.asarray([3, 9], jnp.int32)  # 9 is out of range: sanitized to slot 0 with an empty cache
    pt = jnp.asarray([[5, 1], [2, 77], [0, 3], [4, 4]], jnp.int32) if paged else None
    leftpad = None if paged else jnp.asarray([7, 1], jnp.int32)
    spec = validation.validate_kvcache(q, kc, kc, kn, kn, lens, idx, leftpad, pt, None, None, True,
                                       softmax_scale=None, is_causal=False, window_size=(16, 4), softcap=5.0,
                                       num_splits=3, return_softmax_lse=True, return_updated_cache=False,
                                       sinks=sinks)
    args, _ = validation.sanitize_kvcache(spec, lens, idx, leftpad, pt, kn, kn, sinks)
    out, lse = cuda.CudaBackend().kvcache_forward(spec, q, kc, kc, args)
    assert out.shape == (b, lq, hq, d) and out.dtype == BF and lse.shape == (b, hq, lq) and lse.dtype == jnp.float32
    (target, ops, attrs), = calls
    assert target == targets.FWD_KVCACHE_TARGET
    assert ops[0] is q and ops[1] is kc and ops[2] is kc
    np.testing.assert_array_equal(ops[3], np.asarray(args.cache_seqlens))
    assert ops[4] is kn and ops[5] is kn
    rest = list(ops[6:])
    if not paged:
        np.testing.assert_array_equal(rest.pop(0), np.asarray(args.leftpad))
        np.testing.assert_array_equal(rest.pop(0), [3, 0])  # batch_idx, sanitized
    else:
        np.testing.assert_array_equal(rest.pop(0), [[4, 4], [-1, -1]])  # table rows gathered by batch_idx
    np.testing.assert_array_equal(rest.pop(0), np.asarray(sinks))
    assert not rest
    assert attrs == {**attrs, targets.ATTR_HAS_NEW: 1, targets.ATTR_HAS_LEFTPAD: int(not paged),
                     targets.ATTR_HAS_BATCH_IDX: int(not paged), targets.ATTR_HAS_PAGE_TABLE: int(paged),
                     targets.ATTR_HAS_SINKS: 1, targets.ATTR_WINDOW_LEFT: 16, targets.ATTR_WINDOW_RIGHT: 4}
    assert all(isinstance(v, (np.int32, np.float32)) for v in attrs.values()), attrs
    np.testing.assert_allclose(attrs[targets.ATTR_SOFTCAP], 5.0)
    if splits_feature:
        assert attrs[targets.ATTR_NUM_SPLITS] == 3
    else:
        assert targets.ATTR_NUM_SPLITS not in attrs


@pytest.mark.parametrize("requested, passed", [(0, 0), (1, 1), (7, 7), (10**12, 2**31 - 1)])
def test_num_splits_attribute(requested, passed):
    """num_splits reaches the handler unchanged (0 = automatic: the C++ rule chooses), clipped to int32 (the kernel
    caps it at its kMaxSplits and the key blocks anyway); the plain attributes carry none."""
    b = 2
    spec = validation.validate_kvcache(
        S((b, 1, 8, 128), BF), S((b, 512, 2, 128), BF), S((b, 512, 2, 128), BF), None, None,
        jnp.zeros((b,), jnp.int32) + 1, None, None, None, None, None, True, softmax_scale=None, is_causal=True,
        window_size=(-1, -1), softcap=0.0, num_splits=requested, return_softmax_lse=True,
        return_updated_cache=False)
    attrs = targets.kvcache_fwd_attributes(spec)
    assert isinstance(attrs[targets.ATTR_NUM_SPLITS], np.int32) and attrs[targets.ATTR_NUM_SPLITS] == passed
    assert targets.ATTR_NUM_SPLITS not in targets.kvcache_fwd_attributes(spec, splits=False)


def test_negative_num_splits_is_refused_before_any_backend():
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        _ = validation.validate_kvcache(
            S((2, 1, 8, 128), BF), S((2, 512, 2, 128), BF), S((2, 512, 2, 128), BF), None, None,
            jnp.zeros((2,), jnp.int32) + 1, None, None, None, None, None, True, softmax_scale=None, is_causal=True,
            window_size=(-1, -1), softcap=0.0, num_splits=-1, return_softmax_lse=True, return_updated_cache=False)


class _Fake:
    def __init__(self, name, serves):
        self.name, self.serves = name, serves

    def check_forward(self, spec):
        if not self.serves:
            raise NotImplementedError(f"{self.name}: refuses")

    def check_backward(self, spec):
        raise NotImplementedError(f"{self.name}: no backward")


@pytest.mark.parametrize("triton_serves, want", [(True, "triton"), (False, "cuda")])
def test_auto_tries_triton_before_cuda_for_decode_sized_kvcache(monkeypatch, triton_serves, want):
    """Under auto, decode-sized KV-cache calls (seqlen_q x group <= 64 rows per kv head) go to triton first, then
    cuda; larger ones (chunked prefill) and dense calls keep cuda first."""
    fakes = {"cuda": _Fake("cuda", True), "cudnn": _Fake("cudnn", False), "triton": _Fake("triton", triton_serves),
             "xla": _Fake("xla", True)}
    monkeypatch.setattr(registry, "availability", lambda name: (True, ""))
    monkeypatch.setattr(registry, "get", lambda name: fakes[name])
    decode = _spec(q_shape=(2, 1, 8, 128))  # 1 query x group 4 = 4 rows per kv head
    plan = registry.plan(decode, "auto")
    assert plan.forward == want
    if want == "triton":
        assert any("triton is tried before cuda" in n for n in plan.notes), plan.notes
    assert registry.plan(decode, "cuda").forward == "cuda"
    assert registry.auto_order(decode)[:2] == ("triton", "cuda")
    # the boundary: 16 queries x group 4 = 64 rows is decode-sized, 17 x 4 = 68 is not
    assert registry.kvcache_decode_sized(_spec(q_shape=(2, 16, 8, 128)))
    prefill = _spec(q_shape=(2, 17, 8, 128))
    assert not registry.kvcache_decode_sized(prefill)
    plan = registry.plan(prefill, "auto")
    assert plan.forward == "cuda" and any("cuda is tried first" in n for n in plan.notes), plan.notes
    assert registry.auto_order(prefill)[0] == "cuda"
    dense = validation.validate_dense(S((1, 8, 2, 128), BF), S((1, 8, 2, 128), BF), S((1, 8, 2, 128), BF),
                                      softmax_scale=None, is_causal=False, window_size=(-1, -1), softcap=0.0,
                                      return_softmax_lse=False, deterministic=False)
    assert registry.auto_order(dense)[0] == "cuda" and not registry.kvcache_decode_sized(dense)


def test_auto_tries_cuda_first_for_batch1_decode_over_short_caches(monkeypatch):
    """A batch-1 decode over at most KVCACHE_LATENCY_CAPACITY cache keys is latency-bound: cuda first (one custom
    call); a longer cache or more batch rows go back to triton first."""
    fakes = {n: _Fake(n, n != "cudnn") for n in ("cuda", "cudnn", "triton", "xla")}
    monkeypatch.setattr(registry, "availability", lambda name: (True, ""))
    monkeypatch.setattr(registry, "get", lambda name: fakes[name])
    cap = registry.KVCACHE_LATENCY_CAPACITY
    short = _spec(q_shape=(1, 1, 8, 128), cache=(1, cap, 2, 128))
    assert registry.kvcache_latency_bound(short) and registry.auto_order(short)[0] == "cuda"
    plan = registry.plan(short, "auto")
    assert plan.forward == "cuda" and any("batch-1 decode" in n for n in plan.notes), plan.notes
    for spec in (_spec(q_shape=(1, 1, 8, 128), cache=(1, cap + 256, 2, 128)),  # a longer cache
                 _spec(q_shape=(2, 1, 8, 128), cache=(2, 512, 2, 128))):  # two batch rows
        assert not registry.kvcache_latency_bound(spec) and registry.plan(spec, "auto").forward == "triton"
