"""Repeats a worker leaves out: its canonical form on the device is compare.canonical's,
and what it leaves out evaluates as what it would have sent (SPEC §9, repeat_disagree)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from difftest import registry
from difftest.campaign import REPEAT_KEY_MIN_ROUTES, Campaign
from difftest.compare import RowOrder, canonical, repeat_key, same_canonical
from difftest.dialects import RowsExpected
from difftest.evaluate import evaluate, expected_by_rank
from difftest.execute import CanonicalForm, RankRun, run_batch
from difftest.sandbox import InProcessRunner, Outcome
from difftest.strategies import cases

torch = pytest.importorskip("torch")
IMPL = registry.resolve("torch")


@pytest.fixture(scope="module")
def calls():
    return IMPL.load()


def _tensors(outputs: dict) -> dict:
    return {name: torch.from_numpy(value) for name, value in outputs.items()}


def _variant(expected, outputs: dict, kind: int, rng: np.random.Generator) -> dict:
    """A copy of ``outputs``: 0 its segments shuffled, 1 two positions swapped, 2 one
    element of one output changed by one."""
    out = {name: value.copy() for name, value in outputs.items()}
    if kind == 0 and isinstance(expected, RowsExpected):
        _, index, high = RowOrder(expected)._layout
        flat = out["sorted_token_ids"].reshape(-1)
        flat[index] = flat[index][np.lexsort((rng.random(index.size), high))]
    elif kind == 1 and isinstance(expected, RowsExpected) and out["sorted_token_ids"].size:
        flat = out["sorted_token_ids"].reshape(-1)
        i, j = rng.integers(0, flat.size, 2)
        flat[i], flat[j] = flat[j], flat[i]
    else:
        values = out[sorted(out)[int(rng.integers(0, len(out)))]].reshape(-1)
        if values.size:
            values[int(rng.integers(0, values.size))] += 1
    return out


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(case=cases(IMPL.dialects, ("production", "defensive"), max_tokens=200,
                  allow_large=False),
       seed=st.integers(0, 2**32 - 1))
def test_the_workers_canonical_form_on_the_device_is_compare_canonical(calls, case, seed):
    # every rank of every dialect (sglang-align's unspecified positions and blocks
    # included): a variant has the first run's canonical form on the device exactly
    # when it has it in compare.canonical
    rng = np.random.default_rng(seed)
    expected = expected_by_rank(case)
    for run in run_batch([case], calls, "cpu")[0][0]:
        if run.error is not None:
            continue
        form = CanonicalForm(repeat_key(expected[run.rank]))
        first = form(_tensors(run.outputs))
        for kind in (0, 1, 2, 0, 1, 2):
            outputs = _variant(expected[run.rank], run.outputs, kind, rng)
            other = RankRun(run.rank, outputs)
            want = same_canonical(canonical(case, expected[run.rank], other),
                                  canonical(case, expected[run.rank], run))
            assert bool(form.equal(first, _tensors(outputs))) == want, (case.dialect, kind)


def test_the_device_form_tells_a_reordered_segment_from_a_changed_one():
    # LoRA row of two segments (experts 0 and 1, B = 2): the order inside a segment is
    # free, a route moved into the other segment is not, nor a changed total
    expected = RowsExpected(
        sorted_token_ids=np.array([[1, 0, 3, 2, 4, 4]], dtype=np.int32),
        expert_ids=np.array([[0, 1, -1]], dtype=np.int32),
        num_tokens_post_pad=np.array([4], dtype=np.int32), written=np.array([True]),
        pad_value=4, block_size=2)
    key = repeat_key(expected)
    assert key.lengths.tolist() == [1, 1] and key.per_row.tolist() == [2]
    assert key.block_keys().tolist() == [[0, 1, -1]]

    def outputs(rows, total=4):
        return {"sorted_token_ids": np.array(rows, dtype=np.int32),
                "expert_ids": np.array([0, 1, -1], dtype=np.int32),
                "num_tokens_post_pad": np.array([total], dtype=np.int32)}

    form = CanonicalForm(key)
    first = form(_tensors(outputs([1, 0, 3, 2, 4, 4])))

    def same(rows, total=4):
        return bool(form.equal(first, _tensors(outputs(rows, total))))

    assert same([0, 1, 2, 3, 4, 4])
    assert not same([1, 2, 3, 0, 4, 4])
    assert not same([1, 0, 3, 2, 4, 5])
    assert not same([1, 0, 3, 2, 4, 4], total=6)


def _racy(fn, change):
    """``fn``, with ``change`` applied to its outputs on every second call."""
    count = [0]

    def call(*args):
        fn(*args)
        count[0] += 1
        if count[0] % 2 == 0:
            change(args)
    return call


def _keys(case):
    return [{rank: repeat_key(e) for rank, e in expected_by_rank(case).items()}]


@pytest.fixture(scope="module")
def lora_case():
    from difftest.case import Case

    rng = np.random.default_rng(0)
    T, K = 300, 4
    return Case("vllm-lora", "production", rng.integers(0, 8, (T, K)).astype(np.int32),
                num_experts=8, block_size=16, max_loras=4,
                token_lora_mapping=rng.integers(-1, 4, T).astype(np.int32))


def test_a_repeat_equal_to_the_first_run_comes_back_without_its_outputs(calls, lora_case):
    runs = run_batch([lora_case], calls, "cpu", 3, keys=_keys(lora_case))[0]
    assert [[r.same_as_first for r in repeat] for repeat in runs] == [[False], [True], [True]]
    assert runs[0][0].outputs and runs[1][0].outputs == {} == runs[2][0].outputs
    plain = run_batch([lora_case], calls, "cpu", 3)[0]
    assert not any(r.same_as_first for repeat in plain for r in repeat)
    for outcome in (Outcome(runs), Outcome(plain)):
        assert evaluate(lora_case, outcome, stable=False).verdict == "pass"


def test_a_repeat_reordered_inside_its_segments_is_left_out_and_passes(calls, lora_case):
    def reverse(args):  # each row's first block (inside its first segment) reversed
        rows = args[7].view(args[4], -1)
        rows[:, :16] = rows[:, :16].flip(1).clone()

    fns = {"vllm-lora": _racy(calls["vllm-lora"], reverse)}
    plain = run_batch([lora_case], fns, "cpu", 2)[0]
    assert not np.array_equal(plain[0][0].outputs["sorted_token_ids"],
                              plain[1][0].outputs["sorted_token_ids"])
    fns = {"vllm-lora": _racy(calls["vllm-lora"], reverse)}
    runs = run_batch([lora_case], fns, "cpu", 2, keys=_keys(lora_case))[0]
    assert runs[1][0].same_as_first
    assert evaluate(lora_case, Outcome(runs), stable=False).verdict == "pass"


def test_a_repeat_that_disagrees_is_sent_whole_and_fails_as_without_keys(calls, lora_case):
    def recount(args):  # the race of odd-block-resets-count: a total reset
        args[9].view(-1)[0] = 0

    verdicts = []
    for keys in (_keys(lora_case), None):
        fns = {"vllm-lora": _racy(calls["vllm-lora"], recount)}
        runs = run_batch([lora_case], fns, "cpu", 2, keys=keys)[0]
        assert not runs[1][0].same_as_first and runs[1][0].outputs
        evaluation = evaluate(lora_case, Outcome(runs), stable=False)
        verdicts.append((evaluation.verdict, evaluation.checks_failed))
    assert verdicts[0] == verdicts[1]
    assert verdicts[0][0] == "mismatch" and "repeat_disagree" in verdicts[0][1]


def test_a_campaign_sends_keys_with_the_large_cases_of_a_repeating_runner(tmp_path):
    sent: list[tuple[int, bool]] = []

    class Recording(InProcessRunner):
        def submit(self, cases, keys=None):
            sent.extend((c.num_routes * len(c.ranks()), keys is not None and k is not None)
                        for c, k in zip(cases, keys or [None] * len(cases)))
            super().submit(cases, keys)

    for repeats in (2, 1):
        sent.clear()
        campaign = Campaign(IMPL, Recording(IMPL, "cpu", repeats=repeats), tmp_path / str(repeats),
                            seed=5)
        campaign.generate(dialects=IMPL.dialects, contracts=("production", "defensive"),
                          max_examples=120)
        campaign.close()
        assert campaign.result.verdicts.get("pass", 0) + campaign.result.verdicts.get(
            "rejected", 0) == campaign.result.cases == len(sent)
        assert all(with_keys == (repeats > 1 and routes >= REPEAT_KEY_MIN_ROUTES)
                   for routes, with_keys in sent), sent
        assert any(with_keys for _, with_keys in sent) == (repeats > 1)
        assert not campaign._expected  # each case's oracle values used once, then dropped
