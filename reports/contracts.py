"""In words: an implementation that passes one contract and fails the other.

SPEC §7 splits the inputs a serving stack sends (``production``) from those a
careful kernel must survive (``defensive``); the README promises that a
kernel passing one and failing the other is reported as such.  Works on case
rows (plain dicts with ``impl``, ``contract`` and ``verdict``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["contract_split"]

_MEANING = {
    "production": "the inputs a serving stack sends",
    "defensive": "inputs outside the production contract, which a careful kernel must "
                 "survive without writing out of bounds",
}


def contract_split(case_rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """One sentence per implementation that passed every case of one contract and
    failed a case of the other, e.g. ``torch:x passes the production contract (40
    cases) and fails the defensive contract (3 of 38 cases) …``; else ``[]``."""
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for row in case_rows:
        impl, contract = str(row.get("impl")), row.get("contract")
        if contract in _MEANING:
            entry = counts[impl][contract]
            entry[0] += 1
            entry[1] += row.get("verdict") != "pass"
    out = []
    for impl, by_contract in sorted(counts.items()):
        if set(by_contract) != set(_MEANING):
            continue
        passed = [c for c, (_, failed) in by_contract.items() if not failed]
        if len(passed) != 1:
            continue
        good = passed[0]
        bad = next(c for c in _MEANING if c != good)
        total, failed = by_contract[bad]
        out.append(
            f"{impl} passes the {good} contract ({_cases(by_contract[good][0])}: "
            f"{_MEANING[good]}) and fails the {bad} contract ({failed} of {_cases(total)}: "
            f"{_MEANING[bad]})")
    return out


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"
