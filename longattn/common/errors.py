"""The one error type of a config that cannot work, and the choice types config schemas validate.

Choice fields are ``StrEnum``s: OmegaConf refuses any other value when the YAML is merged into the schema,
naming the key and the allowed values, and the members compare equal to their plain strings.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ConfigError", "Choice", "choices"]


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key to change."""


class Choice(StrEnum):
    """Base of every choice field (member name = value, so YAML spells either)."""


def choices(enum: type[Choice]) -> str:
    """``a, b or c``: the allowed values, for messages."""
    names = [m.value for m in enum]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
