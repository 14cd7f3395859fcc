"""Running Triton kernels under the CPU interpreter in worker subprocesses (shared by the interpreter tests).

The interpreter is chosen when ``@triton.jit`` runs (at kernel-module import) and sticks for the process, so the
kernels run in ``python tests/<file>.py --worker CASE...`` subprocesses with ``TRITON_INTERPRET=1``; each case
prints one ``RESULT {json}`` line that the pytest side collects.

Worker side: :func:`interpret` executes a plan's ``Launch`` over numpy arrays (the interpreter wants objects with
``data_ptr()`` and a few torch-like storage methods; :class:`NpTensor` provides them, so torch is not needed;
numpy has no bfloat16, so the tests use float16), :func:`rel` is the relative L2 error the tests bound.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import traceback

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def patch_interpreter_for_numpy2():
    """Triton 3.6's interpreter turns scalar tensors (1-element 1-D numpy arrays) into loop bounds with
    ``int(array)``, which numpy >= 2.? rejects for ndim > 0; re-define that one conversion. Test-only: the
    compiled GPU path never goes through the interpreter."""
    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


class _Storage:
    def __init__(self, t):
        self.t = t

    def data_ptr(self):
        return self.t.arr.ctypes.data

    def cpu(self):  # already host memory: the interpreter works in place
        return self

    def copy_(self, other):
        pass


class NpTensor:
    """The slice of the torch.Tensor API that triton/runtime/interpreter.py touches, over a numpy array."""

    def __init__(self, arr, dtype):
        self.arr = arr
        self.dtype = dtype

    def data_ptr(self):
        return self.arr.ctypes.data

    def untyped_storage(self):
        return _Storage(self)

    def new_empty(self, *args, **kwargs):
        return NpTensor(None, self.dtype)

    def set_(self, storage, offset, size, stride):
        self.arr = storage.t.arr
        return self

    def storage_offset(self):
        return 0

    def size(self):
        return self.arr.shape

    def stride(self):
        return tuple(s // self.arr.itemsize for s in self.arr.strides)


def interpret(launch, arrays):
    """Execute a plan's Launch in the interpreter; ``arrays`` maps names to numpy arrays. Outputs start as NaN,
    so an element the kernels forget to write shows."""
    import triton.language as tl

    from fa3jax.backends.triton import launch as launch_mod

    tl_types = {np.dtype(np.float16): tl.float16, np.dtype(np.float32): tl.float32, np.dtype(np.int32): tl.int32}
    np_types = {"float16": np.float16, "float32": np.float32}
    outs = [np.full(shape, np.nan, np_types[dt]) for _, shape, dt in launch.outputs]
    args = []
    for kind, value in launch.args:
        if kind == "array":
            a = np.ascontiguousarray(arrays[value])
            args.append(NpTensor(a, tl_types[a.dtype]))
        elif kind == "i32":
            args.append(int(value))
        else:
            args.append(float(np.float32(value)))
    args += [NpTensor(o, tl_types[o.dtype]) for o in outs]
    launch_mod.kernel(launch)[launch.grid](*args, **launch.meta)
    return outs


def rel(x, ref):
    """Relative L2 error of ``x`` against ``ref`` (inf if x is not finite)."""
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / den) if den > 0 else float(np.linalg.norm(x))


def worker(run_case, names):
    """Worker-process side: run each named case, print its verdict (or the error) as one RESULT line."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(REPO))
    patch_interpreter_for_numpy2()
    for name in names:
        try:
            res = run_case(name)
        except Exception as e:  # noqa: BLE001 - reported to the parent test
            res = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        print("RESULT " + json.dumps({"name": name, **res}), flush=True)


def _spawn(script, names):
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script), "--worker", *names], capture_output=True, text=True,
                          env=env, timeout=900, cwd=REPO)
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            found[r.pop("name")] = r
    for name in names:
        found.setdefault(name, {"error": f"worker exited {proc.returncode}:\n{proc.stderr[-4000:]}"})
    return found


def run_in_workers(script, names, nproc):
    """Pytest side: split ``names`` over ``nproc`` worker processes of ``script``; {name: verdict}."""
    nproc = max(1, min(nproc, os.cpu_count() or 1))
    chunks = [names[i::nproc] for i in range(nproc)]
    found = {}
    with concurrent.futures.ThreadPoolExecutor(nproc) as pool:
        for part in pool.map(lambda c: _spawn(script, c), chunks):
            found.update(part)
    return found


def results_fixture(script, cases, nproc):
    """The module-scoped ``results`` fixture of an interpreter test file: {case: verdict} from worker processes."""

    @pytest.fixture(scope="module")
    def results():
        pytest.importorskip("triton")
        return run_in_workers(script, list(cases), nproc=nproc)

    return results


def main(script, run_case, cases):
    """``python tests/<file>.py --worker [CASE...]`` runs cases in this process; without flags, the file's tests."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(run_case, sys.argv[2:] or list(cases))
    else:
        sys.exit(pytest.main([script, "-q"]))
