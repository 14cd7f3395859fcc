"""Ask before tracing: which backend would serve a call, and why another would not."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

from . import api, registry, validation


@dataclasses.dataclass(frozen=True)
class Support:
    supported: bool
    forward: Optional[str]  # backend that would run the forward
    backward: Optional[str]  # backend that would run the VJP (None: not differentiable, see reason)
    reason: str  # why not supported / why the backward is composed or absent
    notes: tuple = ()


# each validator's parameters carry the public names, so a bound call passes on by keyword whatever the order
_VALIDATORS = {
    api.flash_mha: validation.validate_dense,
    api.flash_mha_varlen: validation.validate_varlen,
    api.flash_mha_with_kvcache: validation.validate_kvcache,
}


def _spec_for(fn, args, kwargs):
    if fn not in _VALIDATORS:
        raise TypeError(f"fn must be one of flash_mha, flash_mha_varlen, flash_mha_with_kvcache; got {fn!r}")
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    backend = validation.validate_backend(a.pop("backend"))
    spec = _VALIDATORS[fn](**a)  # the arguments the call would validate, unchanged
    return spec, backend


def supports(fn, *args, **kwargs) -> Support:
    """Would ``fn(*args, **kwargs)`` run, and on which backends? Arrays may be ``jax.ShapeDtypeStruct``.

    Invalid arguments raise the same ValueError/TypeError the call would. A valid call that the requested
    backend cannot serve returns ``Support(False, ...)`` with the reason.
    """
    spec, backend = _spec_for(fn, args, kwargs)
    try:
        plan = registry.plan(spec, backend)
    except registry.BackendUnavailableError as e:
        return Support(False, None, None, str(e))
    reason = plan.backward_reason if (plan.backward is None or plan.composed) else ""
    return Support(True, plan.forward, plan.backward, reason, plan.notes)


def backends_info():
    """[(name, available, reason)] for every backend, in the order ``auto`` tries them."""
    return registry.backends_info()
