"""``--workers``: how many processes start, and that none outlives or interrupts its parent.

The parent-death and Ctrl-C tests run ``qdiff compare --workers 2`` in a subprocess (its own
session, as a shell gives a command its own process group), wait for the two worker processes
to exist, then kill or interrupt it the way a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qdiff
from qdiff.engine.sharding import local_workers
from qdiff.engine.sessions import available_cpus

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
DIGITS = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / "digits_cnn.qoperator.onnx")
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")


def test_workers_capped_by_cores_and_groups_and_meta_says_so():
    cores = available_cpus()
    assert local_workers(1000, None) == (cores, f"{cores} core(s) available")
    # 11 runs make groups of at most 2 runs: at least 6 groups
    assert local_workers(1000, 11)[0] == min(cores, 6)
    # one run is one group: one process, whatever the cores
    assert local_workers(1000, 1)[0] == 1
    result = qdiff.compare(*DIGITS, data=SAMPLES / "digits_test.npz", samples=11, workers=1000)
    assert result.meta["workers"] == min(cores, 6) and result.meta["workers_requested"] == 1000
    assert any("--workers 1000 capped" in n for n in result.meta["notes"]), result.meta["notes"]
    single = qdiff.compare(*DIGITS, data=SAMPLES / "digits_test.npz", samples=1, workers=1000)
    assert single.meta["workers"] == 1 and "as few as 1 group" in " ".join(single.meta["notes"])


def _workers_of(pid: int) -> list[int]:
    """Live multiprocessing children of ``pid`` (zombies excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_compare() -> tuple[subprocess.Popen, list[int]]:
    env = dict(os.environ, PYTHONPATH=str(Path(qdiff.__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qdiff.cli", "compare", *map(str, DIGITS), "--samples", "100000", "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_workers_of(proc.pid)) < 2 and proc.poll() is None:
        time.sleep(0.1)
    workers = _workers_of(proc.pid)
    if len(workers) < 2:
        proc.kill()
        pytest.fail(f"the two workers did not start: {proc.communicate()[1].decode()[-500:]}")
    time.sleep(1.0)  # let them get into their shards
    return proc, workers


def _wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:  # clean up after a failure
        os.kill(p, signal.SIGKILL)
    return left


@pytest.mark.skipif(available_cpus() < 2, reason="--workers 2 runs one process on one core")
@linux_only
def test_workers_exit_when_the_parent_is_killed():
    proc, workers = _start_compare()
    proc.kill()
    proc.wait()
    assert _wait_gone(workers) == [], "worker processes outlived their killed parent"
    proc.communicate(timeout=30)  # the workers held the pipes: they close once the workers are gone


@pytest.mark.skipif(available_cpus() < 2, reason="--workers 2 runs one process on one core")
@linux_only
def test_ctrl_c_with_workers_prints_one_line_and_exits_130():
    proc, workers = _start_compare()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
    _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 130, text[-2000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-2000:]
    assert text.strip().splitlines()[-1] == "qdiff: interrupted"
    assert _wait_gone(workers) == []
