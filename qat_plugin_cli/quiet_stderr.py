"""TensorFlow's C++ log lines kept off the console unless asked for.

TensorFlow's native code logs through absl straight to file descriptor 2
(`I0000 00:00:... port.cc:153] oneDNN custom operations are on...`,
`failed call to cuInit`, ...) and LiteRT's `INFO: ` lines, before and outside anything Python's
`logging` or `warnings` can filter. `TensorFlowLogFilter` puts a pipe on
descriptor 2 while the command runs and forwards every line but those, so
the command's own messages, Python warnings and tracebacks still show.
Fatal (`F...`) lines are kept. `--verbose` or `QAT_PLUGIN_VERBOSE=1` (the
variable `qat_plugin.quiet` reads too) leave descriptor 2 alone.
"""

import os
import re
import sys
import threading

VERBOSE_ENV = "QAT_PLUGIN_VERBOSE"
# absl's line prefix: severity, date, time (seconds since the epoch before
# absl is initialized), thread, file:line]; the notice absl prints before
# its first message; the LiteRT runtime's `INFO: ` lines (its XNNPACK
# delegate).
_TF_LOG = re.compile(
    rb"^(?:[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\]"
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|INFO: )"
)


def verbose_from_env(environ=os.environ):
    """Whether `QAT_PLUGIN_VERBOSE` asks for TensorFlow's logs.

    Examples:
        >>> verbose_from_env({"QAT_PLUGIN_VERBOSE": "1"}), verbose_from_env({})
        (True, False)
        >>> verbose_from_env({"QAT_PLUGIN_VERBOSE": "0"})
        False
    """
    return environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def is_tensorflow_log(line):
    """Whether a line of stderr (bytes) is one of TensorFlow's C++ log lines.

    Examples:
        >>> is_tensorflow_log(b"I0000 00:00:1796302607.711724   17246 port.cc:153] oneDNN ...")
        True
        >>> is_tensorflow_log(b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")
        True
        >>> is_tensorflow_log(b"qat-plugin: error: --data: no file at x.npz.")
        False
    """
    return bool(_TF_LOG.match(line))


class TensorFlowLogFilter:
    """While active, drops TensorFlow's C++ log lines from descriptor 2.

    Examples:
        >>> with TensorFlowLogFilter():
        ...     pass
    """

    def __init__(self):
        self._saved = None
        self._thread = None

    def __enter__(self):
        sys.stderr.flush()
        try:
            self._saved = os.dup(2)
        except OSError:  # No descriptor 2 (a detached process): nothing to filter.
            return self
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        out = os.fdopen(os.dup(self._saved), "wb", buffering=0)
        self._thread = threading.Thread(target=_forward, args=(read, out), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            return False
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # Closes this end of the pipe: the reader ends.
        # A child process still holding the pipe must not hold up the exit.
        self._thread.join(timeout=5)
        os.close(self._saved)
        return False


def _forward(read, out):
    pending = b""
    with os.fdopen(read, "rb", buffering=0) as pipe, out:
        while chunk := pipe.read(1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not is_tensorflow_log(line))
            if kept:
                out.write(kept)
        if pending and not is_tensorflow_log(pending):
            out.write(pending)
