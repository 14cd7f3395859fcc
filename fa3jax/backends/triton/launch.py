"""Executes :class:`~fa3jax.backends.triton.plan_common.Launch` plans through jax-triton, and finds the kernel modules.

Importing this module imports neither triton nor jax_triton; they are loaded on the first launch.
"""
from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

import numpy as np

from .plan_common import Launch

_KERNELS_PKG = "fa3jax.triton_kernels"


def kernels_package():
    """``fa3jax.triton_kernels``: shipped inside the wheel; from a source checkout, loaded from ``<repo>/
    triton_kernels`` under that same name (the bare name ``triton_kernels`` belongs to Triton's PyPI package)."""
    try:
        return importlib.import_module(_KERNELS_PKG)
    except ImportError:
        pass
    src = pathlib.Path(__file__).resolve().parents[3] / "triton_kernels"
    init = src / "__init__.py"
    if not init.is_file():
        raise ImportError(f"fa3jax.triton_kernels is not installed and {src} does not exist")
    spec = importlib.util.spec_from_file_location(_KERNELS_PKG, init, submodule_search_locations=[str(src)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_KERNELS_PKG] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_KERNELS_PKG, None)
        raise
    return module


def kernel(launch: Launch):
    kernels_package()
    return getattr(importlib.import_module(f"{_KERNELS_PKG}.{launch.module}"), launch.kernel)


def call(launch: Launch, arrays: dict):
    """Run ``launch`` with jax arrays (by name); returns the tuple of its outputs."""
    import jax
    import jax.numpy as jnp
    import jax_triton as jt

    args = []
    for kind, value in launch.args:
        if kind == "array":
            args.append(arrays[value])
        elif kind == "i32":
            args.append(int(value))
        elif kind == "f32":
            args.append(np.float32(value))  # a Python float would be passed as fp64
        else:
            raise ValueError(kind)
    out_shape = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for _, shape, dtype in launch.outputs]
    outs = jt.triton_call(*args, kernel=kernel(launch), out_shape=out_shape, grid=launch.grid,
                          num_warps=launch.num_warps, num_stages=launch.num_stages,
                          name=f"fa3jax{launch.kernel}", **launch.meta)
    return tuple(outs)
