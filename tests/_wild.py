"""A batch in which one case writes far outside its buffers, for the attribution tests.

Five ``align`` cases; the third (E = 7) stores ``2`` into the inputs of the fourth,
which has not run yet, and into the outputs of the second, already read back. The
store itself is the caller's (``store(sorted_token_ids, byte_offset)``): a raw
pointer on the CPU, a CUDA kernel on the GPU.
"""

from __future__ import annotations

import numpy as np

from cuda_impl import torch_impl
from difftest.case import Case
from difftest.dialects import DIALECT_INFO
from difftest.execute import Staged


def align(first_expert: int, num_experts: int = 3) -> Case:
    return Case("align", "production", np.array([[first_expert, 1]], dtype=np.int32),
                num_experts, 2)


CASES = [align(0), align(1), align(2, num_experts=7), align(0), align(1)]
# (case, buffer, role, element, value) of what the writer's wild_write names, in order
WRITES = [(CASES[1].case_id, "expert_ids", "output", 1, 2),
          (CASES[3].case_id, "topk_ids", "input", 0, 2)]


def offsets() -> tuple[int, int]:
    """Bytes from the writer's ``sorted_token_ids`` to the two elements it hits."""
    staged = [Staged(DIALECT_INFO["align"].plan(c, None)) for c in CASES]
    bases = np.cumsum([0] + [s.nbytes for s in staged])

    def data(k: int, name: str) -> int:
        return int(bases[k] + next(b.data for b in staged[k].buffers if b.name == name))

    origin = data(2, "sorted_token_ids")
    return data(3, "topk_ids") - origin, data(1, "expert_ids") + 4 - origin


def store_two(tensor, offset: int) -> None:
    """The CPU's store: ``2`` as int32 at ``offset`` bytes from ``tensor``'s data."""
    import ctypes

    ctypes.memmove(tensor.data_ptr() + offset, (ctypes.c_int32 * 1)(2), 4)


def writer(store, behind_only: bool = False):
    """The correct torch ``align``, plus the two stores of the case with E = 7 (only the
    one into the second case's outputs, already read back, with ``behind_only``)."""
    ok = torch_impl.implementation()["align"]
    ahead, behind = offsets()

    def writes_far(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                   num_tokens_post_pad, expert_map=None):
        ok(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map)
        if num_experts == 7:
            for offset in (behind,) if behind_only else (ahead, behind):
                store(sorted_token_ids, offset)

    return writes_far
