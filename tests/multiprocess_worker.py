"""One process of a data-parallel QAT run on JAX (`keras.distribution.DataParallel`).

Every process builds the same model from the same NumPy weights and feeds
its own slice of each global batch: process `i` of `n` feeds rows
`[i * B / n, (i + 1) * B / n)` of every global batch of `B` samples. With
one process it feeds the whole global batch: the single-process reference.

    KERAS_BACKEND=jax python tests/multiprocess_worker.py \
        OUT_DIR PROCESS_ID NUM_PROCESSES COORDINATOR_PORT

Writes to `OUT_DIR/process_<id>/`: `variables.npz` (every model variable
after training, as this process sees it), `returned.tflite` (the bytes
`export_tflite` returned here), `info.json` (losses, step times); and
`export_tflite(model, OUT_DIR/process_<id>/model.tflite)` writes that file
only in process 0.
"""

import json
import os
import sys
import time

import numpy as np

GLOBAL_BATCH = 32
STEPS = 8


def global_batches(seed=2):
    """`STEPS` global batches as two arrays, `(STEPS * GLOBAL_BATCH, ...)`."""
    rng = np.random.RandomState(seed)
    x = rng.normal(0.5, 1.0, (STEPS * GLOBAL_BATCH, 8, 8, 2)).astype(np.float32)
    y = rng.randint(0, 4, STEPS * GLOBAL_BATCH).astype(np.int32)
    return x, y


def process_slice(array, process_id, num_processes):
    """This process's rows of every global batch, in step order."""
    local = GLOBAL_BATCH // num_processes
    steps = array.reshape((STEPS, GLOBAL_BATCH) + array.shape[1:])
    mine = steps[:, process_id * local : (process_id + 1) * local]
    return mine.reshape((STEPS * local,) + array.shape[1:])


class StepTimer:
    """Wall time of each training step (as a Keras callback)."""

    def __init__(self):
        import keras

        timer = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                timer.start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                timer.seconds.append(time.perf_counter() - timer.start)

        self.seconds = []
        self.callback = Callback()


def main(out_dir, process_id, num_processes, port):
    process_id, num_processes = int(process_id), int(num_processes)
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}",
            num_processes=num_processes,
            process_id=process_id,
        )
    import keras

    import qat_plugin
    from backend_case import compiled_qat_model

    keras.distribution.set_distribution(
        keras.distribution.DataParallel(
            devices=jax.devices(), auto_shard_dataset=False
        )
    )
    keras.utils.set_random_seed(0)
    qat = compiled_qat_model()
    x, y = global_batches()
    x = process_slice(x, process_id, num_processes)
    y = process_slice(y, process_id, num_processes)
    timer = StepTimer()
    history = qat.fit(
        x,
        y,
        batch_size=GLOBAL_BATCH // num_processes,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer.callback],
    )
    folder = os.path.join(out_dir, f"process_{process_id}")
    os.makedirs(folder, exist_ok=True)
    np.savez(
        os.path.join(folder, "variables.npz"),
        **{v.path: np.asarray(v.numpy()) for v in qat.weights},
    )
    data = qat_plugin.export_tflite(qat, os.path.join(folder, "model.tflite"))
    with open(os.path.join(folder, "returned.tflite"), "wb") as f:
        f.write(data)
    info = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": len(jax.devices()),
        "loss": history.history["loss"],
        # The first step compiles; the rest are the steady state.
        "step_seconds": timer.seconds,
    }
    with open(os.path.join(folder, "info.json"), "w") as f:
        json.dump(info, f)
    if num_processes > 1:
        # An orderly shutdown (a barrier, then the coordinator stops). Left to
        # interpreter exit, process 0 can tear its coordination service down
        # while process 1 still has requests in flight, and gRPC aborts
        # (seen once in CI: SIGABRT in grpc_core::Server::~Server).
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
