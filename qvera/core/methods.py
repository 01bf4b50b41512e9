"""The adapter methods qvera knows, by the name `VeraConfig.method` and adapter files use.

A new method is a `qvera.core.method.Method` subclass in its own module and one line here
(or `register(...)` from code outside the package, as the tests' toy method does).
"""

from __future__ import annotations

from qvera.core.dvora import DVoRA
from qvera.core.method import VERA, Method

METHODS: dict[str, Method] = {method.name: method for method in (VERA, DVoRA())}


def register(method: Method) -> Method:
    """Make `method` known by its name (a name already taken is an error)."""
    if method.name in METHODS:
        raise ValueError(f"an adapter method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def method_named(name: str) -> Method:
    """The registered method called `name`; one-line ValueError naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown adapter method {name!r}; use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
