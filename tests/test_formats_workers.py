"""The process pool behind reading and decoding."""
import os
import subprocess
import sys

import pytest

from sanitize.formats.records import InputError
from sanitize.formats.workers import Workers


def test_map_keeps_input_order_inline_and_in_a_pool():
    with Workers(2) as pool:
        assert list(pool.map(abs, [-3, 1, -2], parallel=False)) == [3, 1, 2]
        assert list(pool.map(abs, range(-50, 0))) == list(range(50, 0, -1))


def test_a_script_without_a_main_guard_still_works(tmp_path):
    # Spawned workers would re-run such a script, start a pool of their own while
    # bootstrapping, and die: the caller would see BrokenProcessPool.
    script = tmp_path / "unguarded.py"
    script.write_text("from sanitize.formats.workers import Workers\n"
                      "with Workers(2) as pool:\n"
                      "    print('result', list(pool.map(abs, [-1, -2, -3])))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["result [1, 2, 3]"]  # printed once: the workers did not re-run it



def test_a_worker_killed_from_outside_is_one_clear_error():
    # os._exit ends the worker without a Python exception, as the OOM killer or a decoder crash would.
    with Workers(2) as pool, pytest.raises(InputError, match="worker process reading or writing the data died"):
        list(pool.map(os._exit, [1, 1]))


def test_available_cpus_follow_a_container_quota(tmp_path, monkeypatch):
    from sanitize.formats import workers

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(workers, "CGROUP_CPU_MAX", quota)
    assert workers.available_cpus() == affinity  # no cgroup file: the affinity
    quota.write_text("max 100000\n")
    assert workers.available_cpus() == affinity
    quota.write_text("150000 100000\n")  # one and a half CPUs: two workers
    assert workers.available_cpus() == min(affinity, 2)
    quota.write_text("1000 100000\n")
    assert workers.available_cpus() == 1
    quota.write_text("garbage")
    assert workers.available_cpus() == affinity
    assert Workers().count == affinity
