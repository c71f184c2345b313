"""The worker pipeline: groups of runs run and reduced by several threads, results unchanged."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import qdiff
from qdiff.engine import pipeline
from qdiff.engine.options import EngineOptions

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def test_worker_and_thread_counts():
    assert [pipeline.workers(c) for c in (1, 2, 3, 8, 64)] == [1, 2, 3, 4, 4]
    assert [pipeline.session_threads(c) for c in (1, 2, 3, 8, 64)] == [1, 1, 1, 2, 16]


def test_run_groups_gives_each_group_once_and_never_shares_a_state():
    states = [{"busy": False, "seen": []} for _ in range(3)]
    done: list[int] = []
    clash: list[str] = []

    def work(group, state):
        if state["busy"]:
            clash.append("a state was used by two threads at once")
        state["busy"] = True
        time.sleep(0.001 * (group[0] % 3))
        state["seen"].extend(group)
        state["busy"] = False

    groups = [[i, i + 100] for i in range(40)] + [[999]]
    pipeline.run_groups(iter(groups), work, states, done.append)
    seen = sorted(x for s in states for x in s["seen"])
    assert seen == sorted(x for g in groups for x in g)
    assert not clash
    assert sorted(done) == sorted(len(g) for g in groups)
    assert sum(1 for s in states if s["seen"]) > 1  # the work really was spread


def _counted(n: int, taken: list[int]):
    """Groups [0], [1], ... [n - 1], noting in ``taken`` each one handed out."""
    for i in range(n):
        taken.append(i)
        yield [i]


def test_run_groups_raises_the_first_failure_and_stops_taking_groups():
    taken: list[int] = []

    def work(group, state):
        if group[0] == 3:
            raise ValueError("bad sample 3")

    with pytest.raises(ValueError, match="bad sample 3"):
        pipeline.run_groups(_counted(1000, taken), work, [object(), object()])
    assert len(taken) < 50  # groups are taken a few ahead of the work, not all at once


def test_run_groups_is_lazy():
    """At most two groups per worker are taken ahead of the work (a lazy folder stays lazy)."""
    gate = threading.Event()
    taken: list[int] = []

    def work(group, state):
        gate.wait(5)

    t = threading.Thread(target=pipeline.run_groups, args=(_counted(20, taken), work, [1, 2]))
    t.start()
    time.sleep(0.2)
    ahead = len(taken)
    gate.set()
    t.join(10)
    assert ahead <= 2 * 2 + 1
    assert len(taken) == 20


@pytest.mark.parametrize("quant", ["digits_cnn.qdq_per_channel.onnx", "digits_cnn.qoperator.onnx", "digits_cnn.dynamic.onnx"])
def test_compare_is_the_same_with_any_number_of_workers(quant):
    """Accumulators merge exactly: 1, 2 or 3 workers give the very same tables (batched runs,
    QOperator integer taps, and the dynamic model that is run one sample at a time)."""
    args = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / quant)
    results = []
    for n in (1, 2, 3):
        opts = EngineOptions(pipeline_workers=n)
        results.append(qdiff.compare(*args, data=SAMPLES / "digits_test.npz", samples=200, engine_options=opts))
    one = results[0]
    assert one.meta["samples"] == 200
    assert [r.meta["pipeline_workers"] for r in results] == [1, 2, 3]
    for other in results[1:]:
        assert one.layers.equals(other.layers) and one.outputs.equals(other.outputs)
    assert np.isfinite(one.layers["cosine"]).all() and len(one.layers) >= 7


def test_big_models_run_on_one_worker_with_every_core(monkeypatch):
    """Weights of EngineOptions.one_worker_bytes or more: one worker whose sessions take every core (each worker
    holds its own transient tensors, and big operators use onnxruntime's threads well); the same
    table as the worker pipeline's."""
    args = (SAMPLES / "digits_cnn.float.onnx", SAMPLES / "digits_cnn.qdq_per_channel.onnx")
    kw = dict(data=SAMPLES / "digits_test.npz", samples=100)
    cores = pipeline.available_cpus()
    assert pipeline.workers(cores, EngineOptions().one_worker_bytes) == 1
    assert pipeline.session_threads(cores, EngineOptions().one_worker_bytes) == cores
    assert pipeline.workers(cores, EngineOptions().one_worker_bytes - 1) == min(cores, EngineOptions().max_workers)
    monkeypatch.setattr(pipeline, "available_cpus", lambda: 2)
    small = qdiff.compare(*args, **kw)
    weights = sum(p.stat().st_size for p in args)  # more than the initializers: the files
    one_worker = EngineOptions(one_worker_bytes=weights // 2)
    big = qdiff.compare(*args, **kw, engine_options=one_worker)
    assert (small.meta["pipeline_workers"], small.meta["session"]["intra_op_threads"]) == (2, 1)
    assert (big.meta["pipeline_workers"], big.meta["session"]["intra_op_threads"]) == (1, 2)
    assert small.layers.equals(big.layers) and small.outputs.equals(big.outputs)
    one = qdiff.sensitivity(*args, gain=False, **kw, engine_options=one_worker)
    assert one.layers.equals(qdiff.sensitivity(*args, gain=False, **kw).layers)
