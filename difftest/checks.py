"""One record per check of SPEC §9: the one place its facts live.

A failure's *signature* is named after its most fundamental failed check
(:data:`CHECKS` is in priority order: a crash explains everything after it);
bug reports say in words what the check means; crashes and out-of-bounds
checks of CUDA implementations get a compute-sanitizer re-run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One check: its name in records and signatures, and what it means."""

    name: str
    #: what a failure of it means, one line, for bug reports and summaries
    description: str
    #: its failures on CUDA get a compute-sanitizer (memcheck) re-run
    sanitize: bool = False


#: Every check, most fundamental first (the order is the priority).
CHECKS: tuple[Check, ...] = (
    Check("crash", "the worker process died (or the device raised a sticky error)",
          sanitize=True),
    Check("timeout", "the call did not return in time", sanitize=True),
    Check("launch_error", "the call left a CUDA launch error pending for the next call",
          sanitize=True),
    Check("exception", "the call raised an exception", sanitize=True),
    Check("unclean_rejection", "the call rejected an input outside its declared limits, but "
          "not cleanly (it wrote outputs, damaged memory or left a CUDA error)", sanitize=True),
    Check("wild_write", "the call wrote into memory of another case's buffers", sanitize=True),
    Check("guard_band", "the call wrote outside an output buffer", sanitize=True),
    Check("input_mutated", "the call modified one of its inputs"),
    Check("unwritten_row", "the call wrote the row of a slot it must not process"),
    Check("num_tokens_post_pad", "num_tokens_post_pad is wrong"),
    Check("expert_ids", "expert_ids is wrong"),
    Check("sorted_token_ids", "an expert segment of sorted_token_ids holds the wrong routes"),
    Check("pad_value", "padding positions of sorted_token_ids do not hold the pad value"),
    Check("local_topk_ids", "the remapped local expert ids are wrong"),
    Check("ep_conservation", "routes are lost or duplicated across EP ranks"),
    Check("repeat_disagree", "repeated runs of the same case disagree (a race)"),
)

CHECK_BY_NAME: dict[str, Check] = {c.name: c for c in CHECKS}
#: Check names in priority order.
CHECK_PRIORITY: tuple[str, ...] = tuple(c.name for c in CHECKS)


def describe(name: str) -> str:
    """The one-line meaning of check ``name`` (the name itself when unknown)."""
    check = CHECK_BY_NAME.get(name)
    return check.description if check else name


def sanitized(name: str | None) -> bool:
    """Whether failures of check ``name`` get a compute-sanitizer re-run."""
    check = CHECK_BY_NAME.get(name or "")
    return bool(check and check.sanitize)
