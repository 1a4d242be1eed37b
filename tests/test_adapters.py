"""The vllm / sglang adapters, pinned with fakes that have the engines' signatures."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from difftest import adapters, registry
from difftest.adapters import Source
from difftest.case import Case
from difftest.cli import main
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
               "expert_ids", "num_tokens_post_pad", "adapter_enabled", "lora_ids",
               "maybe_expert_map", "cumsum_buffer", "token_mask")

# sgl_kernel.moe_align_block_size as of 2026 (older versions lack the last argument)
SGLANG_ALIGN = ("topk_ids", "num_experts", "block_size", "sorted_token_ids", "experts_ids",
                "num_tokens_post_pad", "cumsum_buffer", "pad_sorted_token_ids",
                "ignore_invalid_expert")

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
    _fake_sources(monkeypatch)


def _fake_sources(monkeypatch, vllm_module="fake_vllm_ops"):
    monkeypatch.setattr(adapters, "SOURCES", {
        "vllm": {"vllm-lora": [Source(vllm_module, "moe_lora_align_block_size", VLLM_LORA)],
                 "align": [Source(vllm_module, "moe_align_block_size", VLLM_ALIGN)]},
        "sglang": {"sglang-lora": [
            Source("missing_jit_module", "moe_lora_align_block_size", SGLANG_LORA),
            Source("fake_sgl_kernel", "moe_lora_align_block_size", SGLANG_LORA)]},
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
        "vllm": {"vllm-lora": [Source("surely_not_installed_vllm", "op", VLLM_LORA)]},
        "sglang": {"sglang-lora": [Source("surely_not_installed_sgl", "op", SGLANG_LORA)]}})
    for engine, hint in (("vllm", "pip install vllm"), ("sglang", "pip install sglang")):
        with pytest.raises(ImplementationError, match=f"not importable here; install it \\({hint}"):
            registry.resolve(engine)
        assert engine not in registry.names()


def test_the_adapters_pin_the_engines_published_argument_lists():
    pins = {(e, d): [s.params for s in c] for e, by in adapters.SOURCES.items()
            for d, c in by.items()}
    assert pins == {("vllm", "vllm-lora"): [VLLM_LORA], ("vllm", "align"): [VLLM_ALIGN],
                    ("sglang", "sglang-lora"): [SGLANG_LORA, SGLANG_LORA],
                    ("sglang", "sglang-align"): [SGLANG_ALIGN, SGLANG_ALIGN]}
    # a version without the 2026 ignore_invalid_expert is called without it
    assert [s.newer for s in adapters.SOURCES["sglang"]["sglang-align"]] == [1, 1]


OLD_VLLM = '''
def moe_lora_align_block_size(topk_ids, token_lora_mapping, num_experts, block_size, max_loras,
                              max_num_tokens_padded, max_num_m_blocks, sorted_token_ids,
                              expert_ids, num_tokens_post_pad, adapter_enabled, lora_ids,
                              expert_map=None):
    raise AssertionError("never called")

def moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids, experts_ids,
                         num_tokens_post_pad):
    raise AssertionError("never called")
'''


@pytest.fixture
def old_vllm(tmp_path, monkeypatch):
    """A vLLM whose lora op renamed an argument and whose align lacks expert_map."""
    (tmp_path / "old_vllm_ops.py").write_text(OLD_VLLM)
    monkeypatch.syspath_prepend(str(tmp_path))
    _fake_sources(monkeypatch, "old_vllm_ops")


def test_an_installed_function_whose_arguments_differ_is_refused_naming_the_first(
        old_vllm, capsys):
    assert main(["run", "--impl", "vllm", "--dialect", "vllm-lora"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("--impl vllm: old_vllm_ops.moe_lora_align_block_size does not match the vllm-lora "
            "calling convention difftest pins for it: argument 9 is 'expert_ids', expected "
            "'experts_ids'") in err
    assert main(["run", "--impl", "vllm", "--dialect", "align"]) == 2
    assert ("old_vllm_ops.moe_align_block_size does not match the align calling convention "
            "difftest pins for it: argument 7 is missing, expected 'expert_map'"
            in capsys.readouterr().err)


def test_an_extra_required_argument_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "new_vllm_ops.py").write_text(
        "def moe_align_block_size(topk_ids, num_experts, block_size, sorted_token_ids,\n"
        "                         experts_ids, num_tokens_post_pad, expert_map, stream):\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(adapters, "SOURCES", {
        "vllm": {"align": [Source("new_vllm_ops", "moe_align_block_size", VLLM_ALIGN)]},
        "sglang": {}})
    assert main(["run", "--impl", "vllm"]) == 2
    assert ("align passes 7 arguments: topk_ids, num_experts, block_size, sorted_token_ids, "
            "experts_ids, num_tokens_post_pad, expert_map; new_vllm_ops.moe_align_block_size "
            "requires 8" in capsys.readouterr().err)


def test_list_names_both_engines_installed_or_not(fake_engines, monkeypatch, capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("  vllm                         calls vllm-lora: "
            "fake_vllm_ops.moe_lora_align_block_size; align: "
            "fake_vllm_ops.moe_align_block_size") in lines
    monkeypatch.setattr(adapters, "SOURCES", {
        "vllm": {"vllm-lora": [Source("surely_not_installed_vllm", "op", VLLM_LORA)]},
        "sglang": {"sglang-lora": [Source("surely_not_installed_sgl", "op", SGLANG_LORA)]}})
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("  vllm                         not installed (pip install vllm); calls vllm-lora: "
            "surely_not_installed_vllm.op") in lines
    assert ("  sglang                       not installed (pip install sglang sgl-kernel); calls "
            "sglang-lora: surely_not_installed_sgl.op") in lines
