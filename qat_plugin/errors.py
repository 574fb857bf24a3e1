"""The errors qat_plugin raises; every one derives from `QATError`.

Each error keeps the built-in base it has always had (`ValueError`,
`TypeError`, `RuntimeError`), so `except ValueError` still catches a bad
recipe, and `except qat_plugin.QATError` catches anything the project
raises on purpose.

Examples:
    >>> import qat_plugin
    >>> try:
    ...     qat_plugin.recipes.get("int9")
    ... except qat_plugin.QATError as error:
    ...     print(type(error).__name__)
    RecipeError
"""


class QATError(Exception):
    """Base class of every error qat_plugin raises on purpose."""


class UnsupportedModelError(QATError, TypeError):
    """The model is not a Keras 3 Functional or Sequential model."""


class UnsupportedLayerError(QATError, ValueError):
    """A layer has no quantization policy in the registry."""


class RecipeError(QATError, ValueError):
    """A recipe file, name or field is invalid."""


class ExportError(QATError, RuntimeError):
    """The model cannot be exported as asked."""


class TensorFlowProcessError(QATError, RuntimeError):
    """The TensorFlow child process that exports a JAX/torch model failed."""


class UnwritablePathError(QATError, PermissionError):
    """A file cannot be written where it was asked for."""


class ModelFileError(QATError, ValueError):
    """A model file (or bytes) is not what it claims: empty, corrupt or another format."""
