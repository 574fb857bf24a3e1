"""The TFLite Micro side of `qat_plugin.tflite.micro`, run as its own process.

`python micro_worker.py REQUEST RESULT` loads only NumPy and `tflite_micro`
(no TensorFlow: a forked TensorFlow process is unsafe), so it starts in a
fraction of a second. Every interpreter that might not fit its arena is
built in a forked child: TFLM answers a too-small arena with a
`RuntimeError` at some sizes and a segmentation fault at others, and a
crash must cost one probe, not the caller's process.

A request (`.npz`) holds `mode` ("run" or "ops"), `model` (the .tflite
bytes as uint8), `arena` (a first arena size to try), `num_inputs`, `num_outputs` and `input_0`,
`input_1`, ... (samples along the first axis, in the model's input types).
The result (`.npz`) holds `report` (JSON) and `output_<i>_<sample>`.

Examples:
    >>> from qat_plugin.tflite.micro_worker import parse_allocations
    >>> parse_allocations("[RecordingMicroAllocator] Arena allocation total 96 bytes")
    {'total': 96}
"""

import json
import os
import re
import sys
import tempfile
import time

import numpy as np

# The largest arena the worker tries before it gives up (bytes).
_MAX_ARENA = 1 << 30
# A custom op no resolver registers: the op lookup fails there at the latest.
_PROBE_CUSTOM_OP = "QAT_PLUGIN_UNREGISTERED_PROBE"
_MISSING_BUILTIN = re.compile(r"Didn't find op for builtin opcode '([A-Z0-9_]+)'")


def parse_allocations(text):
    """Reads `print_allocations()` text: arena total/head/tail and each record.

    Examples:
        >>> from qat_plugin.tflite.micro_worker import parse_allocations
        >>> parse_allocations(
        ...     "[RecordingMicroAllocator] Arena allocation head 32 bytes\\n"
        ...     "[RecordingMicroAllocator] 'NodeAndRegistration struct' used 64 bytes "
        ...     "with alignment overhead (requested 64 bytes for 1 structs)")
        {'head': 32, 'NodeAndRegistration struct': 64}
    """
    found = {}
    for part, size in re.findall(r"Arena allocation (total|head|tail) (\d+) bytes", text):
        found[part] = int(size)
    for name, size in re.findall(r"'([^']+)' used (\d+) bytes", text):
        found[name] = int(size)
    return found


def _captured_stderr(function):
    """Runs `function`; returns what C++ wrote to file descriptor 2 meanwhile."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            function()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        return sink.read().decode("utf-8", "replace")


def _interpreter(data, arena):
    from tflite_micro import runtime

    return runtime.Interpreter.from_bytes(data, arena_size=int(arena))


def _invoke(interpreter, inputs, sample):
    for index, samples in enumerate(inputs):
        interpreter.set_input(samples[sample], index)
    interpreter.invoke()


def _runs(data, arena, inputs):
    """True when the model loads and runs one sample in `arena` bytes (forked)."""
    pid = os.fork()
    if pid == 0:  # The child: silent, and it never returns.
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        try:
            _invoke(_interpreter(data, arena), inputs, 0)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _load_error(data, arena):
    """The text of TFLM's error for `arena` bytes (forked, crash-safe), or None."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.dup2(write, 2)  # TFLM logs its reasons to stderr from C++.
        message = b""
        try:
            _interpreter(data, arena)
        except Exception as error:
            message = str(error).encode("utf-8", "replace") or b"error"
        os.write(write, b"\n" + message[:4000])
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 4096):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    if not os.WIFEXITED(status):
        return f"{text}\nthe interpreter crashed (signal {os.WTERMSIG(status)})".strip()
    return text or None


def _smallest_arena(data, works, inputs):
    """Bisects the smallest arena in which the model runs (`works` runs)."""
    low, high = 0, works
    while high - low > 1:
        middle = (low + high) // 2
        if _runs(data, middle, inputs):
            high = middle
        else:
            low = middle
    return high


def _timed(interpreter, inputs, count):
    """Seconds per inference over repeated passes of the samples."""
    runs, start = 0, time.perf_counter()
    while runs < 3 * count or time.perf_counter() - start < 0.05:
        _invoke(interpreter, inputs, runs % count)
        runs += 1
    return (time.perf_counter() - start) / runs


def _run(data, arena, inputs, num_outputs):
    import tflite_micro

    report = {"version": tflite_micro.__version__}
    while not _runs(data, arena, inputs):
        if arena >= _MAX_ARENA:
            report["error"] = _load_error(data, arena) or "the model does not run"
            missing = _MISSING_BUILTIN.findall(report["error"])
            report["missing_ops"] = missing
            return report, {}
        arena *= 2
    interpreter = _interpreter(data, arena)
    count = len(inputs[0])
    outputs = {}
    for sample in range(count):
        _invoke(interpreter, inputs, sample)
        for index in range(num_outputs):
            outputs[f"output_{index}_{sample}"] = np.array(interpreter.get_output(index))
    report["allocations"] = parse_allocations(
        _captured_stderr(interpreter.print_allocations)
    )
    report["seconds_per_inference"] = _timed(interpreter, inputs, count)
    report["smallest_arena"] = _smallest_arena(data, arena, inputs)
    return report, outputs


def _probe_model(schema, code):
    """A model of one op of builtin `code` followed by an unregistered custom op."""
    import flatbuffers

    model = schema.ModelT()
    model.version = 3
    builtin, custom = schema.OperatorCodeT(), schema.OperatorCodeT()
    builtin.builtinCode = code
    builtin.deprecatedBuiltinCode = min(code, 127)
    custom.builtinCode = custom.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    custom.customCode = _PROBE_CUSTOM_OP
    model.operatorCodes = [builtin, custom]
    tensor = schema.TensorT()
    tensor.shape, tensor.type, tensor.buffer, tensor.name = [1], schema.TensorType.INT8, 0, "t"
    subgraph = schema.SubGraphT()
    subgraph.tensors, subgraph.inputs, subgraph.outputs = [tensor], [0], [0]
    ops = []
    for index in (0, 1):
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = index, [0], [0]
        ops.append(op)
    subgraph.operators = ops
    model.subgraphs = [subgraph]
    model.buffers = [schema.BufferT()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _registered_ops():
    """The builtin ops this TFLM build registers: the op lookup of a probe model."""
    from tflite_micro import runtime

    import tflite_micro

    schema = runtime.schema_fb
    names = {
        value: name for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_") and name not in ("CUSTOM", "DELEGATE", "PLACEHOLDER_FOR_GREATER_OP_CODES")
    }
    registered = []
    for code, name in sorted(names.items()):
        error = _load_error(_probe_model(schema, code), 4096) or ""
        if not _MISSING_BUILTIN.search(error):
            registered.append(name)
    return {"version": tflite_micro.__version__, "registered_ops": registered}, {}


def main(request_path, result_path):
    """Serves one request file; writes the result file."""
    request = np.load(request_path)
    if str(request["mode"]) == "ops":
        report, outputs = _registered_ops()
    else:
        inputs = [request[f"input_{i}"] for i in range(int(request["num_inputs"]))]
        report, outputs = _run(request["model"].tobytes(), int(request["arena"]), inputs,
                               int(request["num_outputs"]))
    np.savez(result_path, report=json.dumps(report), **outputs)


if __name__ == "__main__":
    main(*sys.argv[1:3])
