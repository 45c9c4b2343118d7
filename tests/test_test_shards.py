"""RINGFLASH_TEST_SHARD (tests/conftest.py), which benchmarks/gpu_tests.sh uses to run a GPU suite
in several processes: the shards of a selection are disjoint, cover it, and keep `-m quick`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def collected(*args: str, shard: str | None = None) -> list[str]:
    env = dict(os.environ)
    env.pop("RINGFLASH_TEST_SHARD", None)
    if shard is not None:
        env["RINGFLASH_TEST_SHARD"] = shard
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return [line for line in res.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize("marker", [[], ["-m", "quick"]], ids=["all", "quick"])
def test_shards_partition_the_selection(marker):
    whole = collected("tests/test_layout.py", *marker)
    assert len(whole) > 10
    parts = [collected("tests/test_layout.py", *marker, shard=f"{i}/3") for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(whole)
    assert all(abs(len(p) - len(whole) / 3) <= 1 for p in parts)


def test_bad_shard_is_refused():
    env = dict(os.environ, RINGFLASH_TEST_SHARD="3/3")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "tests/test_layout.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "RINGFLASH_TEST_SHARD" in res.stdout + res.stderr


def test_gpu_scripts_parse():
    for script in ("gpu_tests.sh", "onegpu.sh", "multigpu.sh"):
        res = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
