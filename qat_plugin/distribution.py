"""Which process writes files when several JAX processes train one model.

With `jax.distributed`, every process holds the same replicated weights
and exports the same bytes; only process 0 writes them, so two processes
never race on one path.
"""

import keras


def process_index():
    """This process's index among the processes training one model (0 if one).

    On the JAX backend with `jax.distributed.initialize`, the JAX process
    index; otherwise 0.

    Examples:
        >>> process_index()
        0
    """
    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index()
    return 0


def is_primary_process():
    """True in the one process that writes files (process 0).

    Examples:
        >>> is_primary_process()
        True
    """
    return process_index() == 0
