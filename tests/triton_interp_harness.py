"""Running Triton kernels under the CPU interpreter in worker subprocesses (shared by the interpreter tests).

The interpreter is chosen when ``@triton.jit`` runs (at kernel-module import) and sticks for the process, so the
kernels run in ``python tests/<file>.py --worker CASE...`` subprocesses with ``TRITON_INTERPRET=1``; each case
prints one ``RESULT {json}`` line that the pytest side collects.
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
