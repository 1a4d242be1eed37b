"""The case model: every input of one dialect call, its contract and edge classes.

A :class:`Case` is plain data (NumPy arrays and ints), independent of torch and
of any device, so it can be generated in one process, executed in another,
saved as JSON and replayed byte for byte.

EP campaigns: a case may carry an :class:`EPGroup`. Then ``topk_ids`` hold
*global* expert ids, ``num_experts`` is the global count ``G``, and the case
stands for one call per rank in ``ep.ranks``; each rank's inputs are derived
with :func:`rank_inputs` in one of the two dispatch forms of SPEC §6.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import oracle
import oracle.ep

from .errors import CaseError

DIALECTS = ("align", "vllm-lora", "sglang-lora", "ep-remap", "sglang-align")
#: The LoRA-aware dialects (per-slot rows, adapter inputs).
LORA_DIALECTS = ("vllm-lora", "sglang-lora")
CONTRACTS = ("production", "defensive")
STRATEGIES = ("linear", "round_robin")
DISPATCH_FORMS = ("expert_map", "local_ids")
# A bug report's case.json of a large case also carries its repro.py's call records under
# this key (difftest/repro.py); loading a case ignores it.
REPRO_CALLS = "repro_calls"

# SPEC §8, plus the classes this project adds.
EDGE_CLASSES = (
    "full-slots-with-base",
    "base-only",
    "disabled-adapter",
    "slot-out-of-range",
    "ep-sentinel",
    "expert-map",
    "non-divisible-experts",
    "path-boundary",
    "hot-expert",
    "empty-expert",
    "block-edges",
    "empty-batch",
    "int64-ids",
    "many-experts",
    "duplicate-route",
    "loose-padding",
    "huge-batch",
    "invalid-expert-id",
    "request-gap",
)

_ARRAY_FIELDS = (
    "topk_ids",
    "token_lora_mapping",
    "seg_indptr",
    "req_to_lora",
    "lora_ids",
    "adapter_enabled",
    "expert_map",
)

# Option fields and their defaults; a field at its default is left out of the
# content id, so the ids of cases without options did not change when they came.
_OPTION_FIELDS = {"pad_sorted_token_ids": True, "ignore_invalid_expert": False}


@dataclass(frozen=True)
class EPGroup:
    """An expert-parallel group: ``ep_size`` ranks sharing ``global_num_experts``.

    ``dispatch`` picks how a rank receives its routes (SPEC §6): global ids plus
    the rank's ``expert_map`` (``"expert_map"``), or local ids with ``-1`` for
    foreign routes (``"local_ids"``). ``ranks`` are the ranks the case runs.
    """

    global_num_experts: int
    ep_size: int
    strategy: str = "linear"
    dispatch: str = "expert_map"
    ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise CaseError(f"ep.strategy={self.strategy!r}: must be one of {STRATEGIES}")
        if self.dispatch not in DISPATCH_FORMS:
            raise CaseError(f"ep.dispatch={self.dispatch!r}: must be one of {DISPATCH_FORMS}")
        if self.ep_size < 1:
            raise CaseError(f"ep.ep_size={self.ep_size}: must be >= 1")
        if not self.ranks:
            object.__setattr__(self, "ranks", tuple(range(self.ep_size)))
        for r in self.ranks:
            if not 0 <= r < self.ep_size:
                raise CaseError(f"ep.ranks contains {r}: must be in [0, {self.ep_size})")


@dataclass(frozen=True, eq=False)
class Case:
    """All inputs of one call (or one EP group of calls) of a dialect.

    Array fields are NumPy arrays with the dtype the kernel receives
    (``topk_ids`` int32 or int64, everything else int32). ``max_num_tokens_padded``
    ``None`` means the production size (SPEC §2), computed per rank.
    """

    dialect: str
    contract: str
    topk_ids: np.ndarray
    num_experts: int
    block_size: int
    max_loras: int = 0
    max_num_tokens_padded: int | None = None
    token_lora_mapping: np.ndarray | None = None
    seg_indptr: np.ndarray | None = None
    req_to_lora: np.ndarray | None = None
    lora_ids: np.ndarray | None = None
    adapter_enabled: np.ndarray | None = None
    expert_map: np.ndarray | None = None
    ep: EPGroup | None = None
    # sglang-align options (SGLang's call flags; other dialects keep the defaults):
    # pad_sorted_token_ids False leaves every position of sorted_token_ids that
    # holds no route unwritten; ignore_invalid_expert drops the -1 routes.
    pad_sorted_token_ids: bool = True
    ignore_invalid_expert: bool = False
    edge_classes: tuple[str, ...] = ()
    seed: int | None = None
    note: str = ""
    case_id: str = field(default="")

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise CaseError(f"dialect={self.dialect!r}: must be one of {DIALECTS}")
        if self.contract not in CONTRACTS:
            raise CaseError(f"contract={self.contract!r}: must be one of {CONTRACTS}")
        for name in _ARRAY_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, np.ndarray):
                object.__setattr__(self, name, np.asarray(value, dtype=np.int32))
        if self.topk_ids.ndim != 2:
            raise CaseError(f"topk_ids has shape {self.topk_ids.shape}: must be 2-D [T, K]")
        if self.topk_ids.dtype not in (np.int32, np.int64):
            raise CaseError(f"topk_ids has dtype {self.topk_ids.dtype}: must be int32 or int64")
        self._check_options()
        object.__setattr__(self, "edge_classes", tuple(sorted(set(self.edge_classes))))
        if not self.case_id:
            object.__setattr__(self, "case_id", self._content_id())

    def _check_options(self) -> None:
        for name in _OPTION_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise CaseError(f"{name}={value!r}: must be true or false")
            object.__setattr__(self, name, bool(value))
            if self.dialect != "sglang-align" and value != _OPTION_FIELDS[name]:
                raise CaseError(f"{name}={value!r}: only sglang-align cases have this option "
                                f"(dialect={self.dialect!r})")
        if self.dialect == "sglang-align":
            # SGLang's align takes no expert_map: EP reaches it as local ids with -1.
            if self.expert_map is not None:
                raise CaseError("expert_map: sglang-align takes none (EP sends local ids "
                                "with -1 for foreign routes)")
            if self.ep is not None and self.ep.dispatch != "local_ids":
                raise CaseError(f"ep.dispatch={self.ep.dispatch!r}: sglang-align takes only "
                                "the 'local_ids' dispatch")

    # -- sizes -------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def topk(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def num_routes(self) -> int:
        return int(self.topk_ids.size)

    def sizes(self) -> dict[str, int | None]:
        """``T K E B L P R`` as the run log records them (P of the first rank)."""
        ranks = self.ranks()
        return {
            "T": self.num_tokens,
            "K": self.topk,
            "E": self.num_experts,
            "B": self.block_size,
            "L": self.max_loras,
            "P": rank_inputs(self, ranks[0])["max_num_tokens_padded"]
            if self.dialect != "ep-remap"
            else 0,
            "R": self.ep.ep_size if self.ep else None,
        }

    def ranks(self) -> tuple[int | None, ...]:
        return self.ep.ranks if self.ep else (None,)

    def size_key(self) -> tuple[int, ...]:
        """Ordering used by the shrinker: smaller is simpler."""
        return (
            self.num_routes,
            self.num_tokens,
            self.topk,
            self.max_loras,
            self.num_experts,
            self.ep.ep_size if self.ep else 0,
            self.block_size,
            self.max_num_tokens_padded or 0,
            int(np.abs(self.topk_ids.astype(np.int64)).sum()),
        )

    # -- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = {"dtype": str(value.dtype), "shape": list(value.shape),
                         "data": value.reshape(-1).tolist()}
            elif isinstance(value, EPGroup):
                value = dataclasses.asdict(value)
                value["ranks"] = list(value["ranks"])
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k != REPRO_CALLS}
        unknown = set(data) - known
        if unknown:
            raise CaseError(f"case has unknown field(s) {sorted(unknown)}: allowed {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name in _ARRAY_FIELDS and value is not None:
                try:
                    value = np.asarray(value["data"], dtype=np.dtype(value["dtype"])).reshape(
                        value["shape"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise CaseError(
                        f"case field {name}: not a valid array record ({exc})") from None
            elif name == "ep" and value is not None:
                value = EPGroup(**{**value, "ranks": tuple(value.get("ranks", ()))})
            elif name == "edge_classes":
                value = tuple(value)
            kwargs[name] = value
        try:
            case = cls(**kwargs)
        except TypeError as exc:  # a required field missing
            raise CaseError(f"case is incomplete: {exc}") from None
        return check_case(case)

    @classmethod
    def from_json(cls, text: str) -> Case:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CaseError(f"case file is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CaseError("case file must hold a JSON object")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> Case:
        """A copy with ``changes`` applied and a fresh content id."""
        changes.setdefault("case_id", "")
        return dataclasses.replace(self, **changes)

    def _content_id(self) -> str:
        """A hash of every input (not of tags, seed or note): equal inputs, equal id."""
        digest = hashlib.sha1()
        for f in dataclasses.fields(self):
            if f.name in ("case_id", "seed", "note", "edge_classes"):
                continue
            value = getattr(self, f.name)
            if f.name in _OPTION_FIELDS and value == _OPTION_FIELDS[f.name]:
                continue
            digest.update(f.name.encode())
            if isinstance(value, np.ndarray):
                digest.update(f"{value.dtype}{value.shape}".encode())
                digest.update(np.ascontiguousarray(value).tobytes())
            else:
                digest.update(repr(value).encode())
        return f"{self.dialect}-{digest.hexdigest()[:12]}"


def check_case(case: Case) -> Case:
    """``case`` if it is one the generator could have made, else a :class:`CaseError`.

    The rules the generator and the shrinker obey: the oracle accepts the inputs of
    every rank (so sizes, dtypes, shapes and ids are in its domain), every edge
    class is a known one, and a case tagged ``production`` is inside that contract.
    A case file is checked with it on load, so a bad field is the user's input
    error (exit 2), never a verdict against the kernel.
    """
    from .dialects import DIALECT_INFO

    unknown = sorted(set(case.edge_classes) - set(EDGE_CLASSES))
    if unknown:
        raise CaseError(f"edge_classes has unknown class(es) {unknown}: known {list(EDGE_CLASSES)}")
    info = DIALECT_INFO[case.dialect]
    try:
        for rank in case.ranks():
            info.reference(case, rank)
    except CaseError:
        raise
    except (ValueError, TypeError, IndexError) as exc:
        where = "" if rank is None else f" (rank {rank})"
        raise CaseError(f"{' '.join(str(exc).split())}{where}") from None
    if case.contract == "production":
        from .classify import defensive_reasons

        reasons = defensive_reasons(case)
        if reasons:
            raise CaseError(f"contract='production' but the case is outside it "
                            f"({'; '.join(reasons)}): tag it 'defensive'")
    return case


def rank_inputs(case: Case, rank: int | None) -> dict[str, Any]:
    """The inputs one rank's call receives (SPEC §6 dispatch), as NumPy values.

    Returns ``topk_ids``, ``num_experts``, ``expert_map`` and
    ``max_num_tokens_padded`` for that rank; without EP, the case's own.
    """
    topk_ids, num_experts, expert_map = case.topk_ids, case.num_experts, case.expert_map
    if case.ep is not None and rank is not None and case.dialect != "ep-remap":
        local_count, rank_map = oracle.ep.expert_map(
            case.ep.global_num_experts, case.ep.ep_size, rank, case.ep.strategy)
        if case.ep.dispatch == "local_ids":
            topk_ids = oracle.ep.to_local_topk(topk_ids, rank_map, num_experts=num_experts)
            num_experts, expert_map = local_count, None
        else:
            expert_map = rank_map
    padded = case.max_num_tokens_padded
    if padded is None and case.dialect != "ep-remap":
        padded = production_padded_size(case.dialect, int(topk_ids.size), num_experts,
                                        case.block_size)
    return {
        "topk_ids": topk_ids,
        "num_experts": int(num_experts),
        "expert_map": expert_map,
        "max_num_tokens_padded": padded,
    }


def production_padded_size(dialect: str, numel: int, num_experts: int, block_size: int) -> int:
    """The ``max_num_tokens_padded`` a serving stack allocates for one call of ``dialect``.

    SGLang's plain align sizes for ``E + 1`` segments without rounding up
    (:func:`oracle.sglang_padded_size`); every other dialect uses SPEC §2
    (:func:`oracle.padded_size`). ``num_experts`` is the rank's ``E``.
    """
    if dialect == "sglang-align":
        return oracle.sglang_padded_size(numel, num_experts, block_size)
    return oracle.padded_size(numel, num_experts, block_size)
