"""The multi-index Hamming search returns exactly what brute force returns."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curate.imaging.hamming import (
    BLOCKS,
    block_thresholds,
    brute_force_pairs,
    pairs_within,
    pairs_within_queries,
)


def as_set(result):
    i, j, d = result
    return set(zip(i.tolist(), j.tolist(), d.tolist(), strict=True))


def flip_bits(h: int, positions) -> int:
    for p in positions:
        h ^= 1 << int(p)
    return h


def test_thresholds_obey_the_pigeonhole_sum():
    for r in range(0, 33):
        t = block_thresholds(r)
        assert len(t) == BLOCKS and int((t + 1).sum()) == r + 1 and t.max() - t.min() <= 1


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 5, 8, 10, 13, 16])
def test_random_hashes_with_planted_neighbours(radius):
    rng = np.random.default_rng(radius)
    base = rng.integers(0, 2**64 - 1, 1500, dtype=np.uint64, endpoint=True)
    # Neighbours at every distance up to radius + 2, so the boundary is exercised both ways.
    near = [flip_bits(int(base[k]), rng.choice(64, k % (radius + 3), replace=False))
            for k in range(500)]
    hashes = np.concatenate([base, np.array(near, np.uint64)])
    rng.shuffle(hashes)
    got = pairs_within(hashes, radius)
    assert as_set(got) == as_set(brute_force_pairs(hashes, radius))
    assert (got[2] <= radius).all() and (got[0] < got[1]).all()


def test_many_identical_hashes_and_all_pairs_at_the_radius():
    same = np.full(120, 0xDEADBEEFCAFEF00D, np.uint64)
    got = pairs_within(same, 0)
    assert len(got[0]) == 120 * 119 // 2 and (got[2] == 0).all()
    # Adversarial: distance exactly r spread evenly over the four blocks (each block just
    # over its threshold but one), and r + 1 (must not appear).
    h0 = 0
    for r in (4, 8, 10, 12):
        per_block = [list(range(16 * b, 16 * b + r // 4 + (b < r % 4))) for b in range(4)]
        at_r = flip_bits(h0, [p for blk in per_block for p in blk])
        beyond = flip_bits(at_r, [63])
        hashes = np.array([h0, at_r, beyond], np.uint64)
        assert as_set(pairs_within(hashes, r)) == as_set(brute_force_pairs(hashes, r))
        assert (0, 1, r) in as_set(pairs_within(hashes, r))
        assert all(d <= r for *_, d in as_set(pairs_within(hashes, r)))


def test_empty_and_single_inputs():
    for hashes in (np.zeros(0, np.uint64), np.array([7], np.uint64)):
        assert [len(x) for x in pairs_within(hashes, 10)] == [0, 0, 0]
    assert [len(x) for x in pairs_within_queries(np.zeros(0, np.uint64),
                                                 np.array([1], np.uint64), 3)] == [0, 0, 0]
    with pytest.raises(ValueError, match="radius"):
        pairs_within(np.array([1, 2], np.uint64), -1)
    with pytest.raises(ValueError, match="1-d"):
        pairs_within(np.zeros((2, 2), np.uint64), 3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=60),
       st.integers(0, 20), st.integers(0, 2**32))
def test_agrees_with_brute_force_on_clustered_sets(seeds, radius, salt):
    rng = np.random.default_rng(salt)
    # Each seed spawns a few close variants: dense neighbourhoods, shared block keys.
    values = []
    for s in seeds:
        values.append(s)
        for _ in range(int(rng.integers(0, 4))):
            values.append(flip_bits(s, rng.choice(64, int(rng.integers(0, 12)), replace=False)))
    hashes = np.array(values, np.uint64)
    assert as_set(pairs_within(hashes, radius)) == as_set(brute_force_pairs(hashes, radius))


def test_queries_against_an_index():
    rng = np.random.default_rng(5)
    index = rng.integers(0, 2**64 - 1, 800, dtype=np.uint64, endpoint=True)
    queries = np.array([flip_bits(int(index[k]), rng.choice(64, k % 9, replace=False))
                        for k in range(300)] +
                       list(rng.integers(0, 2**64 - 1, 100, dtype=np.uint64, endpoint=True)),
                       np.uint64)
    got = as_set(pairs_within_queries(queries, index, 6))
    want = {(q, j, int(d)) for q in range(queries.size)
            for j, d in enumerate(np.bitwise_count(queries[q] ^ index).tolist()) if d <= 6}
    assert got == want and len(want) > 200
