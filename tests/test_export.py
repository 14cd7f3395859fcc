"""jax.export of a training step that uses flash_mha, and XLA's CUDA-graph command buffers around our kernels.

* Export: ``jax.export.export(jax.jit(step))`` of ``value_and_grad`` of ``sum(flash_mha(q, k, v) ** 2)``, serialized,
  deserialized and called, equals the direct call: on CPU with the xla backend (CI), and on the device for the
  triton, cuda and cudnn backends. Their custom calls (jax-triton's ``triton_kernel_call``, our FFI target
  ``fa3jax_cuda_fwd``, cuDNN's ``__cudnn$fmha*``) carry no compatibility guarantee, so the export names each one
  in ``disabled_checks`` (``jax.export.DisabledSafetyCheck.custom_call``): such an artifact is only valid with the
  same jaxlib and kernels, which is what these tests check (a round trip in one environment).
* Command buffers: a forward and backward step, a forward alone and KV-cache calls (contiguous, paged) with split-KV
  run in a fresh process with ``--xla_gpu_enable_command_buffer=+CUSTOM_CALL`` (add custom calls to XLA's default
  command types; ``--xla_gpu_graph_min_graph_size=1`` so that a short program is captured too) and in one with command
  buffers off (``--xla_gpu_enable_command_buffer=``); each is replayed several times with other buffers allocated and
  filled in between (a graph that kept a freed workspace address would write into them, or read garbage: both are
  checked), the results must be bitwise equal across replays and processes, and the after-optimizations HLO (or, with
  XLA's thunk-level conversion, the thunk sequence) says whether our custom calls were moved into ``command_buffer``
  computations. XLA captures an FFI handler only when it declares ``xla::ffi::Traits::kCmdBufferCompatible`` (ours do:
  their workspaces are result buffers, see tests/test_ffi_sources.py), and a legacy custom call (jax-triton's) only
  when named in ``--legacy_command_buffer_custom_call_targets``.
"""
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax
from fa3jax import registry

from .test_ffi_sources import scan_ffi_sources

pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers (pip install '.[test]')")

REPO = pathlib.Path(__file__).resolve().parents[1]
_OWN_TARGETS = {"triton": "triton_kernel_call", "cuda": "fa3jax_cuda_fwd", "cudnn": "__cudnn$fmhaSoftmax"}
# The custom calls of the command-buffer child (the step's forward and backward first), and their handlers.
_CAPTURE_TARGETS = {"cuda": ("fa3jax_cuda_fwd", "fa3jax_cuda_bwd", "fa3jax_cuda_fwd_kvcache")}
_CAPTURE_HANDLERS = ("Fa3jaxCudaFwd", "Fa3jaxCudaBwd", "Fa3jaxCudaFwdKvcache")


def _step(backend, causal=True, deterministic=False):
    def loss(q, k, v):
        out = fa3jax.flash_mha(q, k, v, is_causal=causal, deterministic=deterministic, backend=backend)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def _inputs(b=2, l=128, hq=4, hk=2, d=64, dtype=jnp.bfloat16, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, l, hq, d), dtype), jax.random.normal(kk, (b, l, hk, d), dtype),
            jax.random.normal(kv, (b, l, hk, d), dtype))


def _custom_call_targets(fn, *args) -> set:
    return set(re.findall(r"custom_call @([\w$.]+)", jax.jit(fn).lower(*args).as_text()))


def _round_trip(fn, args):
    """(exported, result of the deserialized export, result of the direct jitted call)."""
    targets = _custom_call_targets(fn, *args)
    exported = jax.export.export(jax.jit(fn), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(t) for t in sorted(targets)])(*args)
    blob = exported.serialize()
    assert isinstance(blob, (bytes, bytearray)) and len(blob) > 0
    restored = jax.export.deserialize(blob)
    assert restored.in_avals == exported.in_avals and restored.out_avals == exported.out_avals
    return targets, restored.call(*args), jax.jit(fn)(*args)


def test_export_training_step_xla_round_trip():
    args = _inputs(l=64, d=32)
    targets, got, want = _round_trip(_step("xla"), args)
    assert not targets  # pure XLA: nothing outside jax's compatibility guarantees
    (loss, grads), (loss0, grads0) = got, want
    assert loss.shape == () and np.isfinite(float(loss))
    for x, y in zip((loss, *grads), (loss0, *grads0)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))


def test_export_without_disabled_checks_is_refused_for_foreign_targets():
    """What the GPU variants rely on: jax refuses a non-allowlisted custom call unless the check is disabled
    (shown here with cuDNN's target, lowered for CUDA from this machine)."""
    from fa3jax.backends import cudnn as cudnn_mod

    fas, reason = cudnn_mod._jax_cudnn()
    if fas is None:
        pytest.skip(reason)
    fwd = functools.partial(fas.dot_product_attention, scale=0.125, return_residual=False)
    q = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.bfloat16)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(fas, "check_cudnn_version", lambda: 90800)  # CPU jaxlib reports no cuDNN
        with pytest.raises(ValueError, match=r"custom calls whose targets have no compatibility guarantees"):
            jax.export.export(jax.jit(fwd), platforms=["cuda"])(q, q, q)
        ok = jax.export.export(jax.jit(fwd), platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__cudnn$fmhaSoftmax")])(q, q, q)
    finally:
        mp.undo()
    assert ok.platforms == ("cuda",) and "__cudnn$fmhaSoftmax" in ok.mlir_module()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cudnn"])
def test_export_training_step_gpu_round_trip(backend):
    ok, reason = registry.availability(backend)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable here: {reason}")
    # cudnn's own backward accumulates dQ with atomics: compare it with a tolerance; every other path is bitwise
    deterministic = backend != "cudnn"
    args = _inputs(l=256, d=128)
    targets, got, want = _round_trip(_step(backend, deterministic=deterministic), args)
    assert _OWN_TARGETS[backend] in targets, f"{backend}'s own kernel not in the exported module: {sorted(targets)}"
    (loss, grads), (loss0, grads0) = got, want
    for name, x, y in zip(("loss", "dq", "dk", "dv"), (loss, *grads), (loss0, *grads0)):
        x, y = np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32))
        if deterministic:
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            np.testing.assert_allclose(x, y, rtol=2e-2, atol=2e-2 * float(np.max(np.abs(y))), err_msg=name)


# ------------------------------------------------------------------------------------ command buffers
_CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import fa3jax
    backend, out_path = sys.argv[1], sys.argv[2]
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 512, 8, 128), jnp.bfloat16)
    k = jax.random.normal(kk, (2, 512, 4, 128), jnp.bfloat16)
    v = jax.random.normal(kv, (2, 512, 4, 128), jnp.bfloat16)
    do = jax.random.normal(jax.random.key(1), q.shape, jnp.bfloat16)

    @jax.jit
    def step(q, k, v):  # forward and backward (deterministic: bitwise comparable), the LSE cotangent included
        f = lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=True, return_softmax_lse=True, deterministic=True,
                                             backend=backend)
        (out, lse), pull = jax.vjp(f, q, k, v)
        return (out, lse, *pull((do, 0.5 * jnp.tanh(lse))))

    # A causal forward alone (the persistent kernel's tile counter in its workspace).
    fwd = jax.jit(lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=True, return_softmax_lse=True,
                                                   backend=backend))

    # KV-cache decode with appended keys, GQA and 3 splits (their fp32 parts in the workspace): 4 sequences in a
    # contiguous cache of 6 slots, read through cache_batch_idx; then the same over a paged cache.
    kc, vc, kn, vn, kd = jax.random.split(jax.random.key(2), 5)
    k_cache = jax.random.normal(kc, (6, 512, 2, 128), jnp.bfloat16)
    v_cache = jax.random.normal(vc, (6, 512, 2, 128), jnp.bfloat16)
    k_new = jax.random.normal(kn, (4, 1, 2, 128), jnp.bfloat16)
    v_new = jax.random.normal(vn, (4, 1, 2, 128), jnp.bfloat16)
    q_dec = jax.random.normal(kd, (4, 1, 8, 128), jnp.bfloat16)
    slots = jnp.asarray([5, 0, 3, 1], jnp.int32)
    lens = jnp.asarray([500, 37, 256, 130], jnp.int32)
    kvcache = jax.jit(lambda q, kc, vc, kn, vn, n, idx: fa3jax.flash_mha_with_kvcache(
        q, kc, vc, kn, vn, cache_seqlens=n, cache_batch_idx=idx, is_causal=True, num_splits=3,
        return_softmax_lse=True, backend=backend))

    # 4 sequences of 8 pages of 64 rows (512 keys: 4 key blocks or more, so 3 splits stay 3) from a shuffled pool.
    kp, vp = jax.random.split(jax.random.key(3))
    k_pages = jax.random.normal(kp, (35, 64, 2, 128), jnp.bfloat16)
    v_pages = jax.random.normal(vp, (35, 64, 2, 128), jnp.bfloat16)
    pages = jnp.asarray(np.random.default_rng(3).permutation(35)[:32].reshape(4, 8), jnp.int32)
    paged = jax.jit(lambda q, kc, vc, kn, vn, n, pt: fa3jax.flash_mha_with_kvcache(
        q, kc, vc, kn, vn, cache_seqlens=n, page_table=pt, is_causal=True, num_splits=3, return_softmax_lse=True,
        backend=backend))

    # Other buffers between replays: allocated, filled and kept alive, so that a graph that kept a freed workspace
    # address would now write into one of them (checked at the end) or read their values.
    fill = jax.jit(lambda x, c: jnp.full((1 << 22,), c, jnp.float32) + x)
    junk = []

    def churn(i):
        for j in range(3):
            junk.append((float(10 * i + j), fill(jnp.float32(0), jnp.float32(10 * i + j))))
        junk[-1][1].block_until_ready()

    calls = {"step": (step, (q, k, v), ("out", "lse", "dq", "dk", "dv")),
             "fwd": (fwd, (q, k, v), ("fwd_out", "fwd_lse")),
             "kvcache": (kvcache, (q_dec, k_cache, v_cache, k_new, v_new, lens, slots), ("kv_out", "kv_lse")),
             "paged": (paged, (q_dec, k_pages, v_pages, k_new, v_new, lens, pages), ("paged_out", "paged_lse"))}
    result = {}
    for label, (fn, args, names) in calls.items():
        runs = []
        for i in range(4):  # the first run records a captured graph, the others replay it
            runs.append([np.asarray(jnp.asarray(x).astype(jnp.float32)) for x in fn(*args)])
            churn(len(junk))
        for run in runs[:-1]:
            for name, a, b in zip(names, run, runs[-1]):
                assert np.array_equal(a, b), f"{name} differs between replays"
        result.update(zip(names, runs[-1]))
    for value, x in junk:
        assert np.all(np.asarray(x) == value), f"a buffer filled with {value} was overwritten"
    np.savez(out_path, **result)
""")


def _computations(hlo: str) -> dict:
    """{computation name: its text} of an HLO module dump."""
    comps, name, lines = {}, None, []
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name, lines = head.group(1), []
            comps[name] = lines
        elif name is not None:
            lines.append(line)
    return {n: "\n".join(ls) for n, ls in comps.items()}


def _captured_in_thunks(hlo: str, thunks: str, want) -> tuple[set, str]:
    """(the targets of ``want`` whose custom calls the module's thunk sequence runs inside command buffers, a one-line
    summary). A thunk line reads "<indent><index>: <kind> ..." and those in a command buffer are indented under a
    top-level kCommandBuffer. Custom-call thunks carry no instruction name, so a module's calls count as captured
    when all its custom calls are ours, every one of them is nested in a command buffer and none runs outside."""
    targets = re.findall(r'custom_call_target="([^"]+)"', hlo)
    ours = sorted({t for t in targets if t in want})
    nested = top = 0
    in_buffer = False
    for line in thunks.splitlines():
        m = re.match(r"^(\s*)\d+: (\S+)", line)
        if m is None:
            continue
        if not m.group(1):
            in_buffer = m.group(2).startswith("kCommandBuffer")
        if m.group(2) == "kCustomCall":
            nested += in_buffer and bool(m.group(1))
            top += not m.group(1)
    summary = f"{ours or targets}: {nested} custom-call thunks in command buffers, {top} outside"
    whole = ours and len(ours) == len(set(targets)) and nested == len(targets) and top == 0
    return (set(ours) if whole else set()), summary


def test_thunk_dump_parser_finds_custom_calls_inside_command_buffers():
    """The capture check's parser on thunk dumps of XLA's form: a module's custom calls count as captured only when
    each runs nested in a top-level kCommandBuffer and all are ours."""
    hlo = ('  %custom-call.3 = (bf16[2]) custom-call(%p), custom_call_target="fa3jax_cuda_fwd"\n'
           '  ROOT custom-call.31 = (bf16[2]) custom-call(p), custom_call_target="fa3jax_cuda_bwd"\n')
    graphs = ("000: kCommandBuffer [source | sink] \n    001: kCustomCall   [source | next=002 (1)] kCustomCall\n"
              "    002: kKernel f\n    003: kCustomCall   [prev=002 (1) | sink] kCustomCall\n")
    want = _CAPTURE_TARGETS["cuda"]
    assert _captured_in_thunks(hlo, graphs, want)[0] == {"fa3jax_cuda_fwd", "fa3jax_cuda_bwd"}
    one_out = graphs.replace("    003: kCustomCall", "004: kCustomCall")
    assert _captured_in_thunks(hlo, one_out, want) == (set(), "['fa3jax_cuda_bwd', 'fa3jax_cuda_fwd']: 1 custom-call "
                                                              "thunks in command buffers, 1 outside")
    foreign = hlo + '  custom-call.4 = f32[] custom-call(), custom_call_target="other"\n'
    assert _captured_in_thunks(foreign, graphs, want)[0] == set()
    assert _captured_in_thunks(hlo, graphs.replace("kCommandBuffer", "kSequential"), want)[0] == set()


def _run_child(backend, tmp, flags) -> tuple[dict, bool, list]:
    """Run the child's calls in a fresh process with ``flags``; (npz arrays, whether the backend's custom calls sit
    in command buffers, by the optimized HLO or the thunk sequence (the step's forward and backward at least), the
    modules' thunk summaries)."""
    dump = tmp / "dump"
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_dump_to={dump}", "--xla_dump_hlo_as_text"])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + sys.path)  # the same fa3jax (and extension) as this process
    out = tmp / "out.npz"
    proc = subprocess.run([sys.executable, "-c", _CHILD, backend, str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode and "Unknown flag" in proc.stderr:
        pytest.skip(f"this XLA does not know one of {flags}: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"child failed with XLA_FLAGS={env['XLA_FLAGS']!r}:\n{proc.stderr[-4000:]}"
    want = _CAPTURE_TARGETS.get(backend, (_OWN_TARGETS[backend],))
    found, seen = set(), []  # seen: the modules' thunk summaries
    for path in dump.glob("*after_optimizations.txt"):
        hlo = path.read_text()
        for name, body in _computations(hlo).items():
            if name.startswith("command_buffer"):  # XLA's HLO-level command-buffer pass
                found |= {t for t in want if f'custom_call_target="{t}"' in body}
        # XLA's thunk-level conversion (xla_gpu_experimental_enable_command_buffer_on_thunks, on by default in newer
        # XLA) leaves the HLO alone: read the module's thunk sequence after the thunk passes instead.
        for thunks in dump.glob(path.name.split(".")[0] + ".*thunk_sequence_after_thunk_passes.txt"):
            hits, summary = _captured_in_thunks(hlo, thunks.read_text(), want)
            found |= hits
            seen.append(f"{path.name.split('.')[1]}: {summary}")
    captured = bool(found)
    # The training step's forward and backward must move into graphs together; XLA may leave a lone call out.
    assert not captured or set(want[:2]) <= found, f"only {sorted(found)} of {want} were captured: {seen}"
    with np.load(out) as z:
        return {k: z[k] for k in z.files}, captured, seen


def _declares_cmd_buffer_trait() -> bool:
    """Whether the child's FFI handlers declare CUDA-graph compatibility (read from the C++ sources they are built
    from; the trait may come through a macro of csrc/ffi)."""
    if not (REPO / "csrc" / "ffi").is_dir():
        pytest.skip("csrc/ffi not found next to the tests: cannot tell what the FFI handlers declare")
    handlers = {s: d for info in scan_ffi_sources().values() for s, d in info["handlers"].items()}
    declared = {handlers.get(s, False) for s in _CAPTURE_HANDLERS}
    assert len(declared) == 1, f"{_CAPTURE_HANDLERS} disagree on the trait: {handlers}"
    return declared.pop()


_CMD_BUFFER = ["--xla_gpu_enable_command_buffer=+CUSTOM_CALL", "--xla_gpu_graph_min_graph_size=1"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,extra,expect", [
    ("cuda", [], "declared"),  # captured exactly when the handler declares kCmdBufferCompatible
    ("triton", [], None),  # a legacy custom call: only the results are compared
    ("triton", ["--legacy_command_buffer_custom_call_targets=triton_kernel_call"], True),
], ids=["cuda", "triton", "triton-forced"])
def test_command_buffers_give_the_same_result(backend, extra, expect, tmp_path):
    ok, reason = registry.availability(backend)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable here: {reason}")
    (tmp_path / "plain").mkdir()
    (tmp_path / "graphs").mkdir()
    plain, plain_captured, _ = _run_child(backend, tmp_path / "plain", ["--xla_gpu_enable_command_buffer="])
    graphs, captured, seen = _run_child(backend, tmp_path / "graphs", _CMD_BUFFER + extra)
    assert not plain_captured, "command buffers were off in the baseline run; the dump parsing is off"
    assert sorted(graphs) == sorted(plain)
    for key in sorted(plain):
        np.testing.assert_array_equal(graphs[key], plain[key], err_msg=f"{key} differs under command buffers")
    if expect is None:
        return
    want = _declares_cmd_buffer_trait() if expect == "declared" else expect
    assert captured == want, json.dumps(dict(backend=backend, flags=_CMD_BUFFER + extra, captured=captured,
                                             expected=want, thunks=seen[:20]))
