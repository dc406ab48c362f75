"""Exceptions raised by deltatune.

Every error is a :class:`DeltaTuneError`; most also derive from the built-in exception a Python
user expects (``FileNotFoundError``, ``ValueError``, ...), so ``except ValueError`` works too.
The messages are the command line's: they name the file, key, flag or line to fix.
"""

from __future__ import annotations

__all__ = [
    "DeltaTuneError",
    "InvalidArgumentError",
    "ConfigError",
    "DataError",
    "FormatError",
    "DeltaTuneFileNotFoundError",
    "DeltaTuneIOError",
    "AssetError",
    "NonFiniteError",
    "CancelledError",
    "InternalError",
]


class DeltaTuneError(Exception):
    """Base class of every deltatune error."""


class InvalidArgumentError(DeltaTuneError, ValueError):
    """An argument or option value that cannot be used (names the option)."""


class ConfigError(DeltaTuneError, ValueError):
    """A delta method or configuration problem: unknown method or key, a target pattern that
    matches no module, a config file that cannot be used."""


class DataError(DeltaTuneError, ValueError):
    """A problem in a data file (names the file, line and column) or with a data set as a whole."""


class FormatError(DeltaTuneError, ValueError):
    """A model, delta or tokenizer file that is not valid (safetensors, GGUF, tensor shapes)."""


class DeltaTuneFileNotFoundError(DeltaTuneError, FileNotFoundError):
    """A file or directory that does not exist."""


class DeltaTuneIOError(DeltaTuneError, OSError):
    """Reading or writing a file failed."""


class AssetError(DeltaTuneError, RuntimeError):
    """The default model, decoder or demo data could not be fetched."""


class NonFiniteError(DeltaTuneError, ArithmeticError):
    """Loss, gradients or merged weights stopped being finite numbers."""


class CancelledError(DeltaTuneError):
    """A job was cancelled (a callback asked it to stop)."""


class InternalError(DeltaTuneError, RuntimeError):
    """A bug in deltatune (a Rust panic, caught before it reached Python)."""
