"""Typed configuration: enums, the one cache-size syntax, validation, JSON round trip."""

import json

import pytest

from bagpipe.config import (CacheSize, ClusterConfig, ConfigError, Mode, ModelConfig, OptimizerConfig,
                            OptimizerKind, RunConfig)


@pytest.mark.parametrize("text,rows", [("7", 7), (7, 7), ("10%", 50), ("0.1%", 1), ("100%", 500),
                                       ("unlimited", None), (" Unlimited ", None), (None, None)])
def test_cache_size_syntax(text, rows):
    assert CacheSize.parse(text).rows_per_trainer(total_rows=1000, trainers=2) == rows


@pytest.mark.parametrize("text", ["0", "-3", "0%", "101%", "x%", "none", "10 rows", "1.5"])
def test_bad_cache_sizes_say_what_is_expected(text):
    with pytest.raises(ConfigError, match="--cache-rows"):
        CacheSize.parse(text)


def test_cache_size_prints_as_parsed():
    assert [str(CacheSize.parse(t)) for t in ("12", "2.5%", "unlimited")] == ["12", "2.5%", "unlimited"]


def test_enums_are_parsed_and_json_round_trips():
    cfg = RunConfig(model=ModelConfig(cardinalities=(10, 20)),
                    optimizer=OptimizerConfig(sparse="rowwise_adagrad", dense="adagrad", initial_accumulator=0.1),
                    cluster=ClusterConfig(mode="bagpipe", trainers=2, cache_rows=5))
    assert cfg.cluster.mode is Mode.BAGPIPE and cfg.optimizer.sparse is OptimizerKind.ROWWISE_ADAGRAD
    raw = json.loads(cfg.to_json())
    assert raw["cluster"]["mode"] == "bagpipe" and raw["optimizer"]["sparse"] == "rowwise_adagrad"
    assert RunConfig.from_dict(raw) == cfg


@pytest.mark.parametrize("make,message", [
    (lambda: ClusterConfig(mode="cached"), "mode 'cached' unknown"),
    (lambda: OptimizerConfig(sparse="adam"), "sparse optimizer 'adam' unknown"),
    (lambda: OptimizerConfig(dense="rowwise_adagrad"), "rowwise_adagrad is a sparse"),
    (lambda: OptimizerConfig(initial_accumulator=-1), "--initial-accumulator"),
    (lambda: ClusterConfig(lookahead=4, prefetch_distance=5), "--prefetch-distance"),
    (lambda: ClusterConfig(cache_rows=0), "--cache-rows"),
    (lambda: RunConfig(model=ModelConfig(cardinalities=(3,)), iters=-5), "--iters must be >= 1, got -5"),
    (lambda: RunConfig(model=ModelConfig(cardinalities=(3,)), eval_every=0), "--eval-every"),
])
def test_bad_config_is_refused_by_flag_name(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
