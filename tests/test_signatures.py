"""A callable that cannot take its dialect's arguments is refused before the campaign."""

from __future__ import annotations

import pytest

from difftest.cli import main
from difftest.errors import LoadError, UsageError
from difftest.signatures import check_arguments, dialect_arguments

VLLM_LORA_ARGS = ("topk_ids, token_lora_mapping, num_experts, block_size, max_loras, "
                  "max_num_tokens_padded, max_num_m_blocks, sorted_token_ids, expert_ids, "
                  "num_tokens_post_pad, adapter_enabled, lora_ids, expert_map")

USERK = '''
def two_args(topk_ids, token_lora_mapping):
    pass

def star_args(topk_ids, num_experts, *rest):
    pass

def needs_stream(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, expert_map, stream):
    pass

def keyword_only(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids,
                 num_tokens_post_pad, expert_map=None, *, stream):
    pass
'''


@pytest.fixture
def userk(tmp_path, monkeypatch):
    (tmp_path / "userk.py").write_text(USERK)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import userk as module

    return importlib.reload(module)


def _refusal(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_callable_with_too_few_arguments_is_refused_saying_what_the_dialect_passes(
        userk, tmp_path, capsys):
    out = tmp_path / "run"
    err = _refusal(["run", "--impl", "py:userk:two_args", "--out", str(out)], capsys)
    assert err == (f"difftest: --impl py:userk:two_args: vllm-lora passes 13 arguments: "
                   f"{VLLM_LORA_ARGS}; py:userk:two_args takes 2\n")
    assert not out.exists()  # refused before any campaign started


def test_extra_required_or_keyword_only_arguments_are_refused(userk, capsys):
    assert "py:userk:needs_stream requires 8" in _refusal(
        ["run", "--impl", "py:userk:needs_stream", "--dialect", "align"], capsys)
    assert "py:userk:keyword_only also requires the keyword argument 'stream'" in _refusal(
        ["run", "--impl", "py:userk:keyword_only", "--dialect", "align"], capsys)
    with pytest.raises(LoadError, match="also requires the keyword argument 'stream'"):
        check_arguments(userk.keyword_only, "align", "py:userk:keyword_only")


def test_a_callable_that_can_take_the_arguments_is_let_through(userk):
    check_arguments(userk.star_args, "align", "py:userk:star_args")
    check_arguments(lambda *args, **kwargs: None, "sglang-lora", "py:m:anything")
    check_arguments(max, "align", "py:builtins:max")  # signature unreadable: not judged


def test_check_callable_refuses_before_running_a_case(userk, tmp_path):
    from difftest.api import check_callable

    with pytest.raises(UsageError, match="vllm-lora passes 13 arguments: topk_ids, "
                                         "token_lora_mapping, .*; py:userk:two_args takes 2"):
        check_callable(userk.two_args, "vllm-lora", out_dir=tmp_path / "out", database=None)
    assert not (tmp_path / "out").exists()


def test_dialect_arguments_are_the_calling_conventions_in_order():
    assert dialect_arguments("vllm-lora") == tuple(VLLM_LORA_ARGS.split(", "))
    assert dialect_arguments("ep-remap") == ("topk_ids", "global_num_experts", "ep_size",
                                             "ep_rank", "strategy", "local_topk_ids")
