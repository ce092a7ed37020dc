"""Reading a JSON request body field by field: every value is checked for its type and range, every
field the endpoint does not know is refused, and each failure is a RequestError naming the field.

    f = Fields(body, "")                          # a dict from the request, or a nested one ("minillm.")
    t = f.number("temperature", low=0)            # None when absent
    n = f.integer("n", 1, 8, default=1)
    f.finish()                                    # unknown fields -> 400 naming the first one

Numbers are checked by minillm/flags.py's Number, the command lines' own range rule: the HTTP API
and the command line accept the same values and say the same thing when they refuse one.
"""

from __future__ import annotations

import math

from ..flags import BIGGEST, Number, integer, real
from .errors import RequestError


class Fields:
    def __init__(self, body, prefix: str = ""):
        if not isinstance(body, dict):
            raise RequestError(f"{prefix.rstrip('.') or 'the request body'} must be a JSON object, "
                               f"got {type(body).__name__}", prefix.rstrip(".") or None)
        self.body, self.prefix, self.seen = body, prefix, set()

    def name(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str):
        self.seen.add(key)
        value = self.body.get(key)
        return value

    def fail(self, key: str, what: str, value) -> RequestError:
        return RequestError(f"{self.name(key)} must be {what}, got {value!r}"[:500], self.name(key))

    def integer(self, key: str, low: int = 0, high: int = BIGGEST, default: int | None = None) -> int | None:
        return self.ranged(key, integer(low, high), default)

    def number(self, key: str, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
               default: float | None = None) -> float | None:
        value = self.ranged(key, real(low, high, low_open), default)
        return None if value is None else float(value)

    def ranged(self, key: str, kind: Number, default):
        """The field's value when `kind` accepts it (flags.Number: the command lines' range rule), else
        a RequestError saying what it must be; `default` when absent."""
        value = self.get(key)
        if value is None:
            return default
        if not kind.accepts(value):
            raise self.fail(key, kind.describe(), value)
        return value

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def string(self, key: str, required: bool = False, choices: tuple[str, ...] | None = None) -> str | None:
        value = self.get(key)
        if value is None:
            if required:
                raise RequestError(f"{self.name(key)} is required", self.name(key))
            return None
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        if choices is not None and value not in choices:
            raise self.fail(key, "one of " + ", ".join(choices), value)
        return value

    def strings(self, key: str, most: int) -> list[str]:
        """A string or a list of up to `most` non-empty strings (OpenAI's `stop`)."""
        value = self.get(key)
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or len(items) > most or not all(isinstance(s, str) and s for s in items):
            raise self.fail(key, f"a non-empty string or a list of at most {most} non-empty strings", value)
        return items

    def nested(self, key: str) -> Fields | None:
        value = self.get(key)
        return None if value is None else Fields(value, self.name(key) + ".")

    def ignore(self, *keys: str) -> None:
        """Fields accepted for compatibility that change nothing here (e.g. `user`)."""
        self.seen.update(keys)

    def finish(self) -> None:
        unknown = [k for k in self.body if k not in self.seen]
        if unknown:
            raise RequestError(f"unknown field {self.name(unknown[0])!r} (this server does not support it)",
                               self.name(unknown[0]))
