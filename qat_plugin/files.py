"""Writing files so that a crash never leaves a half-written one behind.

A file is written to a temporary file beside it, named after it
(`.model.tflite.tmp-<pid>-<random>`), then renamed over it. The temporary
file is removed on any exception; one left by a killed process (its pid no
longer runs) is removed by the next write to the same path.
"""

import contextlib
import os
import secrets

from qat_plugin.errors import UnwritablePathError

# Room for the pid and the random part within a 255-byte file name.
_MAX_STEM = 200


def temp_prefix(path):
    """The name prefix of `path`'s temporary files, before the writer's pid.

    Examples:
        >>> temp_prefix("out/model.tflite")
        '.model.tflite.tmp-'
    """
    return f".{os.path.basename(os.fspath(path))[:_MAX_STEM]}.tmp-"


def stale_temp_files(path):
    """The temporary files of `path` whose writer process no longer runs.

    Only names of `path`'s own pattern count, and only those whose pid is
    not a running process: a temporary file another live writer is still
    filling is never listed.

    Examples:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> dead = os.path.join(folder, ".m.tflite.tmp-999999999-abc")
        >>> open(dead, "wb").close()
        >>> [os.path.basename(p) for p in stale_temp_files(os.path.join(folder, "m.tflite"))]
        ['.m.tflite.tmp-999999999-abc']
    """
    directory = os.path.dirname(os.path.abspath(path))
    prefix = temp_prefix(path)
    stale = []
    for name in sorted(os.listdir(directory)):
        pid, dash, _ = name[len(prefix):].partition("-")
        if name.startswith(prefix) and dash and pid.isdecimal() and not _running(int(pid)):
            stale.append(os.path.join(directory, name))
    return stale


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Another user's process: it runs.
        return True
    except OverflowError:  # Not a pid this system can have.
        return False
    return True


def check_writable(path):
    """Raises `UnwritablePathError` unless a file can be written at `path`.

    Creates and removes a temporary file in `path`'s folder, which must
    exist: this is the check a writer makes before hours of work.

    Examples:
        >>> import os, tempfile
        >>> check_writable(os.path.join(tempfile.mkdtemp(), "model.tflite"))
        >>> check_writable("/proc/model.tflite")
        Traceback (most recent call last):
        ...
        qat_plugin.errors.UnwritablePathError: Cannot write /proc/model.tflite: ...
    """
    fd, tmp = _open_temp(os.fspath(path))
    os.close(fd)
    os.remove(tmp)


def write_bytes_atomic(path, data):
    """Writes `data` to `path` through a temporary file and a rename.

    Readers see the old file or the complete new one, never a partial one;
    on any failure the temporary file is removed, and temporary files of
    `path` left by killed processes are removed first. A folder that cannot
    be written raises `UnwritablePathError` naming `path`.

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "model.tflite")
        >>> write_bytes_atomic(path, b"abc")
        >>> open(path, "rb").read(), os.listdir(os.path.dirname(path))
        (b'abc', ['model.tflite'])
    """
    path = os.fspath(path)
    fd, tmp = _open_temp(path)
    try:
        for stale in stale_temp_files(path):
            # Best effort: another user's file in a shared folder may not be
            # ours to remove, and must not fail this write.
            with contextlib.suppress(OSError):
                os.remove(stale)
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except PermissionError as error:
            raise _unwritable(path, error) from None
    except BaseException:
        if fd is not None:
            os.close(fd)
        _remove(tmp)
        raise


def _open_temp(path):
    """A new temporary file beside `path`; errors name `path`, not the temp file.

    Created with mode 0o666 so the umask gives it the permissions a plain
    `open()` would (`mkstemp` makes files private, and reading the umask
    means setting it, which races with other threads).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Cannot write {path}: the folder {directory} does not exist."
        )
    prefix = os.path.join(directory, f"{temp_prefix(path)}{os.getpid()}-")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = prefix + secrets.token_hex(4)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # The same random part: draw again.
            continue
        except OSError as error:
            raise _unwritable(path, error) from None


def _unwritable(path, error):
    return UnwritablePathError(
        f"Cannot write {path}: its folder {os.path.dirname(os.path.abspath(path))} "
        f"is not writable ({error.strerror or error}). "
        "Choose another path or make the folder writable."
    )


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:  # Removed by another writer meanwhile.
        pass
