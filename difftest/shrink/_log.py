"""The shrink log for a reader: runs of one pass folded into one line."""

from __future__ import annotations

import re
from typing import Any, Sequence

_STEP = re.compile(r"^(?P<pass>\w+): (?P<label>.+?) (?P<old>-?\d+) -> (?P<new>-?\d+)(?P<rest>.*)$")
_RUN_SHOWN = 4  # a longer run of one pass's other steps shows its first and last two


def compressed_log(steps: Sequence[str]) -> list[str]:
    """``ShrinkResult.passes_applied`` for a reader: a chain of one pass lowering one
    size (``drop_tokens: T 16384 -> 8192``, ``T 8192 -> 4096``, ...) is one line,
    ``drop_tokens: T 16384 → 2 in 13 steps``; a longer run of one pass's other steps
    keeps its first and last two and counts the rest."""
    chained: list[tuple[str, str]] = []  # (pass, line)
    chain: dict[str, Any] | None = None

    def close() -> None:
        if chain is not None:
            n = chain["steps"]
            line = (f"{chain['pass']}: {chain['label']} {chain['old']} → {chain['new']} "
                    f"in {n} steps" if n > 1 else chain["line"])
            chained.append((chain["pass"], line))

    for step in steps:
        m = _STEP.match(step)
        if (m and chain is not None and m["pass"] == chain["pass"]
                and m["label"] == chain["label"] and m["old"] == chain["new"]):
            chain.update(new=m["new"], steps=chain["steps"] + 1)
            continue
        close()
        chain = None
        if m:
            chain = {"pass": m["pass"], "label": m["label"], "old": m["old"], "new": m["new"],
                     "steps": 1, "line": step}
        else:
            chained.append((step.partition(":")[0], step))
    close()
    out: list[str] = []
    i = 0
    while i < len(chained):
        j = i
        while j < len(chained) and chained[j][0] == chained[i][0]:
            j += 1
        run = [line for _, line in chained[i:j]]
        if len(run) > _RUN_SHOWN + 1:
            run = run[:2] + [f"{chained[i][0]}: … {len(run) - _RUN_SHOWN} more steps …"] + run[-2:]
        out += run
        i = j
    return out
