"""Writing files so that a crash never leaves a half-written one behind."""

import os
import tempfile


def write_bytes_atomic(path, data):
    """Writes `data` to `path` through a temporary file and a rename.

    Readers see the old file or the complete new one, never a partial one;
    on failure the temporary file is removed.

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "model.tflite")
        >>> write_bytes_atomic(path, b"abc")
        >>> open(path, "rb").read()
        b'abc'
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Cannot write {path}: the folder {directory} does not exist."
        )
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        # mkstemp makes the file private (0600); give it the permissions a
        # plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
