"""The Fashion-MNIST loader: IDX files, fallbacks, the synthetic stand-in."""

import gzip
import os
import struct

import numpy as np
import pytest

from qat_plugin.data import datasets


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(directory, train=6, test=4):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (train, 28, 28)),
        "y_train": np.arange(train) % 10,
        "x_test": rng.integers(0, 256, (test, 28, 28)),
        "y_test": np.arange(test) % 10,
    }
    for key, name in datasets._FILES.items():
        write_idx(os.path.join(directory, name), arrays[key])
    return arrays


def test_reads_idx_files_scaled_to_unit_range(tmp_path):
    arrays = fake_fashion_mnist(tmp_path)
    data = datasets.fashion_mnist(str(tmp_path), download=False, synthetic=False)
    assert data.source == f"debian:{tmp_path}" and not data.is_synthetic
    assert data.x_train.shape == (6, 28, 28, 1) and data.x_train.dtype == np.float32
    np.testing.assert_allclose(data.x_test[..., 0], arrays["x_test"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_train, arrays["y_train"])
    assert data.y_train.dtype == np.int32 and len(data.class_names) == 10


def test_truncated_idx_file_is_reported(tmp_path):
    path = str(tmp_path / "bad-idx3-ubyte.gz")
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(ValueError, match=r"announces shape \(5,\) \(5 bytes\) but the file holds 2"):
        datasets.read_idx(path)
    with open(tmp_path / "text", "wb") as f:
        f.write(b"hello")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        datasets.read_idx(str(tmp_path / "text"))


def test_offline_without_files_falls_back_to_announced_synthetic(tmp_path, monkeypatch):
    small = datasets.synthetic_images(num_train=30, num_test=10)
    monkeypatch.setattr(datasets, "synthetic_images", lambda: small)
    with pytest.warns(UserWarning, match="SYNTHETIC 10-class image task"):
        data = datasets.fashion_mnist(str(tmp_path), download=False)
    assert data.is_synthetic and data.source == "synthetic"
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        datasets.fashion_mnist(str(tmp_path), download=False, synthetic=False)


def test_synthetic_images_are_deterministic_balanced_and_learnable():
    a = datasets.synthetic_images(num_train=400, num_test=100, seed=1)
    b = datasets.synthetic_images(num_train=400, num_test=100, seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (400, 28, 28, 1) and a.x_test.shape == (100, 28, 28, 1)
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    assert set(np.unique(a.y_train)) == set(range(10))
    # Class means differ: a nearest-class-mean classifier beats chance by far.
    means = np.stack([a.x_train[a.y_train == c].mean(0).ravel() for c in range(10)])
    distances = ((a.x_test.reshape(100, 1, -1) - means[None]) ** 2).sum(-1)
    assert np.mean(distances.argmin(1) == a.y_test) > 0.5


@pytest.mark.skipif(not os.path.exists(datasets.DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_debian_package_files_load():
    data = datasets.fashion_mnist(download=False, synthetic=False)
    assert data.x_train.shape == (60000, 28, 28, 1) and data.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(data.y_test).tolist() == [1000] * 10
