"""Reading a JSON request body field by field: every value is checked for its type and range, every
field the endpoint does not know is refused, and each failure is a RequestError naming the field.

    f = Fields(body, "")                          # a dict from the request, or a nested one ("minillm.")
    t = f.number("temperature", low=0)            # None when absent
    n = f.integer("n", 1, 8, default=1)
    f.finish()                                    # unknown fields -> 400 naming the first one

The ranges mirror minillm's own flags (minillm/flags.py): the HTTP API and the command line accept
the same values.
"""

from __future__ import annotations

import math

from .errors import RequestError

BIGGEST = 2**63 - 1  # torch seeds are 64-bit


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
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            what = f"a whole number >= {low}" + (f" and <= {high}" if high < BIGGEST else "")
            raise self.fail(key, what, value)
        return value

    def number(self, key: str, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
               default: float | None = None) -> float | None:
        value = self.get(key)
        if value is None:
            return default
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low) and value <= high
        if not ok:
            bounds = [f"{'>' if low_open else '>='} {low:g}"] if low > -math.inf else []
            bounds += [f"<= {high:g}"] if high < math.inf else []
            raise self.fail(key, "a finite number" + (" " + " and ".join(bounds) if bounds else ""), value)
        return float(value)

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
