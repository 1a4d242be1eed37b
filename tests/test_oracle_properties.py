"""Properties of SPEC §2–§6 over random inputs (hypothesis).

Every check decodes an output row block by block, independently of how the
oracle computes it, and compares it with each route's expected expert,
worked out here one route at a time from SPEC §3 step 1.
"""

from __future__ import annotations

from collections import Counter

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import oracle
from oracle.ep import PLACEMENTS, expert_map, owned_experts, remap, to_local_topk

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def routings(draw, *, max_tokens=12, max_topk=4, max_experts=9, invalid_ids=True):
    """``(topk_ids, E, B)``; ids may fall outside ``[0, E)``.  Shrinks towards small, zero ids."""
    num_experts = draw(st.integers(1, max_experts))
    shape = (draw(st.integers(0, max_tokens)), draw(st.integers(1, max_topk)))
    low, high = (-2, num_experts + 1) if invalid_ids else (0, num_experts - 1)
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    topk_ids = draw(hnp.arrays(dtype, shape, elements=st.integers(low, high)))
    block_size = draw(st.integers(1, 7))
    return topk_ids, num_experts, block_size


@st.composite
def expert_maps(draw, num_experts):
    """An ``[E]`` map with entries in ``[-1, E)``.  Shrinks towards all zeros."""
    return draw(hnp.arrays(np.int32, (num_experts,), elements=st.integers(-1, num_experts - 1)))


def expected_experts(topk_ids, num_experts, mapping=None, keep_route=lambda i: True):
    """``{route: expert}`` for the routes SPEC §3 step 1 keeps, one route at a time."""
    expected = {}
    for i, g in enumerate(int(x) for x in topk_ids.reshape(-1)):
        if not 0 <= g < num_experts or not keep_route(i):
            continue
        e = g if mapping is None else int(mapping[g])
        if e != -1:
            expected[i] = e
    return expected


def decode_row(sorted_row, expert_row, total, block_size, num_routes):
    """``{expert: [routes in segment order]}``, checking the shape rules of SPEC §3 on the way."""
    assert total % block_size == 0
    assert total <= sorted_row.size
    assert (sorted_row[total:] == num_routes).all()  # pad value after the total
    active = total // block_size
    assert (expert_row[active:] == -1).all()  # inactive blocks
    assert (np.diff(expert_row[:active]) >= 0).all()  # segments in expert order
    segments: dict[int, list[int]] = {}
    for b in range(active):
        expert = int(expert_row[b])
        assert expert >= 0
        segments.setdefault(expert, []).extend(
            int(x) for x in sorted_row[b * block_size : (b + 1) * block_size]
        )
    routes_of = {}
    for expert, entries in segments.items():
        routes = [x for x in entries if x != num_routes]
        # routes first, ascending (stable oracle), then only pad, and no spare block
        assert entries == routes + [num_routes] * (len(entries) - len(routes))
        assert routes == sorted(routes)
        assert len(entries) == -(-len(routes) // block_size) * block_size
        routes_of[expert] = routes
    return routes_of


def assert_row_matches(sorted_row, expert_row, total, block_size, num_routes, expected):
    routes_of = decode_row(sorted_row, expert_row, total, block_size, num_routes)
    got = {route: expert for expert, routes in routes_of.items() for route in routes}
    assert sum(len(r) for r in routes_of.values()) == len(got)  # no route twice
    assert got == expected  # counts conserved, every route under its expert
    counts = Counter(expected.values())
    assert total == sum(-(-c // block_size) * block_size for c in counts.values())


# SPEC §2, §3


@SETTINGS
@given(routings(), st.data())
def test_align_keeps_every_valid_route_once_in_padded_expert_segments(routing, data):
    topk_ids, num_experts, block_size = routing
    mapping = data.draw(st.none() | expert_maps(num_experts))
    before = topk_ids.copy()
    a = oracle.align(topk_ids, num_experts, block_size, expert_map=mapping)
    np.testing.assert_array_equal(topk_ids, before, strict=True)  # input untouched
    assert a.sorted_token_ids.size == oracle.padded_size(topk_ids.size, num_experts, block_size)
    assert a.expert_ids.size == -(-a.sorted_token_ids.size // block_size)
    expected = expected_experts(topk_ids, num_experts, mapping)
    assert_row_matches(
        a.sorted_token_ids,
        a.expert_ids,
        a.num_tokens_post_pad,
        block_size,
        topk_ids.size,
        expected,
    )


@SETTINGS
@given(routings(), st.integers(0, 40))
def test_loose_padding_changes_only_the_tail(routing, extra):
    topk_ids, num_experts, block_size = routing
    tight = oracle.align(topk_ids, num_experts, block_size)
    p = tight.sorted_token_ids.size + extra
    loose = oracle.align(topk_ids, num_experts, block_size, max_num_tokens_padded=p)
    total = tight.num_tokens_post_pad
    assert loose.num_tokens_post_pad == total
    np.testing.assert_array_equal(loose.sorted_token_ids[:total], tight.sorted_token_ids[:total])
    assert (loose.sorted_token_ids[total:] == topk_ids.size).all()
    assert (loose.expert_ids[total // block_size :] == -1).all()
    assert loose.expert_ids.size == -(-p // block_size)


@SETTINGS
@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=12),
    st.integers(1, 16),
)
def test_padded_size_is_enough_for_any_split_of_the_routes(counts, block_size):
    num_routes, num_experts = sum(counts), len(counts)
    needed = sum(-(-c // block_size) * block_size for c in counts)
    assert needed <= oracle.padded_size(num_routes, num_experts, block_size)


@SETTINGS
@given(routings(invalid_ids=False))
def test_production_p_never_rejects_a_valid_batch(routing):
    topk_ids, num_experts, block_size = routing
    p = oracle.padded_size(topk_ids.size, num_experts, block_size)
    a = oracle.align(topk_ids, num_experts, block_size, max_num_tokens_padded=p)
    assert a.num_tokens_post_pad <= p


# SPEC §4, §5


@st.composite
def lora_batches(draw):
    """A routing plus slot inputs, mixing production and defensive values."""
    topk_ids, num_experts, block_size = draw(routings())
    max_loras = draw(st.integers(1, 5))
    num_tokens = topk_ids.shape[0]
    mapping = draw(hnp.arrays(np.int32, (num_tokens,), elements=st.integers(-1, max_loras - 1)))
    lora_ids = draw(
        st.none()
        | hnp.arrays(
            np.int32, st.integers(0, max_loras + 2), elements=st.integers(-1, max_loras + 1)
        )
    )
    enabled = draw(
        st.none()
        | hnp.arrays(np.int32, st.integers(max_loras, max_loras + 2), elements=st.integers(0, 1))
    )
    return topk_ids, mapping, num_experts, block_size, max_loras, lora_ids, enabled


@SETTINGS
@given(lora_batches(), st.data())
def test_each_processed_slot_row_is_plain_align_of_its_routes(batch, data):
    topk_ids, mapping, num_experts, block_size, max_loras, lora_ids, enabled = batch
    emap = data.draw(st.none() | expert_maps(num_experts))
    la = oracle.lora_align(
        topk_ids,
        mapping,
        num_experts,
        block_size,
        max_loras,
        lora_ids=lora_ids,
        adapter_enabled=enabled,
        expert_map=emap,
    )
    listed = oracle.active_lora_ids(mapping, max_loras) if lora_ids is None else lora_ids
    flags = np.ones(max_loras + 1, np.int32) if enabled is None else enabled
    processed = {int(l) for l in listed if 0 <= l < max_loras and flags[l] != 0}
    assert [l for l in range(max_loras) if la.written[l]] == sorted(processed)
    k = topk_ids.shape[1]
    for slot in processed:
        expected = expected_experts(
            topk_ids, num_experts, emap, keep_route=lambda i, s=slot: mapping[i // k] == s
        )
        assert_row_matches(
            la.sorted_token_ids[slot],
            la.expert_ids[slot],
            int(la.num_tokens_post_pad[slot]),
            block_size,
            topk_ids.size,
            expected,
        )


@SETTINGS
@given(lora_batches())
def test_lora_rows_equal_align_with_other_slots_routes_masked(batch):
    topk_ids, mapping, num_experts, block_size, max_loras, lora_ids, enabled = batch
    la = oracle.lora_align(
        topk_ids,
        mapping,
        num_experts,
        block_size,
        max_loras,
        lora_ids=lora_ids,
        adapter_enabled=enabled,
    )
    for slot in np.flatnonzero(la.written):
        masked = np.where((mapping == slot)[:, None], topk_ids, -1).astype(topk_ids.dtype)
        a = oracle.align(masked, num_experts, block_size)
        np.testing.assert_array_equal(la.sorted_token_ids[slot], a.sorted_token_ids, strict=True)
        np.testing.assert_array_equal(la.expert_ids[slot], a.expert_ids, strict=True)
        assert la.num_tokens_post_pad[slot] == a.num_tokens_post_pad


@SETTINGS
@given(st.data())
def test_sglang_mapping_gives_each_token_its_requests_adapter(data):
    num_tokens = data.draw(st.integers(0, 20))
    cuts = sorted(data.draw(st.lists(st.integers(0, num_tokens), min_size=1, max_size=6)))
    req_to_lora = data.draw(hnp.arrays(np.int32, (len(cuts) - 1,), elements=st.integers(-1, 3)))
    mapping = oracle.sglang_token_lora_mapping(np.array(cuts), req_to_lora, num_tokens)
    assert mapping.dtype == np.int32 and mapping.shape == (num_tokens,)
    for t in range(num_tokens):
        owners = [r for r in range(len(cuts) - 1) if cuts[r] <= t < cuts[r + 1]]
        assert mapping[t] == (req_to_lora[owners[0]] if owners else -1)


# SPEC §6


@st.composite
def ep_groups(draw):
    """``(topk_ids, G, R, strategy, B)``: ``G % R`` zero or not, ``R > G`` now and then.

    Shrinks towards one expert on one rank, linear placement, few routes.
    """
    num_global = draw(st.integers(1, 12))
    num_ranks = draw(st.integers(1, num_global + 2))
    strategy = draw(st.sampled_from(PLACEMENTS))
    shape = (draw(st.integers(0, 10)), draw(st.integers(1, 3)))
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    topk_ids = draw(hnp.arrays(dtype, shape, elements=st.integers(-1, num_global)))
    return topk_ids, num_global, num_ranks, strategy, draw(st.integers(1, 5))


@SETTINGS
@given(ep_groups())
def test_every_valid_route_lands_on_exactly_one_rank_under_its_global_expert(group):
    topk_ids, num_global, num_ranks, strategy, block_size = group
    landed = []
    for rank in range(num_ranks):
        owned = owned_experts(num_global, num_ranks, rank, strategy)
        _, mapping = expert_map(num_global, num_ranks, rank, strategy)
        a = oracle.align(topk_ids, num_global, block_size, expert_map=mapping)
        routes_of = decode_row(
            a.sorted_token_ids, a.expert_ids, a.num_tokens_post_pad, block_size, topk_ids.size
        )
        landed += [(r, int(owned[e])) for e, routes in routes_of.items() for r in routes]
    valid = [(i, int(g)) for i, g in enumerate(topk_ids.reshape(-1)) if 0 <= g < num_global]
    assert sorted(landed) == valid


@SETTINGS
@given(ep_groups())
def test_ranks_partition_the_global_experts(group):
    _, num_global, num_ranks, strategy, _ = group
    owned = [owned_experts(num_global, num_ranks, r, strategy) for r in range(num_ranks)]
    assert sorted(int(g) for ids in owned for g in ids) == list(range(num_global))
    sizes = sorted(ids.size for ids in owned)
    assert sizes[-1] - sizes[0] <= 1  # remainder spread one per rank


@SETTINGS
@given(ep_groups())
def test_remap_gives_owned_routes_their_local_id_and_others_minus_one(group):
    topk_ids, num_global, num_ranks, strategy, _ = group
    for rank in range(num_ranks):
        owned = owned_experts(num_global, num_ranks, rank, strategy)
        local_of = {int(g): lid for lid, g in enumerate(owned)}
        local = remap(topk_ids, num_global, num_ranks, rank, strategy)
        assert local.dtype == topk_ids.dtype and local.shape == topk_ids.shape
        assert local.reshape(-1).tolist() == [
            local_of.get(int(g), -1) for g in topk_ids.reshape(-1)
        ]


def _both_dispatch_forms(topk_ids, num_global, num_ranks, rank, strategy):
    num_local, mapping = expert_map(num_global, num_ranks, rank, strategy)
    local_ids = to_local_topk(topk_ids, mapping, num_experts=num_global)
    return mapping, local_ids, num_local


@SETTINGS
@given(ep_groups())
def test_global_ids_with_map_and_local_ids_align_identically(group):
    topk_ids, num_global, num_ranks, strategy, block_size = group
    p = oracle.padded_size(topk_ids.size, num_global, block_size)
    for rank in range(num_ranks):
        mapping, local_ids, num_local = _both_dispatch_forms(
            topk_ids, num_global, num_ranks, rank, strategy
        )
        by_map = oracle.align(
            topk_ids, num_global, block_size, expert_map=mapping, max_num_tokens_padded=p
        )
        by_local = oracle.align(local_ids, num_local, block_size, max_num_tokens_padded=p)
        np.testing.assert_array_equal(
            by_map.sorted_token_ids, by_local.sorted_token_ids, strict=True
        )
        np.testing.assert_array_equal(by_map.expert_ids, by_local.expert_ids, strict=True)
        assert by_map.num_tokens_post_pad == by_local.num_tokens_post_pad


@SETTINGS
@given(ep_groups(), st.data())
def test_global_ids_with_map_and_local_ids_lora_align_identically(group, data):
    topk_ids, num_global, num_ranks, strategy, block_size = group
    max_loras = data.draw(st.integers(1, 3))
    mapping_of_tokens = data.draw(
        hnp.arrays(np.int32, (topk_ids.shape[0],), elements=st.integers(-1, max_loras - 1))
    )
    p = oracle.padded_size(topk_ids.size, num_global, block_size)
    for rank in range(num_ranks):
        mapping, local_ids, num_local = _both_dispatch_forms(
            topk_ids, num_global, num_ranks, rank, strategy
        )
        by_map = oracle.lora_align(
            topk_ids,
            mapping_of_tokens,
            num_global,
            block_size,
            max_loras,
            expert_map=mapping,
            max_num_tokens_padded=p,
        )
        by_local = oracle.lora_align(
            local_ids,
            mapping_of_tokens,
            num_local,
            block_size,
            max_loras,
            max_num_tokens_padded=p,
        )
        np.testing.assert_array_equal(by_map.written, by_local.written, strict=True)
        rows = by_map.written
        np.testing.assert_array_equal(
            by_map.sorted_token_ids[rows], by_local.sorted_token_ids[rows], strict=True
        )
        np.testing.assert_array_equal(
            by_map.expert_ids[rows], by_local.expert_ids[rows], strict=True
        )
        np.testing.assert_array_equal(
            by_map.num_tokens_post_pad[rows], by_local.num_tokens_post_pad[rows], strict=True
        )
