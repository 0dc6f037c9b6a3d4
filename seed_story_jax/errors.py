"""Errors a user can cause (bad file, key, shape, config). The CLI prints them in one line and exits 2;
anything else is a bug and keeps its traceback."""

from __future__ import annotations

from seed_story_jax.atomic import OutputExistsError
from seed_story_jax.checkpoint import CheckpointError
from seed_story_jax.config import ConfigError


class ConversionError(ValueError):
    """A source checkpoint is wrong: the message names the file and the key or shape."""

    def __init__(self, message: str, *, file=None, key=None):
        where = ", ".join(x for x in (f"file {file}" if file else "", f"key {key!r}" if key else "") if x)
        super().__init__(f"{message} ({where})" if where else message)
        self.file = file
        self.key = key


class DataError(ValueError):
    """Bad input data (image, jsonl line, record)."""


USER_ERRORS = (ConversionError, CheckpointError, ConfigError, OutputExistsError, DataError,
               FileNotFoundError, NotADirectoryError, PermissionError)
