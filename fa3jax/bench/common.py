"""Names and small helpers every suite shares: dtype names, the guard's tolerance, impl names, error text, checks."""
from __future__ import annotations

import time
from typing import Optional

import jax.numpy as jnp

WRONG_TOL = 5e-2
FA3_NAME = "flash-attn3-jax"
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}


DENSE = "dense:"  # prefix of an impl's dense-equal-tokens baseline


def short_error(e: BaseException, n: int = 160) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def out_of_time(deadline: Optional[float]) -> bool:
    return deadline is not None and time.perf_counter() > deadline


def fmt_tflops(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def check_reason(impl, cfg) -> str:
    """``impl.check(cfg)`` ('' when it can run ``cfg``), a failing check turned into its reason."""
    try:
        return impl.check(cfg)
    except Exception as e:
        return f"check failed: {short_error(e)}"
