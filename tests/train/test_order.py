"""The data order is a pure function of (seed, step): epochs cover every example once."""

from __future__ import annotations

from lorafleet.train.order import global_batch, rank_slice


def test_each_epoch_visits_every_example_once():
    n, batch = 10, 4
    seen = [i for step in range(5) for i in global_batch(n, batch, step, seed=3)]  # 20 = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a fresh permutation per epoch


def test_same_seed_same_order_other_seed_differs():
    assert global_batch(50, 8, 7, seed=1) == global_batch(50, 8, 7, seed=1)
    assert global_batch(50, 8, 7, seed=1) != global_batch(50, 8, 7, seed=2)


def test_rank_slices_partition_the_global_batch():
    batch = list(range(7))
    parts = [rank_slice(batch, r, 3) for r in range(3)]
    assert sum(parts, []) == batch and [len(p) for p in parts] == [3, 2, 2]
