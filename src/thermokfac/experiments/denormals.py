"""Subnormal floats in training on the CPU: whether they are flushed, on every thread.

A classifier that has grown confident on some training examples gives softmax
probabilities below float32's smallest normal number (``exp(-87)`` ≈ 1.2e-38) for their
wrong classes. The gradient of the cross-entropy then carries *subnormal* floats into the
backward pass, and every matrix product that reads them takes the CPU's slow path: on
the Fashion-MNIST MLP (784-512-512-10, batch 512) under K-FAC, whose logits grow faster
than AdamW's, forward + backward took a median of 13.0 ms per step with them and 8.0 ms
without (docs/results-campaign.md, the campaign's timed sweep, 5 seeds). Flushing
(treating subnormals as zero) changes no value above 1.2e-38; TensorFlow does it on the
CPU by default, PyTorch leaves it to :func:`torch.set_flush_denormal`.

That switch sets the *calling thread's* floating-point control register only; torch's
worker threads copy it when they start, so it reaches them only when set before the first
parallel operation of the process — which is where ``thermokfac``'s commands set it.
:func:`state` reads what every worker does by a computation that spans them all.
"""

from __future__ import annotations

import warnings
from enum import Enum

import torch

#: The bits of a float32 subnormal (about 1.0e-42): built from integers, so that making
#: it involves no floating-point conversion that flushing could change.
_SUBNORMAL_BITS = 714
#: Elements per worker thread of the probe: twice torch's grain size for element-wise
#: work (32 768), so every thread of the pool gets a part.
_PER_THREAD = 65_536


class Subnormals(str, Enum):
    """How the CPU threads doing torch's work treat subnormal float32 values."""

    FLUSHED = "flushed"  #: every thread reads and writes them as zero
    KEPT = "kept"  #: every thread keeps them (IEEE 754; PyTorch's default)
    MIXED = "mixed"  #: some threads flush and some keep them


def state() -> Subnormals:
    """How the calling thread and torch's intra-op worker threads treat subnormals.

    Doubles a subnormal on ``torch.get_num_threads()`` × 65 536 elements (every worker
    takes a part) and reads the results' bits: zero where a thread flushes.
    """
    n = _PER_THREAD * max(1, torch.get_num_threads())
    probe = torch.full((n,), _SUBNORMAL_BITS, dtype=torch.int32).view(torch.float32)
    zero = ((probe * 2.0).view(torch.int32) == 0)
    if bool(zero.all()):
        return Subnormals.FLUSHED
    if not bool(zero.any()):
        return Subnormals.KEPT
    return Subnormals.MIXED


def request(flush: bool) -> bool:
    """Flush subnormals (``flush``) or keep them, from now on in this process.

    Call it before the process's first parallel torch operation to reach every worker
    thread; later, it reaches the calling thread and threads that start afterwards.

    Returns:
        Whether the CPU supports the setting (``torch.set_flush_denormal``'s answer).
    """
    return bool(torch.set_flush_denormal(flush))


def check(flush: bool) -> Subnormals:
    """Set ``flush`` on the calling thread and say what every thread does.

    Args:
        flush: Whether the run asked for subnormals to be flushed.

    Returns:
        The :func:`state` the run trains under.

    Warns:
        RuntimeWarning: The threads do not all do what ``flush`` asks (they started
            before :func:`request` was called with it, or the CPU cannot flush): the
            run trains as :func:`state` says, which its summary records.
    """
    supported = request(flush)
    found = state()
    wanted = Subnormals.FLUSHED if flush else Subnormals.KEPT
    if found is not wanted:
        why = ("this CPU cannot flush them" if flush and not supported else
               "torch's worker threads started before the setting and kept the old one; "
               "call torch.set_flush_denormal(...) before any parallel torch work (thermokfac's "
               "commands do)")
        warnings.warn(f"flush_denormal={flush} asks for subnormal floats to be "
                      f"{wanted.value}, but they are {found.value} on this process's threads: "
                      f"{why}", RuntimeWarning, stacklevel=3)
    return found
