"""The Python examples of README.md and docs/getting-started.md run as written.

Each ```python block is read from the file itself and executed, unchanged,
in a fresh namespace that holds only what the text says the reader brings:
a trained float model saved as `float.keras` in the working directory and
small `x_train`/`y_train`/`x_val`/`y_val` arrays. Editing an example so that
it no longer runs fails this test.
"""

import pathlib
import re

import keras
import numpy as np
import pytest

import qat_plugin
from tests.conftest import images

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/getting-started.md")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(relative):
    """`(label, code)` for each ```python block of a file, label `file:line`."""
    text = (ROOT / relative).read_text(encoding="utf-8")
    return [
        (f"{relative}:{text.count(chr(10), 0, m.start(1)) + 1}", m.group(1))
        for m in _BLOCK.finditer(text)
    ]


BLOCKS = [block for relative in DOCS for block in python_blocks(relative)]


def test_the_readme_has_python_examples():
    assert any(label.startswith("README.md:") for label, _ in BLOCKS)


@pytest.fixture
def reader_files(tmp_path, monkeypatch):
    """What the examples assume: float.keras in the cwd and train/val arrays."""
    x, y = images(n=224, shape=(8, 8, 1))
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(6.0),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ])
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    monkeypatch.chdir(tmp_path)
    model.save("float.keras")
    # 160 training samples: 5 steps of the default batch of 32 in one epoch.
    return {"x_train": x[:160], "y_train": y[:160], "x_val": x[160:], "y_val": y[160:]}


@pytest.mark.slow
@pytest.mark.tf_only
@pytest.mark.parametrize("label,code", BLOCKS, ids=[label for label, _ in BLOCKS])
def test_python_example_runs_as_written(label, code, reader_files, tmp_path):
    namespace = dict(reader_files, __name__="__readme__")
    exec(compile(code, label, "exec"), namespace)  # noqa: S102 - the docs' own text
    # What the examples write is a real int8 model that LiteRT runs.
    for path in tmp_path.glob("*.tflite"):
        report = qat_plugin.inspect_tflite(str(path))
        assert report.is_fully_int8, f"{label}: {path.name}"
        out = qat_plugin.TFLiteModel(str(path)).predict(reader_files["x_val"])
        assert np.asarray(out).shape == (len(reader_files["x_val"]), 4)
