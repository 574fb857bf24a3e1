"""Quiet by default: TensorFlow's and the converter's logs, off unless asked for.

TensorFlow logs from three places: its C++ code straight to file
descriptor 2 (absl's `I0000 ... port.cc:153] oneDNN ...` lines; the
converter's `fully_quantize: 0, ...`), Python's `logging` (absl's
`WARNING:absl:Please consider providing the trackable_obj argument ...
deprecated`) and `warnings` (`Statistics for quantized inputs were
expected`). `converter_quiet()` silences the three around a converter
call, keeping whatever it caught for an error; `quiet_python_logs()`
lowers the Python loggers for the `qat-plugin` command (whose light entry
point filters the C++ lines). `QAT_PLUGIN_VERBOSE=1` (or the command's
`--verbose`) keeps them all.
"""

import contextlib
import logging
import os
import sys
import tempfile
import threading
import warnings

VERBOSE_ENV = "QAT_PLUGIN_VERBOSE"
# Descriptor 2 is the process's: one thread at a time redirects it.
_REDIRECT = threading.RLock()


def is_verbose():
    """Whether `QAT_PLUGIN_VERBOSE` asks for TensorFlow's logs (`1`, `yes`, ...).

    Examples:
        >>> os.environ.pop(VERBOSE_ENV, None) and None
        >>> is_verbose()
        False
    """
    value = os.environ.get(VERBOSE_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def status(message):
    """Prints a one-line status of a long phase to stderr, flushed at once.

    Examples:
        >>> status("exporting ...")  # to stderr
    """
    print(message, file=sys.stderr, flush=True)


def quiet_python_logs():
    """Lowers TensorFlow's and absl's Python loggers to errors (unless verbose).

    Examples:
        >>> quiet_python_logs()
        >>> is_verbose() or logging.getLogger("tensorflow").level == logging.ERROR
        True
    """
    if is_verbose():
        return
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorflow\..*")


@contextlib.contextmanager
def converter_quiet():
    """Silences the TFLite converter's logs inside the block (unless verbose).

    Python log records below ERROR from absl and TensorFlow and the
    converter's `UserWarning`s are dropped; what its C++ code writes to
    descriptor 2 goes to a temporary file, written back to stderr only if
    the block raises, so a failed conversion keeps its details. Threads
    take turns (descriptor 2 belongs to the whole process).

    Examples:
        >>> with converter_quiet():
        ...     os.write(2, b"I0000 a C++ log line\\n") and None
    """
    if is_verbose():
        yield
        return
    sys.stderr.flush()
    with _REDIRECT, tempfile.TemporaryFile() as captured, warnings.catch_warnings():
        loggers = [logging.getLogger(name) for name in ("absl", "tensorflow")]
        levels = [logger.level for logger in loggers]
        saved = os.dup(2)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorflow\..*")
        for logger in loggers:
            logger.setLevel(max(logger.level, logging.ERROR))
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            if failed:
                captured.seek(0)
                os.write(2, captured.read())
