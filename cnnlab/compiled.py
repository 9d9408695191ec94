"""Loops compiled to machine code with numba, for the few jobs PyTorch's operators do in many passes.

cnnlab's compiled loops (the tiling max-pool, the training batch's gather,
normalization, crop and flip) each replace several whole-tensor operators with
one pass over memory, on the calling thread. Each is compiled on first use;
with a writable cache folder the machine code is kept on disk, so only the
first run on a machine pays the compilation (~1 s per loop).
"""

from __future__ import annotations

import functools

from numba import njit


def compiled(loops=None, *, fastmath: bool | set[str] = False):
    """`loops` compiled by numba (nogil: safe to run from several threads at once), cached on disk where it can be.

    Used bare (`@compiled`) or with numba's fastmath flags (`@compiled(fastmath={"reassoc"})`).
    """
    if loops is None:
        return functools.partial(compiled, fastmath=fastmath)
    try:
        return njit(cache=True, nogil=True, fastmath=fastmath)(loops)
    except RuntimeError:  # no writable place for the cache (a read-only install): compile in memory
        return njit(nogil=True, fastmath=fastmath)(loops)
