"""The vllm / sglang adapters, pinned with fakes that have the engines' signatures."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from difftest import adapters, registry
from difftest.case import Case
from difftest.errors import ImplementationError
from difftest.evaluate import evaluate
from difftest.sandbox import InProcessRunner

# The engines' published signatures (vllm._custom_ops, sgl_kernel), which
# DESIGN.md's calling conventions follow positionally.
VLLM_LORA = ("topk_ids", "token_lora_mapping", "num_experts", "block_size", "max_loras",
             "max_num_tokens_padded", "max_num_m_blocks", "sorted_token_ids", "experts_ids",
             "num_tokens_post_pad", "adapter_enabled", "lora_ids", "expert_map")
VLLM_ALIGN = ("topk_ids", "num_experts", "block_size", "sorted_token_ids", "experts_ids",
              "num_tokens_post_pad", "expert_map")
SGLANG_LORA = ("topk_ids", "seg_indptr", "req_to_lora", "num_experts", "block_size",
               "max_loras", "max_num_tokens_padded", "max_num_m_blocks", "sorted_token_ids",
               "expert_ids", "num_tokens_post_pad", "adapter_enabled", "lora_ids", "expert_map",
               "cumsum_buffer", "token_mask")

FAKE = '''
import inspect
from cuda_impl import torch_impl
_ok = torch_impl.implementation()
CALLS = []

def _record(fn, args):
    bound = inspect.signature(fn).bind(*args)
    CALLS.append(dict(bound.arguments))

def moe_lora_align_block_size({vllm_lora}):
    args = ({vllm_lora_names})
    _record(moe_lora_align_block_size, args)
    _ok["{lora_dialect}"](*args)

def moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
                         num_tokens_post_pad, expert_map=None):
    args = (topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
            num_tokens_post_pad, expert_map)
    _record(moe_align_block_size, args)
    _ok["align"](*args)
'''


def _write_fake(tmp_path, monkeypatch, name, params, lora_dialect):
    sig = ", ".join(p if p != "expert_map" or lora_dialect == "sglang-lora" else "expert_map=None"
                    for p in params)
    (tmp_path / f"{name}.py").write_text(FAKE.format(
        vllm_lora=sig, vllm_lora_names=", ".join(params), lora_dialect=lora_dialect))
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def fake_engines(tmp_path, monkeypatch):
    _write_fake(tmp_path, monkeypatch, "fake_vllm_ops", VLLM_LORA, "vllm-lora")
    _write_fake(tmp_path, monkeypatch, "fake_sgl_kernel", SGLANG_LORA, "sglang-lora")
    monkeypatch.setattr(adapters, "SOURCES", {
        "vllm": {"vllm-lora": [("fake_vllm_ops", "moe_lora_align_block_size")],
                 "align": [("fake_vllm_ops", "moe_align_block_size")]},
        "sglang": {"sglang-lora": [("missing_jit_module", "moe_lora_align_block_size"),
                                   ("fake_sgl_kernel", "moe_lora_align_block_size")]},
    })


def test_fakes_have_the_engines_signatures(fake_engines):
    import fake_sgl_kernel
    import fake_vllm_ops

    assert tuple(inspect.signature(fake_vllm_ops.moe_lora_align_block_size).parameters) == (
        VLLM_LORA)
    assert tuple(inspect.signature(fake_vllm_ops.moe_align_block_size).parameters) == (
        VLLM_ALIGN)
    assert tuple(inspect.signature(fake_sgl_kernel.moe_lora_align_block_size).parameters) == (
        SGLANG_LORA)


def test_vllm_adapter_calls_the_ops_positionally_in_the_engine_order(fake_engines):
    import fake_vllm_ops

    impl = registry.resolve("vllm")
    assert impl.dialects == ("vllm-lora", "align")
    case = Case("vllm-lora", "production", np.array([[1], [0]], dtype=np.int32), 2, 2,
                max_loras=1, token_lora_mapping=np.array([-1, 0], dtype=np.int32))
    runner = InProcessRunner(impl, "cpu")
    assert evaluate(case, runner.run(case), stable=impl.stable).verdict == "pass"
    call = fake_vllm_ops.CALLS[-1]
    assert call["num_experts"] == 2 and call["block_size"] == 2 and call["max_loras"] == 1
    assert call["max_num_tokens_padded"] == 4 and call["max_num_m_blocks"] == 2
    assert call["lora_ids"].tolist() == [-1, 0]
    assert call["experts_ids"].numel() == 2 and call["expert_map"] is None


def test_sglang_adapter_falls_back_to_the_next_source(fake_engines):
    import fake_sgl_kernel

    impl = registry.resolve("sglang")
    assert impl.dialects == ("sglang-lora",)
    case = Case("sglang-lora", "production", np.array([[0], [1]], dtype=np.int32), 2, 1,
                max_loras=1, seg_indptr=np.array([0, 2], dtype=np.int32),
                req_to_lora=np.array([0], dtype=np.int32))
    runner = InProcessRunner(impl, "cpu")
    assert evaluate(case, runner.run(case), stable=impl.stable).verdict == "pass"
    call = fake_sgl_kernel.CALLS[-1]
    assert call["cumsum_buffer"].numel() == 1 * (2 + 1) and call["token_mask"].numel() == 2


def test_absent_engine_is_a_clear_usage_error(monkeypatch):
    monkeypatch.setattr(adapters, "SOURCES", {
        "vllm": {"vllm-lora": [("surely_not_installed_vllm", "op")]},
        "sglang": {"sglang-lora": [("surely_not_installed_sgl", "op")]}})
    for engine, hint in (("vllm", "pip install vllm"), ("sglang", "pip install sglang")):
        with pytest.raises(ImplementationError, match=f"not importable here; install it \\({hint}"):
            registry.resolve(engine)
        assert engine not in registry.names()
