"""Placement strategies as pure functions: capacity respected, balance measured, row splits, errors."""

from __future__ import annotations

import numpy as np
import pytest

from bagpipe.serving.placement import (AccessStats, PlacementError, ShardPlacement, Strategy, default_capacity,
                                       imbalance, place)
from bagpipe.serving.requests import ItemCount, SpecRequests, access_stats
from bagpipe.serving.spec import load_spec

ROW_DIM = 8
ROW_BYTES = ROW_DIM * 4
PACKING = [Strategy.CAPACITY, Strategy.LOAD, Strategy.COACCESS]


def stats_for(cards, touched=None, pooling=None) -> AccessStats:
    t = len(cards)
    touched = np.ones((4, t), dtype=bool) if touched is None else np.asarray(touched, dtype=bool)
    return AccessStats(touched, np.ones(t) if pooling is None else np.asarray(pooling, dtype=float))


def covered_exactly_once(p: ShardPlacement) -> None:
    """Every row of every table is on exactly one shard; parts of one table on distinct shards."""
    for t, card in enumerate(p.cardinalities):
        parts = sorted(p.parts_of(t), key=lambda x: x.row_lo)
        assert parts[0].row_lo == 0 and parts[-1].row_hi == card
        assert all(a.row_hi == b.row_lo for a, b in zip(parts, parts[1:]))
        assert all(x.rows > 0 for x in parts)
        assert len({x.shard for x in parts}) == len(parts)


@pytest.mark.parametrize("strategy", PACKING)
@pytest.mark.parametrize("spec", ["drm1", "drm2", "drm3"])
@pytest.mark.parametrize("shards", [2, 4])
def test_shipped_specs_fit_within_capacity(strategy, spec, shards):
    model = load_spec(spec, 0.002)
    stats = access_stats(SpecRequests(model, ItemCount.parse("4"), seed=0).take(0, 60))
    row_dim = model.model_config().row_dim
    capacity = default_capacity(model.cardinalities, row_dim, shards, 1.25)
    p = place(strategy, model.cardinalities, row_dim, stats, shards, capacity)
    covered_exactly_once(p)
    assert p.shard_bytes().max() <= capacity
    assert p.shard_bytes().sum() == sum(model.cardinalities) * row_dim * 4
    assert place(strategy, model.cardinalities, row_dim, stats, shards, capacity) == p  # pure
    assert ShardPlacement.from_dict(p.to_dict()) == p


def test_capacity_balances_bytes_within_the_lpt_bound():
    cards = [1000, 900, 700, 600, 500, 400, 300, 200, 100, 50]
    p = place(Strategy.CAPACITY, cards, ROW_DIM, stats_for(cards), 3)  # unlimited capacity
    lower_bound = max(sum(cards) / 3, max(cards)) * ROW_BYTES  # no placement beats this
    assert p.shard_bytes().max() <= (4 / 3 - 1 / 9) * lower_bound + 1
    assert imbalance(p.shard_bytes()) < 1.1


def test_load_balances_expected_lookup_work():
    cards = [100] * 6
    pooling = [50, 40, 30, 20, 10, 10]  # the work differs while the bytes are equal
    stats = stats_for(cards, pooling=pooling)
    by_load = place(Strategy.LOAD, cards, ROW_DIM, stats, 2)
    by_bytes = place(Strategy.CAPACITY, cards, ROW_DIM, stats, 2)
    assert imbalance(by_load.shard_load(stats)) < imbalance(by_bytes.shard_load(stats))
    assert sorted(by_load.shard_load(stats) / (stats.items * ROW_DIM)) == [80.0, 80.0]


def test_load_respects_capacity_over_balance():
    cards = [100, 100, 100, 100]
    stats = stats_for(cards, pooling=[100, 1, 1, 1])  # balance alone would put three tables together
    p = place(Strategy.LOAD, cards, ROW_DIM, stats, 2, capacity_bytes=2 * 100 * ROW_BYTES)
    assert list(p.shard_bytes()) == [200 * ROW_BYTES, 200 * ROW_BYTES]


def test_coaccess_contacts_fewer_shards_per_request():
    # tables 0-3 are touched together, 4-7 together; capacity holds four tables per shard
    cards = [100] * 8
    rows = [[1, 1, 1, 1, 0, 0, 0, 0]] * 5 + [[0, 0, 0, 0, 1, 1, 1, 1]] * 5
    stats = stats_for(cards, touched=rows)
    capacity = 4 * 100 * ROW_BYTES
    packed = place(Strategy.COACCESS, cards, ROW_DIM, stats, 2, capacity)
    spread = place(Strategy.CAPACITY, cards, ROW_DIM, stats, 2, capacity)
    assert packed.shards_per_request(stats) == 1.0
    assert spread.shards_per_request(stats) == 2.0
    assert {frozenset(packed.tables_on(s)) for s in range(2)} == {frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7})}


def test_coaccess_packs_onto_as_few_shards_as_capacity_allows():
    cards = [100] * 4
    p = place(Strategy.COACCESS, cards, ROW_DIM, stats_for(cards), 4)  # unlimited: all on one shard
    assert list(p.shard_bytes()) == [400 * ROW_BYTES, 0, 0, 0]


@pytest.mark.parametrize("strategy", PACKING)
def test_a_table_larger_than_a_shard_is_split_by_rows(strategy):
    cards = [1000, 100, 100]
    capacity = 500 * ROW_BYTES
    p = place(strategy, cards, ROW_DIM, stats_for(cards), 3, capacity)
    covered_exactly_once(p)
    assert p.split_tables == [0] and len(p.parts_of(0)) >= 2
    assert p.shard_bytes().max() <= capacity


def test_a_placement_that_cannot_fit_names_the_table_and_the_capacity_needed():
    cards = [100, 300, 200]
    with pytest.raises(PlacementError) as err:
        place(Strategy.CAPACITY, cards, ROW_DIM, stats_for(cards), 2, capacity_bytes=250 * ROW_BYTES)
    # 300 rows split over both shards, 200 on the second, then 100 rows find no room
    assert str(err.value) == ("placement capacity cannot fit table 0 (100 rows, 3.20 kB) on 2 shards of 8.00 kB "
                              "each (19.20 kB of tables in all); it needs a capacity of at least 9.60 kB per shard")
    needed = 300 * ROW_BYTES
    assert place(Strategy.CAPACITY, cards, ROW_DIM, stats_for(cards), 2, needed).shard_bytes().max() <= needed


def test_local_and_single_hold_every_table_whole():
    cards = [10, 20, 30]
    for strategy in (Strategy.LOCAL, Strategy.SINGLE):
        p = place(strategy, cards, ROW_DIM, stats_for(cards), 4, capacity_bytes=ROW_BYTES)  # capacity ignored
        assert p.shards == 1 and p.split_tables == [] and p.tables_on(0) == [0, 1, 2]
    assert not place(Strategy.LOCAL, cards, ROW_DIM, stats_for(cards), 1).remote


def test_bad_inputs_are_clear_errors():
    from bagpipe.config import ConfigError

    with pytest.raises(ConfigError, match="--placement 'nearest' unknown"):
        Strategy.parse("nearest")
    with pytest.raises(ConfigError, match="cover 2 tables, the model has 3"):
        place(Strategy.LOAD, [1, 2, 3], ROW_DIM, stats_for([1, 2]), 2)
    with pytest.raises(ConfigError, match="--capacity-slack must be >= 1"):
        default_capacity([10], ROW_DIM, 2, 0.5)
