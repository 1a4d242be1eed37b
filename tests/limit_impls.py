"""Callables for the limits, signature and internal-error tests (``--impl py:limit_impls:...``).

Each is the correct torch ``align`` implementation with a deliberate behaviour at
a size bound: a clean rejection above ``LIMIT_E`` experts (declared or not), a
rejection that writes before it raises, or two unrelated errors.
"""

from __future__ import annotations

from cuda_impl import torch_impl

_ALIGN = torch_impl.implementation()["align"]

#: The most experts the rejecting callables accept.
LIMIT_E = 200


def _align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map=None):
    _ALIGN(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map)


def rejects_many_experts(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                         num_tokens_post_pad, expert_map=None):
    """Correct up to LIMIT_E experts; more are rejected cleanly (nothing written)."""
    if num_experts > LIMIT_E:
        raise RuntimeError(f"num_experts must be at most {LIMIT_E}, got {num_experts}")
    _align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map)


rejects_many_experts.difftest_limits = {"num_experts": (1, LIMIT_E)}


def rejects_many_experts_undeclared(topk_ids, num_experts, block_size, sorted_token_ids,
                                    expert_ids, num_tokens_post_pad, expert_map=None):
    """The same kernel with no declared limits."""
    rejects_many_experts(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                         num_tokens_post_pad, expert_map)


def writes_then_rejects(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                        num_tokens_post_pad, expert_map=None):
    """Declares LIMIT_E, but writes num_tokens_post_pad before it rejects more experts."""
    if num_experts > LIMIT_E:
        num_tokens_post_pad.fill_(0)
        raise RuntimeError(f"num_experts must be at most {LIMIT_E}")
    _align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map)


writes_then_rejects.difftest_limits = {"num_experts": (1, LIMIT_E)}


def accepts_everything_declares_little(topk_ids, num_experts, block_size, sorted_token_ids,
                                       expert_ids, num_tokens_post_pad, expert_map=None):
    """Correct everywhere, though it declares at most 16 experts (probes pass)."""
    _align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map)


accepts_everything_declares_little.difftest_limits = {"num_experts": (1, 16)}


def two_errors(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
               num_tokens_post_pad, expert_map=None):
    """Two unrelated errors: too many experts, and an empty batch."""
    if topk_ids.shape[0] == 0:
        raise ValueError(f"launch at 0x7f3a{topk_ids.shape[1]:04x}: invalid argument")
    if num_experts > 100:
        raise RuntimeError(f"padded_num_experts must be less than {128} (got {num_experts})")
    _align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map)


def unknown_limit_name(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                       num_tokens_post_pad, expert_map=None):
    """Declares a limit name difftest does not know."""
    _align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
           num_tokens_post_pad, expert_map)


unknown_limit_name.difftest_limits = {"experts": (1, 8)}


def many_errors(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                num_tokens_post_pad, expert_map=None):
    """A distinct error message (a distinct signature) per expert count modulo 26."""
    raise RuntimeError("code " + "abcdefghijklmnopqrstuvwxyz"[num_experts % 26] * 3)
