"""Where the benchmark runs: platform, flash-attn3-jax's presence, git commit, environment record, free memory."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import jax

import fa3jax

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding fa3jax/ (when not installed)


def platform_name() -> str:
    return jax.devices()[0].platform


def on_gpu() -> bool:
    return platform_name() == "gpu"


def flash_attn3():
    """The flash_attn3_jax module, or (None, reason)."""
    try:
        import flash_attn3_jax  # noqa: F401

        return flash_attn3_jax, ""
    except Exception as e:  # not installed, or a broken install
        return None, f"flash_attn3_jax not importable: {type(e).__name__}: {e}"


def git_commit() -> Optional[str]:
    """Short commit of the checkout (cwd first, then this module's tree), '-dirty' with uncommitted changes.
    ``FA3JAX_COMMIT`` overrides it: the device machine receives a working tree without git history."""
    if os.environ.get("FA3JAX_COMMIT"):
        return os.environ["FA3JAX_COMMIT"]
    for where in (Path.cwd(), REPO_ROOT):
        try:
            r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True,
                               timeout=10)
            if r.returncode != 0:
                continue
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return r.stdout.strip() + ("-dirty" if dirty else "")
        except Exception:
            continue
    return None


def environment() -> dict:
    dev = jax.devices()[0]
    fa3, _ = flash_attn3()
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:
        jaxlib_version = None
    return {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "fa3jax": fa3jax.__version__,
        "flash_attn3_jax": getattr(fa3, "__version__", "?") if fa3 is not None else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "backends": [list(b) for b in fa3jax.backends_info()],
    }


def free_device_bytes() -> int:
    """Free memory on the default device (host RAM on CPU)."""
    try:
        st = jax.devices()[0].memory_stats()
        if st and "bytes_limit" in st:
            return int(st["bytes_limit"] - st.get("bytes_in_use", 0))
    except Exception:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return 8 << 30
