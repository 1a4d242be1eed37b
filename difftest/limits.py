"""An implementation's declared input domain: the sizes it accepts.

A kernel that rejects some inputs on purpose (``RuntimeError: padded_num_experts
must be less than 1024``) declares its domain, and difftest then draws cases
inside it, aims its boundary classes at the declared bounds, and sends a few
*out-of-domain probes* whose clean rejection is the verdict ``rejected`` (not a
failure). The domain is a dict from a size name to an inclusive
``(min, max)``; a name that is not given is unbounded. It is declared as the
callable attribute ``difftest_limits``, on the command line as
``--limit NAME=MIN:MAX`` (repeatable, overrides the attribute; an empty side is
open: ``num_experts=:992``), or as ``limits=`` in :func:`difftest.api.check_callable`
and the pytest fixture.

=========================  ======  =============================================
name                       size    what it measures
=========================  ======  =============================================
``num_tokens``             ``T``   tokens of the batch
``topk``                   ``K``   routes per token
``num_experts``            ``E``   the expert count the call receives (a rank's
                                   local count under the ``local_ids`` dispatch)
``block_size``             ``B``   (not ``ep-remap``)
``max_loras``              ``L``   adapter slots (LoRA dialects only)
``max_num_tokens_padded``  ``P``   the call's ``P`` (not ``ep-remap``)
``num_routes``             ``N``   ``T * K``
``ep_size``                ``R``   ranks of an EP case (EP cases only)
=========================  ======  =============================================

A name that does not apply to a case (``max_loras`` of an ``align`` case) does
not constrain it. A case is *in the domain* when every size of every rank's
call is within its bounds (:func:`in_domain`).
"""

from __future__ import annotations

from typing import Any, Mapping

from .case import LORA_DIALECTS, Case, rank_inputs
from .classify import kernel_num_experts
from .errors import UsageError

#: Every limit name and the size letter of ``Case.sizes()`` (``N`` is ``T * K``).
LIMIT_NAMES: dict[str, str] = {
    "num_tokens": "T",
    "topk": "K",
    "num_experts": "E",
    "block_size": "B",
    "max_loras": "L",
    "max_num_tokens_padded": "P",
    "num_routes": "N",
    "ep_size": "R",
}

#: The attribute of a callable (or of a backend module) that declares its limits.
ATTRIBUTE = "difftest_limits"

Limits = dict[str, tuple[int, int]]
#: An open upper bound.
UNBOUNDED = 2**63 - 1


def _unknown(name: object, source: str) -> UsageError:
    return UsageError(f"{source}: unknown limit name {name!r}; known names: "
                      f"{', '.join(LIMIT_NAMES)}")


def validate(limits: Mapping[str, Any] | None, source: str = "limits") -> Limits:
    """``limits`` as a checked :data:`Limits` dict (a copy); ``{}`` for ``None``.

    Each value is an inclusive ``(min, max)`` of integers with ``0 <= min <= max``
    (``None`` for an open side). Raises :class:`~difftest.errors.UsageError`
    naming ``source`` (where the limits came from) for anything else.
    """
    if limits is None:
        return {}
    if not isinstance(limits, Mapping):
        raise UsageError(f"{source}={limits!r}: must be a dict from a limit name to "
                         "(min, max)")
    out: Limits = {}
    for name, bounds in limits.items():
        if name not in LIMIT_NAMES:
            raise _unknown(name, source)
        try:
            low, high = bounds
        except (TypeError, ValueError):
            raise UsageError(f"{source}: {name}={bounds!r}: must be (min, max)") from None
        low = 0 if low is None else low
        high = UNBOUNDED if high is None else high
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            raise UsageError(f"{source}: {name}={bounds!r}: min and max must be integers")
        if not 0 <= low <= high:
            raise UsageError(f"{source}: {name}={bounds!r}: need 0 <= min <= max")
        out[name] = (low, high)
    return out


def parse(text: str) -> tuple[str, tuple[int, int]]:
    """One ``--limit NAME=MIN:MAX`` (an empty side is open) → ``(name, (min, max))``."""
    name, sep, span = text.partition("=")
    name = name.strip()
    if not sep or ":" not in span:
        raise UsageError(f"--limit {text!r}: expected NAME=MIN:MAX, e.g. num_experts=1:992")
    if name not in LIMIT_NAMES:
        raise _unknown(name, f"--limit {text!r}")
    low_text, _, high_text = span.partition(":")
    try:
        low = int(low_text) if low_text.strip() else None
        high = int(high_text) if high_text.strip() else None
    except ValueError:
        raise UsageError(f"--limit {text!r}: MIN and MAX must be integers (or empty for "
                         "an open side)") from None
    return name, validate({name: (low, high)}, f"--limit {text!r}")[name]


def parse_all(texts: list[str] | None) -> Limits:
    """Every ``--limit`` of a command line (a later one wins)."""
    return dict(parse(text) for text in texts or ())


def declared(obj: Any, source: str) -> Limits:
    """The ``difftest_limits`` of ``obj`` (a callable or a module), checked; ``{}``."""
    return validate(getattr(obj, ATTRIBUTE, None), source)


def merged(declared_limits: Mapping[str, tuple[int, int]] | None,
           overrides: Mapping[str, tuple[int, int]] | None) -> Limits:
    """The declared limits with ``overrides`` (the command line's) put over them."""
    return {**validate(declared_limits), **validate(overrides)}


def sizes(case: Case) -> dict[str, tuple[int, ...]]:
    """The case's value of every limit name that applies to it, one per rank's call
    where calls differ (``num_experts``, ``max_num_tokens_padded``); ``num_experts``
    is what the call passes the kernel (:func:`difftest.classify.kernel_num_experts`)."""
    letters = case.sizes()
    out: dict[str, tuple[int, ...]] = {
        "num_tokens": (letters["T"],), "topk": (letters["K"],),
        "num_routes": (case.num_routes,),
    }
    calls = [rank_inputs(case, rank) for rank in case.ranks()]
    # as the kernel receives it: E + 1 buckets for sglang-align (its -1 segment)
    out["num_experts"] = tuple(sorted(set(kernel_num_experts(case))))
    if case.dialect != "ep-remap":
        out["block_size"] = (letters["B"],)
        out["max_num_tokens_padded"] = tuple(sorted({c["max_num_tokens_padded"] for c in calls}))
    if case.dialect in LORA_DIALECTS:
        out["max_loras"] = (letters["L"],)
    if case.ep is not None:
        out["ep_size"] = (letters["R"],)
    return out


def violations(case: Case, limits: Mapping[str, tuple[int, int]] | None) -> list[str]:
    """Why ``case`` is outside ``limits``, one phrase per size (``"num_experts=993 > 992"``);
    empty when it is in the domain."""
    if not limits:
        return []
    found = []
    values = sizes(case)
    for name, (low, high) in limits.items():
        for value in values.get(name, ()):
            if value < low:
                found.append(f"{name}={value} < {low}")
            elif value > high:
                found.append(f"{name}={value} > {high}")
    return found


def in_domain(case: Case, limits: Mapping[str, tuple[int, int]] | None) -> bool:
    """Every size of ``case`` that ``limits`` name is within its bounds."""
    return not violations(case, limits)


def describe(limits: Mapping[str, tuple[int, int]] | None) -> str:
    """``"num_experts 1..992, topk 1..8"``, or ``"unbounded"``."""
    if not limits:
        return "unbounded"
    return ", ".join(f"{name} {low}..{'' if high == UNBOUNDED else high}"
                     for name, (low, high) in limits.items())


def as_json(limits: Mapping[str, tuple[int, int]] | None) -> dict[str, list[int | None]]:
    """For ``run.json`` and reports: ``{name: [min, max]}``, ``None`` for an open max."""
    return {name: [low, None if high == UNBOUNDED else high]
            for name, (low, high) in (limits or {}).items()}
