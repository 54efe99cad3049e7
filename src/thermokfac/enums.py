"""String enums for every option of the preconditioner.

Each accepts its value as a plain string as well (``"solve"`` or ``Method.SOLVE``);
:func:`parse_enum` turns a bad string into a ``ValueError`` that lists the valid ones.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


class FisherType(str, Enum):
    """Which curvature the gradient factor G estimates.

    ``EMPIRICAL`` uses the gradients of the loss the user back-propagated (the paper's
    empirical Fisher, Eq. 6); ``MC`` back-propagates labels sampled from the model's
    predictive distribution; ``TYPE2`` back-propagates the columns of the loss Hessian's
    square root, giving the exact generalised Gauss–Newton matrix of each layer's
    Kronecker block.
    """

    EMPIRICAL = "empirical"
    MC = "mc"
    TYPE2 = "type2"


class KFACApprox(str, Enum):
    """Treatment of the weight-sharing dimension (paper Sec. 3.3, Eqs. 18–21)."""

    EXPAND = "expand"
    REDUCE = "reduce"


class Method(str, Enum):
    """How U = (G+λI)⁻¹ DΘ (A+λI)⁻¹ is computed (paper Sec. 4.1).

    ``INVERSE`` (Method 1) forms both damped inverses every ``inv_update_steps`` and
    multiplies every step; ``SOLVE`` (Method 2) keeps the solver's prepared state and
    solves two banks of linear systems every step.
    """

    INVERSE = "inverse"
    SOLVE = "solve"


class DampingSplit(str, Enum):
    """How the damping λ is shared between the two factors.

    ``EQUAL`` adds λ to both (Eq. 15 with App. E's damping); ``PI`` uses
    λ_A = √λ·π and λ_G = √λ/π with π² = (tr A / dim A) / (tr G / dim G); ``RELATIVE``
    adds λ times each factor's mean eigenvalue, λ_A = λ·tr A / dim A and
    λ_G = λ·tr G / dim G (scale-free: λ is a fraction of the factor's own size).
    """

    EQUAL = "equal"
    PI = "pi"
    RELATIVE = "relative"


class LossReduction(str, Enum):
    """How the back-propagated loss was reduced over its terms."""

    MEAN = "mean"
    SUM = "sum"


class LossType(str, Enum):
    """The likelihood behind the loss; needed by the ``mc`` and ``type2`` Fisher types."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    BCE = "bce"  # sigmoid likelihood per output, as ``nn.BCEWithLogitsLoss``


class FactorStorage(str, Enum):
    """What the preconditioner keeps between capture and prepare.

    ``MATRIX`` forms the Kronecker factors (needed for their moving average);
    ``ROWS`` keeps the activation and gradient rows themselves and lets the solver
    realise aaᵀ/b + λI from them (the resistor-array mode of App. E): memory O(b·n)
    instead of O(n²), for ``factor_decay=0`` and ``method="solve"``.
    """

    MATRIX = "matrix"
    ROWS = "rows"


class Grafting(str, Enum):
    """The scale of each block's preconditioned gradient U.

    ``NONE``: U as Eq. 15 gives it (the KL clip bounds the step). ``GRADIENT``: U
    rescaled to the norm of the block's raw gradient DΘ — K-FAC's direction at the
    gradient's scale, the grafting of Distributed Shampoo (onto the gradient), which an
    Adam-type base optimizer needs: its per-coordinate normalisation follows the scale
    of what it is given, and the first inverses can swing it by orders of magnitude.
    ``AUTO``: ``GRADIENT`` in front of an Adam-type optimizer (parameter groups with
    ``betas``), else ``NONE``.
    """

    AUTO = "auto"
    NONE = "none"
    GRADIENT = "gradient"


class RepeatedCalls(str, Enum):
    """A layer applied k times within one forward of the model (an unrolled RNN cell,
    a siamese branch, a shared block), under ``kfac_approx="reduce"``.

    ``SHARED``: the calls with the same leading dimension N (the batch) form one
    weight-sharing dimension of size k·R per example — activations averaged and output
    gradients summed over every call's positions, as one call on the calls stacked
    along the shared dimension (Eqs. 20–21); calls with other leading dimensions are
    groups of their own. ``SEPARATE``: every call's rows are examples of their own.
    Expand is the same under both (every call's positions are rows).
    """

    SHARED = "shared"
    SEPARATE = "separate"


def parse_enum(enum_cls: type[E], value: E | str, argument: str) -> E:
    """Return ``value`` as a member of ``enum_cls``.

    Args:
        enum_cls: The enum type.
        value: A member or its string value.
        argument: The argument's name, for the error message.

    Raises:
        ValueError: If ``value`` names no member; the message lists the valid values.

    >>> parse_enum(Method, "solve", "method")
    <Method.SOLVE: 'solve'>
    """
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{argument}={value!r} is not valid; choose one of {valid}") from None
