"""Two JAX processes train one QAT model with `DataParallel` like one process would.

Two workers (`multiprocess_worker.py`) join through `jax.distributed` on a
localhost coordinator with gloo CPU collectives, each feeding its half of
every global batch; a third process trains alone on the whole global
batches. All three start together and run in their own processes with
`KERAS_BACKEND=jax`, whatever backend pytest runs with.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import backend_case
from tests import multiprocess_worker as worker
from tests.tflite_parity import compare_tflite

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("jax")
    out = tmp_path_factory.mktemp("data_parallel")
    port = _free_port()
    jobs = [(out / "two", pid, 2) for pid in (0, 1)] + [(out / "one", 0, 1)]
    env = dict(os.environ, KERAS_BACKEND="jax")
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "multiprocess_worker.py"),
                str(folder),
                str(pid),
                str(count),
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for folder, pid, count in jobs
    ]
    try:
        errors = [p.communicate(timeout=600)[1] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, error in zip(processes, errors):
        assert p.returncode == 0, error[-4000:]
    return {"two": out / "two", "one": out / "one"}


def _variables(folder, pid=0):
    return dict(np.load(folder / f"process_{pid}" / "variables.npz"))


def _info(folder, pid=0):
    return json.loads((folder / f"process_{pid}" / "info.json").read_text())


def test_processes_joined_one_job(runs):
    for pid in (0, 1):
        info = _info(runs["two"], pid)
        assert (info["process_index"], info["process_count"]) == (pid, 2)
        assert info["devices"] == 2


def test_every_process_holds_the_same_state(runs):
    first, second = _variables(runs["two"], 0), _variables(runs["two"], 1)
    assert sorted(first) == sorted(second)
    for path in first:
        np.testing.assert_array_equal(first[path], second[path], err_msg=path)
    steps = [int(v) for p, v in first.items() if p.endswith("qat_step")]
    assert steps and set(steps) == {worker.STEPS}


def test_training_matches_one_process_on_the_global_batches(runs):
    two, one = _variables(runs["two"]), _variables(runs["one"])
    assert sorted(two) == sorted(one)
    for path in one:
        np.testing.assert_allclose(two[path], one[path], rtol=1e-5, atol=1e-6, err_msg=path)
    np.testing.assert_allclose(
        _info(runs["two"])["loss"], _info(runs["one"])["loss"], rtol=1e-5
    )


def _input_range_reference(x):
    """The input observer's range in NumPy: EMA of batch min/max until frozen."""
    _, _, range_freeze = backend_case.SCHEDULE
    decay = np.float32(0.99)
    batches = x.reshape((worker.STEPS, -1) + x.shape[1:])
    low, high = batches[0].min(), batches[0].max()
    for batch in batches[1:range_freeze]:
        low = decay * low + (1 - decay) * batch.min()
        high = decay * high + (1 - decay) * batch.max()
    return np.float32(low), np.float32(high)


def test_range_observers_see_the_global_batch(runs):
    x, _ = worker.global_batches()
    observed = _variables(runs["two"], 1)
    got = observed["image_quantize/output_min"], observed["image_quantize/output_max"]
    np.testing.assert_allclose(got, _input_range_reference(x), rtol=1e-6)
    # What one process would have seen from its own half alone is different.
    own_half = _input_range_reference(worker.process_slice(x, 1, 2))
    assert not np.allclose(got, own_half, rtol=1e-3)


def test_only_process_zero_writes_the_export(runs):
    zero, one = runs["two"] / "process_0", runs["two"] / "process_1"
    assert (zero / "model.tflite").exists()
    assert not (one / "model.tflite").exists()
    written = (zero / "model.tflite").read_bytes()
    assert (zero / "returned.tflite").read_bytes() == written
    assert (one / "returned.tflite").read_bytes() == written


def test_export_matches_one_process_within_one_step(runs):
    x, _ = worker.global_batches()
    parity = compare_tflite(
        (runs["two"] / "process_0" / "model.tflite").read_bytes(),
        (runs["one"] / "process_0" / "model.tflite").read_bytes(),
        x[: worker.GLOBAL_BATCH],
    )
    assert parity.ops_equal, parity.summary()
    assert parity.max_weight_steps <= 1.0, parity.summary()
    assert parity.max_bias_steps <= 1.0, parity.summary()
    # Dequantized outputs carry float rounding: one step may read 1.0001.
    assert parity.max_output_steps <= 1.0 + 1e-3, parity.summary()
