"""Errors raised for user mistakes; the CLI turns them into one paragraph and exit code 2.

Each class also derives from the built-in exception a Python user would expect (``ValueError``,
``FileNotFoundError``, ``FileExistsError``), so library callers can catch either.
"""

from __future__ import annotations


class FactorlabError(Exception):
    """Base class of every error factorlab raises for bad input (never for its own bugs)."""


class ConfigError(FactorlabError, ValueError):
    """An option has an invalid value, or options contradict each other."""


class TargetError(FactorlabError, ValueError):
    """A module pattern matched nothing, or matched a module that cannot be factorized."""


class DataError(FactorlabError, FileNotFoundError):
    """A data set, model or checkpoint file is missing or cannot be read."""


class CheckpointError(FactorlabError, ValueError):
    """A checkpoint's factorization spec does not match its tensors, or its schema is unknown."""


class OutputExistsError(FactorlabError, FileExistsError):
    """An output directory already holds a different run; pass ``overwrite=True`` to replace it."""


class ExportError(FactorlabError, RuntimeError):
    """An export failed, or the exported model does not compute what the PyTorch model does."""
