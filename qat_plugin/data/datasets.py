"""Fashion-MNIST for the demo and benchmarks, offline whenever possible.

`fashion_mnist()` reads the IDX files of the Debian package
`dataset-fashion-mnist` when they are installed, else asks
`keras.datasets.fashion_mnist` (which downloads, when the network allows),
else builds a synthetic 10-class image task of the same shape and says so
with a warning: the demo always runs, and never passes synthetic numbers off
as Fashion-MNIST ones (`ImageDataset.source` records where the data came
from).
"""

import dataclasses
import gzip
import os
import socket
import warnings

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Train and test images (float32 in [0, 1], NHWC) and int32 labels.

    Attributes:
        source: `"debian:<dir>"`, `"keras.datasets"` or `"synthetic"`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple
    source: str

    @property
    def is_synthetic(self):
        return self.source == "synthetic"


def read_idx(path):
    """Reads an IDX file (optionally gzipped) into a NumPy array.

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
        >>> _ = open(path, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 3]))
        >>> read_idx(path)
        array([7, 3], dtype=uint8)
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: the header announces shape {shape} ({expected} bytes) but "
            f"the file holds {len(data) - header} bytes; it is truncated or "
            "corrupt."
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _prepare(x_train, y_train, x_test, y_test, source):
    def images(x):
        return (np.asarray(x, np.float32) / 255.0)[..., None]

    return ImageDataset(
        images(x_train),
        np.asarray(y_train, np.int32),
        images(x_test),
        np.asarray(y_test, np.int32),
        CLASS_NAMES,
        source,
    )


def _from_debian(directory):
    paths = {k: os.path.join(directory, f) for k, f in _FILES.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    arrays = {k: read_idx(p) for k, p in paths.items()}
    return _prepare(**arrays, source=f"debian:{directory}")


def _from_keras(timeout):
    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception:  # Offline, proxy or server errors all mean "not available".
        return None
    finally:
        socket.setdefaulttimeout(previous)
    return _prepare(x_train, y_train, x_test, y_test, "keras.datasets")


def synthetic_images(num_train=60000, num_test=10000, seed=0):
    """A 10-class 28x28 grayscale task with Fashion-MNIST's shapes and types.

    Each class is a garment-like silhouette (bars, blocks, rings, wedges) drawn
    with random shifts, thickness, contrast and noise, so a small CNN learns
    it well but not perfectly. It stands in for Fashion-MNIST offline; its
    accuracies say nothing about Fashion-MNIST.

    Examples:
        >>> data = synthetic_images(num_train=20, num_test=10)
        >>> data.x_train.shape, data.y_test.dtype.name, data.source
        ((20, 28, 28, 1), 'int32', 'synthetic')
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)

    # One silhouette per class, as a function of centred coordinates and a
    # stroke width.
    shapes = (
        lambda x, y, r, w: (np.abs(x) < 8 + w) & (np.abs(y) < 9) | (np.abs(y + 6) < 3) & (np.abs(x) < 12),
        lambda x, y, r, w: (np.abs(np.abs(x) - 4) < 1.5 + w / 2) & (np.abs(y) < 12),
        lambda x, y, r, w: (np.abs(x) < 9 + w) & (np.abs(y) < 11),
        lambda x, y, r, w: (np.abs(x) < 3 + (y + 12) * 0.35 + w / 2) & (np.abs(y) < 12),
        lambda x, y, r, w: (np.abs(x) < 10 + w) & (np.abs(y) < 12) & ~((np.abs(x) < 1) & (y > -4)),
        lambda x, y, r, w: (np.abs(y - 6 + 0.3 * x) < 1.5 + w / 3) & (np.abs(x) < 12),
        lambda x, y, r, w: (np.abs(x) < 8 + w) & (np.abs(y) < 11) & ~((np.abs(x) < 2) & (y < -6)),
        lambda x, y, r, w: (y > 2) & (y < 7 + w / 2) & (np.abs(x) < 12) | (y > -2) & (y <= 2) & (x > 0) & (x < 10),
        lambda x, y, r, w: (np.abs(r - 8) < 1.5 + w / 2) & (y > -6) | (np.abs(x) < 10) & (y > 0) & (y < 9),
        lambda x, y, r, w: (np.abs(x + 3) < 3 + w / 2) & (y < 6) & (y > -11) | (y >= 6) & (y < 10) & (x > -6) & (x < 10),
    )

    def draw(label, dy, dx, width):
        y, x = yy - 14 - dy, xx - 14 - dx
        return shapes[label](x, y, np.sqrt(x * x + y * y), width).astype(np.float32)

    def make(count):
        labels = rng.integers(0, 10, count).astype(np.int32)
        images = np.empty((count, 28, 28), np.float32)
        for i, label in enumerate(labels):
            dy, dx = rng.normal(0, 1.5, 2)
            image = draw(label, dy, dx, rng.uniform(0, 2)) * rng.uniform(0.4, 1.0)
            image += rng.normal(0, 0.25, (28, 28)).astype(np.float32)
            images[i] = np.clip(image, 0, 1)
        return images[..., None], labels

    x_train, y_train = make(num_train)
    x_test, y_test = make(num_test)
    names = tuple(f"synthetic-{i}" for i in range(10))
    return ImageDataset(x_train, y_train, x_test, y_test, names, "synthetic")


def fashion_mnist(directory=DEBIAN_DIR, *, download=True, synthetic=True, timeout=15):
    """Loads Fashion-MNIST from the first source that has it.

    Args:
        directory: where the IDX `.gz` files are (the Debian package's path
            by default).
        download: try `keras.datasets.fashion_mnist` (network) when the files
            are not there.
        synthetic: fall back to `synthetic_images()` (announced with a
            `UserWarning`) when neither is available; with False a
            `FileNotFoundError` says how to get the data.
        timeout: seconds to wait for the network.

    Returns:
        An `ImageDataset`; `source` says where the data came from.

    Examples:
        Without the Debian files and the network, an announced synthetic task
        of the same shapes stands in:

        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     data = fashion_mnist(directory="/nonexistent", download=False)
        >>> data.x_train.shape[1:], data.is_synthetic
        ((28, 28, 1), True)
    """
    data = _from_debian(directory) if directory else None
    if data is None and download:
        data = _from_keras(timeout)
    if data is not None:
        return data
    if not synthetic:
        raise FileNotFoundError(
            f"Fashion-MNIST was not found in {directory} and could not be "
            "downloaded. Install the Debian package dataset-fashion-mnist or "
            "allow keras.datasets to download it."
        )
    warnings.warn(
        "Fashion-MNIST is not available offline here (no files in "
        f"{directory}, no network): using a SYNTHETIC 10-class image task "
        "instead. Its accuracies are not Fashion-MNIST accuracies.",
        UserWarning,
        stacklevel=2,
    )
    return synthetic_images()
