"""The cuda backend's varlen refusals, checked without a GPU (the extension is faked): the kernels load varlen q/k/v
(and dO) through packed-rows TMA views (csrc launch.h encode_rows_view) that hold totals of up to 2^30 rows and rows
below 2^34 bytes; beyond those the backend raises NotImplementedError (the registry falls back), as fwd_check /
bwd_check refuse them in C++."""
from __future__ import annotations

import dataclasses

import pytest

from fa3jax.backends import cuda as cuda_mod
from fa3jax.backends.cuda import CudaBackend

from .test_cuda_head_dims import _fake_build, _specs


def _varlen(**changes):
    return dataclasses.replace(_specs(128)[1], **changes)


@pytest.mark.parametrize("check", ["check_forward", "check_backward"])
def test_varlen_totals_up_to_2_30_rows_are_served(monkeypatch, check):
    _fake_build(monkeypatch)
    getattr(CudaBackend(), check)(_varlen(seqlen_q=2**30, seqlen_k=2**30))


@pytest.mark.parametrize("check", ["check_forward", "check_backward"])
@pytest.mark.parametrize("which", ["seqlen_q", "seqlen_k"])
def test_varlen_totals_above_2_30_rows_are_refused(monkeypatch, check, which):
    _fake_build(monkeypatch)
    with pytest.raises(NotImplementedError, match=f"{which}={2**30 + 1}"):
        getattr(CudaBackend(), check)(_varlen(**{which: 2**30 + 1}))


@pytest.mark.parametrize("check", ["check_forward", "check_backward"])
def test_varlen_rows_of_2_34_bytes_are_refused(monkeypatch, check):
    _fake_build(monkeypatch)
    heads = 2**34 // (128 * 2)  # bf16 rows of heads x 128 elements: exactly 2^34 bytes
    with pytest.raises(NotImplementedError, match="2\\^34"):
        getattr(CudaBackend(), check)(_varlen(num_heads_q=heads, num_heads_k=heads))
    # one head fewer fits the views
    cuda_mod._check_varlen_views(_varlen(num_heads_q=heads - 1, num_heads_k=heads - 1))
