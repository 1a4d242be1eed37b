"""Campaigns catch users' wrong callables, and survive the ones that crash or hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from difftest import registry
from difftest.campaign import Campaign
from difftest.case import Case
from difftest.sandbox import SandboxRunner

TESTS = Path(__file__).parent
BUDGET_S = 30.0


@pytest.mark.parametrize("name, check", [
    ("skips_slot_at_index_l", "num_tokens_post_pad"),
    ("wrong_total_for_int64", "num_tokens_post_pad"),
    ("wrong_blocks_for_block_size_one", "expert_ids"),
    ("writes_past_last_row", "guard_band"),
    ("mutates_mapping", "input_mutated"),
])
def test_wrong_user_callable_is_caught_within_budget(name, check, tmp_path):
    impl = registry.resolve(f"py:user_impls:{name}", "vllm-lora")
    start = time.monotonic()
    with SandboxRunner(impl, "cpu", timeout_s=60) as runner:
        campaign = Campaign(impl, runner, tmp_path, seed=0)
        campaign.generate(dialects=impl.dialects, contracts=("production", "defensive"),
                          max_examples=None, seconds=BUDGET_S, stop_on_failure=True)
        campaign.close()
    elapsed = time.monotonic() - start
    failures = campaign.result.failures
    assert len(failures) == 1, failures
    (sig, failure), = failures.items()
    assert sig == f"vllm-lora--mismatch--{check}"
    assert elapsed < BUDGET_S + 15  # worker start-up is outside the case budget
    assert failure.seconds_until_failure < BUDGET_S


def test_align_callable_without_expert_map_support_is_an_error(tmp_path):
    impl = registry.resolve("py:user_impls:align_raises_on_expert_map")
    assert impl.dialects == ("align",)
    with SandboxRunner(impl, "cpu") as runner:
        campaign = Campaign(impl, runner, tmp_path, seed=0)
        campaign.generate(dialects=impl.dialects, contracts=("production",), max_examples=None,
                          seconds=BUDGET_S, stop_on_failure=True)
        campaign.close()
    assert list(campaign.result.failures) == ["align--error--exception"]
    failure = campaign.result.failures["align--error--exception"]
    assert "NotImplementedError: expert_map is not supported" in failure.evaluation.detail


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    return subprocess.run([sys.executable, "-m", "difftest", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name, verdict", [
    ("segfaults_on_empty_batch", "crash"),
    ("hangs_on_disabled_adapter", "timeout"),
])
def test_crashing_or_hanging_callable_runs_to_the_end_of_its_budget(name, verdict, tmp_path):
    out = tmp_path / "run"
    done = _cli("run", "--impl", f"py:user_impls:{name}", "--dialect", "vllm-lora",
                "--seconds", "25", "--seed", "0", "--timeout", "1", "--shrink-seconds", "40",
                "--out", out, "--no-db")
    assert done.returncode == 1, done.stderr
    verdicts = pq.read_table(out / "cases.parquet").column("verdict").to_pylist()
    assert verdict in verdicts
    first_bad = verdicts.index(verdict)
    assert "pass" in verdicts[first_bad + 1:], "the campaign went on after the failure"
    bug = out / "bugs" / f"vllm-lora--{verdict}--{verdict}"
    minimal = Case.from_json((bug / "case.json").read_text())
    if verdict == "crash":
        # the smallest empty batch: T = 0 (K, E, B, L at their floor)
        assert (minimal.num_tokens, minimal.topk, minimal.num_experts, minimal.block_size,
                minimal.max_loras) == (0, 1, 1, 1, 1)
        assert "SIGSEGV" in (bug / "report.md").read_text()
    else:
        # the smallest case with a listed, disabled slot
        assert minimal.max_loras == 1 and minimal.block_size == 1
        assert minimal.adapter_enabled is not None and 0 in minimal.adapter_enabled[:1].tolist()
