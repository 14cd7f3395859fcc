#!/usr/bin/env python
"""Full benchmark on a GPU: the flash-attn3-jax README table (or ``--suite decode``), printed, saved as JSON + PNG,
and with ``--record`` appended to benchmarks/RESULTS.md.

    python benchmarks/run.py --record                 # attention table, every available impl
    python benchmarks/run.py --suite decode --record  # KV-cache decode bandwidth
    python benchmarks/run.py --help                   # all options (same as `python -m fa3jax bench`)

A thin wrapper around :func:`fa3jax.bench.main`; works from a checkout without installing (the repository root
is appended to sys.path when fa3jax is not importable). Output files go to bench_out/ (git-ignored) unless --out-dir
(alias --out) is given.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:  # an installed fa3jax (e.g. one built with the CUDA extension) wins over the source tree
    import fa3jax  # noqa: F401
except ImportError:
    sys.path.append(str(ROOT))

from fa3jax import bench  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.split("=")[0] in ("--out", "--out-dir") for a in argv):
        argv = ["--out-dir", str(ROOT / "bench_out")] + argv
    if not any(a.split("=")[0] == "--results-md" for a in argv):
        argv = ["--results-md", str(ROOT / "benchmarks" / "RESULTS.md")] + argv
    return bench.main(argv, prog="benchmarks/run.py")


if __name__ == "__main__":
    sys.exit(main())
