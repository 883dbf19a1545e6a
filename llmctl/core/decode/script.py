"""TorchScript for the decode step and the sampler's draw, with a plain-Python fallback."""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def _scripted(fn):
    """`fn` compiled by TorchScript (`_decode_step`: about 15 ms, once), or `fn` itself where that fails. The
    functions it calls are inlined: TorchScript otherwise calls them through a new interpreter frame each time, which
    made a batch-1 decode step about 6% slower (24 `_linear` calls a step)."""
    import warnings

    inline = getattr(torch._C, "_jit_get_inline_everything_mode", None)
    was = inline() if inline else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript announces its deprecation
            if inline:
                torch._C._jit_set_inline_everything_mode(True)
            return torch.jit.script(fn)
    except Exception as exc:  # a torch without (working) TorchScript: the same ops from Python
        log.debug("TorchScript unavailable for %s (%s): running it as Python", fn.__name__, exc)
        return fn
    finally:
        if inline:
            torch._C._jit_set_inline_everything_mode(was)
