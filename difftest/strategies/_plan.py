"""What the case builder has decided so far about one case (:class:`_Plan`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..case import LORA_DIALECTS, EPGroup
from ..limits import UNBOUNDED, Limits
from ._base import Values


def _bounds(limits: Limits, name: str) -> tuple[int, int]:
    return limits.get(name, (0, UNBOUNDED))


@dataclass
class _Plan:
    """What the builder has decided so far about one case."""

    dialect: str
    contract: str
    foci: frozenset[str]
    num_tokens: int = 1
    topk: int = 1
    num_experts: int = 1
    block_size: int = 1
    max_loras: int = 0
    dtype: type = np.int32
    routing: str = "uniform"
    ep: EPGroup | None = None
    direct_map: bool = False
    ingredients: frozenset[str] = frozenset()
    lora_features: set[str] = field(default_factory=set)
    limits: Limits = field(default_factory=dict)
    probe: bool = False  # an out-of-domain probe (see cases)
    values: Values = field(default_factory=lambda: Values(0))  # the case's seed

    def bounds(self, name: str) -> tuple[int, int]:
        """The declared ``(min, max)`` of limit ``name`` (``(0, UNBOUNDED)`` when none)."""
        return _bounds(self.limits, name)

    @property
    def num_routes(self) -> int:
        return self.num_tokens * self.topk

    @property
    def lora(self) -> bool:
        return self.dialect in LORA_DIALECTS

    def wants(self, name: str) -> bool:
        """Whether a focus or an ingredient asks for ``name``."""
        return name in self.foci or name in self.ingredients



def _protected_routes(plan: _Plan) -> np.ndarray:
    """Routes the focus relies on; defensive changes leave them alone."""
    protected = np.zeros(plan.num_routes, dtype=bool)
    if plan.routing == "hot":
        protected[:2] = True  # two routes to the hot expert
    elif plan.routing == "missing":
        protected[:1] = True  # some expert still gets a route
    return protected

