"""Dataclass fields that carry their own help text, and the error every config check raises.

The YAML schema of ``sora-train`` is a set of dataclasses (one per section), each defined next to
the code it configures; ``sora-train --help`` is generated from the ``help`` of their fields.
This module imports nothing of the package, so every config module can use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration mistake; the message starts with the key's path (``train.lr: ...``)."""


def option(default: Any = dataclasses.MISSING, help: str = "", factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a ``help`` text (``factory`` for mutable defaults)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def choice(key: str, value: Any, allowed: tuple) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {list(allowed)}, got {value!r}")


def one_line(err: BaseException, innermost: bool = False, limit: int = 400) -> str:
    """A library error's message on one line for ``error: ...`` (``innermost``: its deepest cause,
    where the library wrapped the real reason in its own exception)."""
    while innermost and (err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__)):
        err = err.__cause__ or err.__context__
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < limit else text[:limit] + "..."
