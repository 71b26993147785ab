"""Rank resolution and shard assignment."""

import pytest

from longattn.sharding import ShardConfig, my_shards, resolve_rank


def test_explicit_keys_win():
    assert resolve_rank(ShardConfig(rank=1, world_size=4), {"RANK": "0", "WORLD_SIZE": "2"}) == (1, 4)


def test_torchrun_then_srun_env():
    assert resolve_rank(ShardConfig(), {"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert resolve_rank(ShardConfig(), {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    assert resolve_rank(ShardConfig(), {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1)


def test_array_elements_are_not_ranks():
    # A sweep over models runs as an array: its elements are separate jobs, each rank 0 of 1.
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert resolve_rank(ShardConfig(), env) == (0, 1)


def test_bad_rank_names_the_key():
    with pytest.raises(ValueError, match="shard.rank=2"):
        resolve_rank(ShardConfig(rank=2, world_size=2), {})


def test_round_robin():
    assert my_shards(7, 1, 3) == [1, 4] and my_shards(2, 0, 1) == [0, 1]
