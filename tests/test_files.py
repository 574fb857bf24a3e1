"""Atomic writes: no partial target, no litter, errors that name the target."""

import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import qat_plugin
from qat_plugin.errors import UnwritablePathError
from qat_plugin.files import check_writable, stale_temp_files, temp_prefix, write_bytes_atomic


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def touch(folder, name, size=0):
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(b"x" * size)
    return path


def test_temp_files_are_named_after_their_target_and_removed_on_failure(tmp_path):
    target = tmp_path / "model.tflite"
    with pytest.raises(TypeError):
        write_bytes_atomic(target, object())  # Fails inside the write.
    assert os.listdir(tmp_path) == []
    assert temp_prefix(target) == ".model.tflite.tmp-"
    assert temp_prefix("x" * 300).startswith("." + "x" * 200 + ".tmp-")


def test_a_dead_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    pid = dead_pid()
    stale = touch(tmp_path, f".m.tflite.tmp-{pid}-abcd", size=100)
    assert stale_temp_files(tmp_path / "m.tflite") == [stale]
    write_bytes_atomic(tmp_path / "m.tflite", b"new")
    assert os.listdir(tmp_path) == ["m.tflite"]
    assert (tmp_path / "m.tflite").read_bytes() == b"new"


def test_a_live_writers_temp_file_and_other_files_are_never_removed(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid = dead_pid()
        kept = [
            touch(tmp_path, f".m.tflite.tmp-{live.pid}-abcd"),  # still being written
            touch(tmp_path, f".m.tflite.tmp-{os.getpid()}-abcd"),  # this process's
            touch(tmp_path, f".other.tflite.tmp-{pid}-abcd"),  # another target's
            touch(tmp_path, ".m.tflite.tmp-notapid-abcd"),  # not the pattern
            touch(tmp_path, f"m.tflite.tmp-{pid}-abcd"),  # not hidden: the user's
        ]
        write_bytes_atomic(tmp_path / "m.tflite", b"new")
        assert sorted(os.listdir(tmp_path)) == sorted(
            [os.path.basename(p) for p in kept] + ["m.tflite"])
    finally:
        live.kill()
        live.wait()


def test_an_unwritable_folder_names_the_target_not_the_temp_file():
    # /proc refuses new files even for root (a chmod-ed folder would not).
    for write in (lambda p: write_bytes_atomic(p, b"x"), check_writable):
        with pytest.raises(UnwritablePathError) as caught:
            write("/proc/model.tflite")
        message = str(caught.value)
        assert message.startswith("Cannot write /proc/model.tflite: its folder /proc")
        assert ".tmp-" not in message and "Choose another path" in message
        assert isinstance(caught.value, PermissionError)
        assert isinstance(caught.value, qat_plugin.QATError)
    with pytest.raises(FileNotFoundError, match="Cannot write /no/such/m.tflite: the folder"):
        write_bytes_atomic("/no/such/m.tflite", b"x")


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    umask = os.umask(0o027)
    try:
        write_bytes_atomic(tmp_path / "m.tflite", b"x")
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "m.tflite").st_mode & 0o777 == 0o640


# A child process that exports and is stopped inside the write: its fsync of
# the target's temporary file (the data is written, not yet renamed) waits
# until the test kills it with SIGKILL.
CHILD = textwrap.dedent("""
    import os, sys, time
    import keras, numpy as np, qat_plugin

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, np.linspace(-1, 1, 32, dtype="float32").reshape(8, 4))
    fsync = os.fsync

    def stopping_fsync(fd):
        if ".model.tflite.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            print("writing", flush=True)
            time.sleep(600)
        fsync(fd)

    os.fsync = stopping_fsync
    qat_plugin.export_tflite(qat, sys.argv[1])
""")


def kill_during_export(path):
    """Runs CHILD, kills it with SIGKILL inside the write; returns its pid."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return child.pid


def export_here(path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    qat = qat_plugin.quantize_model(model)
    qat_plugin.calibrate(qat, np.linspace(-1, 1, 32, dtype="float32").reshape(8, 4))
    return qat_plugin.export_tflite(qat, path)


@pytest.mark.slow
def test_kill_9_during_export_leaves_no_partial_target_and_the_next_export_cleans_up(tmp_path):
    path = tmp_path / "model.tflite"
    pid = kill_during_export(path)
    (stale,) = os.listdir(tmp_path)  # No target, only the killed writer's temp file.
    assert stale.startswith(f".model.tflite.tmp-{pid}-")
    size = os.path.getsize(tmp_path / stale)
    data = export_here(path)
    assert size == len(data)  # It held the whole model, as the issue saw.
    assert os.listdir(tmp_path) == ["model.tflite"]
    assert qat_plugin.inspect_tflite(str(path)).is_fully_int8

    # Killed while replacing a good file: the old file stays, whole.
    pid = kill_during_export(path)
    assert path.read_bytes() == data
    assert sorted(os.listdir(tmp_path))[0].startswith(f".model.tflite.tmp-{pid}-")
    export_here(path)
    assert os.listdir(tmp_path) == ["model.tflite"]
