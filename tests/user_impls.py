"""Callables a user might bring with ``--impl py:user_impls:<name>``.

Each is the correct torch implementation with one deliberate bug, most of
them on an edge class a plain random test rarely reaches. The tests prove the
framework catches every one within a small budget, and that the sandbox
survives the ones that kill or hang their process.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import time

from cuda_impl import torch_impl

_OK = torch_impl.implementation()


def correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map=None):
    """The correct torch implementation, as a user callable."""
    _OK["vllm-lora"](topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                     max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                     num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)


def skips_slot_at_index_l(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                          max_num_tokens_padded, max_num_m_blocks, sorted_token_ids,
                          expert_ids, num_tokens_post_pad, adapter_enabled, lora_ids,
                          expert_map=None):
    """Launches over lora_ids[:L]: wrong only when a real slot sits at lora_ids[L]."""
    _OK["vllm-lora"](topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                     max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                     num_tokens_post_pad, adapter_enabled, lora_ids[:max_loras].clone(),
                     expert_map)


def wrong_total_for_int64(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                          max_num_tokens_padded, max_num_m_blocks, sorted_token_ids,
                          expert_ids, num_tokens_post_pad, adapter_enabled, lora_ids,
                          expert_map=None):
    """Right for int32 ids; with int64 ids it adds one block to every written total."""
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)
    if topk_ids.dtype.itemsize == 8:
        for slot in lora_ids.tolist():
            if 0 <= slot < max_loras and int(adapter_enabled[slot]) != 0:
                num_tokens_post_pad[slot] += block_size


def wrong_blocks_for_block_size_one(topk_ids, token_lora_mapping, num_experts, block_size,
                                    max_loras, max_num_tokens_padded, max_num_m_blocks,
                                    sorted_token_ids, expert_ids, num_tokens_post_pad,
                                    adapter_enabled, lora_ids, expert_map=None):
    """With B = 1 the inactive blocks get 0 instead of -1."""
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)
    if block_size == 1:
        expert_ids[expert_ids == -1] = 0


def writes_past_last_row(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                         max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                         num_tokens_post_pad, adapter_enabled, lora_ids, expert_map=None):
    """Correct, then one store past the end of sorted_token_ids (an overrun in one allocation)."""
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)
    if topk_ids.shape[0] > 3:
        past = sorted_token_ids.as_strided((1,), (1,), sorted_token_ids.storage_offset()
                                           + sorted_token_ids.numel())
        past.fill_(7)


def segfaults_on_empty_batch(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                             max_num_tokens_padded, max_num_m_blocks, sorted_token_ids,
                             expert_ids, num_tokens_post_pad, adapter_enabled, lora_ids,
                             expert_map=None):
    """Dereferences NULL when T = 0 (kills the process with SIGSEGV)."""
    if topk_ids.shape[0] == 0:
        ctypes.string_at(0)
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)


def hangs_on_disabled_adapter(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                              max_num_tokens_padded, max_num_m_blocks, sorted_token_ids,
                              expert_ids, num_tokens_post_pad, adapter_enabled, lora_ids,
                              expert_map=None):
    """Spins forever when a listed slot is disabled."""
    listed = [s for s in lora_ids.tolist() if 0 <= s < max_loras]
    if any(int(adapter_enabled[s]) == 0 for s in listed):
        while True:
            time.sleep(0.05)
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)


def mutates_mapping(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                    max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                    num_tokens_post_pad, adapter_enabled, lora_ids, expert_map=None):
    """Correct outputs, but clamps token_lora_mapping in place (an input must not change)."""
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)
    token_lora_mapping.clamp_(min=0)


def align_raises_on_expert_map(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                               num_tokens_post_pad, expert_map=None):
    """Plain align that does not support expert_map (raises)."""
    if expert_map is not None:
        raise NotImplementedError("expert_map is not supported")
    _OK["align"](topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, None)


_STALE = {"num_experts": 0}  # what the previous call of stale_total_after_more_experts saw


def stale_total_after_more_experts(topk_ids, token_lora_mapping, num_experts, block_size,
                                   max_loras, max_num_tokens_padded, max_num_m_blocks,
                                   sorted_token_ids, expert_ids, num_tokens_post_pad,
                                   adapter_enabled, lora_ids, expert_map=None):
    """Two bugs: a stateful one and a plain one.

    Stateful: it keeps its per-expert counts from one call to the next and clears only
    this call's ``num_experts`` of them, so right after a call with more experts every
    written total is one block too many (it passes alone, fails after such a call).
    Plain: with B = 1 the inactive blocks get 0 instead of -1 (it fails alone too).
    """
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)
    if _STALE["num_experts"] > num_experts:
        for slot in lora_ids.tolist():
            if 0 <= slot < max_loras and int(adapter_enabled[slot]) != 0:
                num_tokens_post_pad[slot] += block_size
    _STALE["num_experts"] = num_experts
    if block_size == 1:
        expert_ids[expert_ids == -1] = 0


def _next_call() -> int:
    """The number of calls so far of every process sharing ``$USER_IMPLS_CALLS`` (a file)."""
    path = os.environ["USER_IMPLS_CALLS"]
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0)
        f.seek(0)
        f.truncate()
        f.write(str(n + 1))
    return n


def wrong_total_every_other_call(topk_ids, token_lora_mapping, num_experts, block_size,
                                 max_loras, max_num_tokens_padded, max_num_m_blocks,
                                 sorted_token_ids, expert_ids, num_tokens_post_pad,
                                 adapter_enabled, lora_ids, expert_map=None):
    """Race-like: every second call (counted across processes) adds one block to every
    written total, whatever the case; a re-run alone fails half the time."""
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)
    if _next_call() % 2 == 1:
        for slot in lora_ids.tolist():
            if 0 <= slot < max_loras and int(adapter_enabled[slot]) != 0:
                num_tokens_post_pad[slot] += block_size


def segfaults_when_tokens_mod_3_is_2(topk_ids, token_lora_mapping, num_experts, block_size,
                                     max_loras, max_num_tokens_padded, max_num_m_blocks,
                                     sorted_token_ids, expert_ids, num_tokens_post_pad,
                                     adapter_enabled, lora_ids, expert_map=None):
    """Dereferences NULL when T % 3 == 2 (the smallest such batch: T = 2)."""
    if topk_ids.shape[0] % 3 == 2:
        ctypes.string_at(0)
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)


def segfaults_on_large_path_with_invalid_route(topk_ids, num_experts, block_size,
                                               sorted_token_ids, expert_ids,
                                               num_tokens_post_pad, expert_map=None):
    """Plain align whose large path (N >= 1024 routes or E > 64) dereferences NULL on a
    ``-1`` route: one route and E = 65 are enough."""
    large = topk_ids.numel() >= 1024 or num_experts > 64
    if large and bool((topk_ids == -1).any()):
        ctypes.string_at(0)
    _OK["align"](topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, expert_map)


FAR_SLOT = 1 << 20


def segfaults_on_a_far_slot(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                            max_num_tokens_padded, max_num_m_blocks, sorted_token_ids,
                            expert_ids, num_tokens_post_pad, adapter_enabled, lora_ids,
                            expert_map=None):
    """Dereferences NULL when a ``lora_ids`` entry is ``FAR_SLOT`` or more past ``L``, as a
    kernel writing that slot's row without a bounds check faults on an unmapped page
    (nearer slots land in mapped memory)."""
    if bool((lora_ids.long() >= max_loras + FAR_SLOT).any()):
        ctypes.string_at(0)
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)


def segfaults_on_odd_tokens(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                            max_num_tokens_padded, max_num_m_blocks, sorted_token_ids,
                            expert_ids, num_tokens_post_pad, adapter_enabled, lora_ids,
                            expert_map=None):
    """Dereferences NULL when T is odd: a kernel that crashes on about half the cases."""
    if topk_ids.shape[0] % 2 == 1:
        ctypes.string_at(0)
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)


def fails_every_written_slot(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                             max_num_tokens_padded, max_num_m_blocks, sorted_token_ids,
                             expert_ids, num_tokens_post_pad, adapter_enabled, lora_ids,
                             expert_map=None):
    """Correct, then one block too many in every written total: fails nearly every case."""
    correct_vllm(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                 max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, adapter_enabled, lora_ids, expert_map)
    written = num_tokens_post_pad != -559038737  # the harness's sentinel: a row not written
    num_tokens_post_pad[written] += block_size
