"""Rank resolution, shard assignment and "rank 0 builds, the others wait"."""

import threading
import time

import pytest

from longattn.common.distributed import build_once, resolve_rank, wait_for
from longattn.selection.shards import my_shards


def test_explicit_keys_win():
    assert resolve_rank(1, 4, {"RANK": "0", "WORLD_SIZE": "2"}) == (1, 4)


def test_torchrun_then_srun_env():
    assert resolve_rank(env={"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert resolve_rank(env={"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (1, 2)
    assert resolve_rank(env={"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1)
    assert resolve_rank(env={}) == (0, 1)


def test_array_elements_are_not_ranks():
    # A sweep over models runs as an array: its elements are separate jobs, each rank 0 of 1.
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert resolve_rank(env=env) == (0, 1)


def test_bad_rank_names_the_key():
    with pytest.raises(ValueError, match=r"shard.rank=2 must be in \[0, shard.world_size=2\)"):
        resolve_rank(2, 2, {})


def test_round_robin():
    assert my_shards(7, 1, 3) == [1, 4] and my_shards(2, 0, 1) == [0, 1]


def test_wait_for_deadline_names_what_and_key():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"the plan after 0 s \(shard.wait_hours=1e-05\)"):
        wait_for(lambda: False, "the plan", poll_seconds=0.01, timeout_s=0.036, hint=" (shard.wait_hours=1e-05)")
    assert 0.03 <= time.monotonic() - t0 < 5


def test_wait_for_returns_once_ready():
    flag = threading.Event()
    threading.Timer(0.05, flag.set).start()
    wait_for(flag.is_set, "the flag", poll_seconds=0.01, timeout_s=5)
    assert flag.is_set()


def test_build_once_rank0_builds_others_wait_for_its_key(tmp_path):
    marker = tmp_path / "ready.json"
    marker.write_text('{"key": "old-inputs", "value": ["stale"]}')  # an earlier run with other inputs
    got = {}
    waiter = threading.Thread(target=lambda: got.update(r1=build_once(marker, "k1", lambda: ["never"], rank=1,
                                                                        poll_seconds=0.01, timeout_s=5)))
    waiter.start()
    time.sleep(0.05)
    assert not got  # rank 1 does not take the stale marker
    calls = []
    assert build_once(marker, "k1", lambda: calls.append(1) or ["built"], rank=0) == ["built"]
    waiter.join(5)
    assert got["r1"] == ["built"] and calls == [1]
    # a rerun with the same inputs reuses the marker on every rank without building
    assert build_once(marker, "k1", lambda: calls.append(2) or ["again"], rank=0) == ["built"] and calls == [1]


def test_build_once_waiter_times_out(tmp_path):
    with pytest.raises(TimeoutError, match="rank 0 to write"):
        build_once(tmp_path / "m.json", "k", lambda: 1, rank=3, poll_seconds=0.01, timeout_s=0.05)
