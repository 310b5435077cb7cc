"""Ctrl-C in tests of the command line: a KeyboardInterrupt raised where a SIGINT would land."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def interrupted_on_call(n: int, function: Callable[P, R]) -> Callable[P, R]:
    """`function`, except that its n-th call (from 1) raises KeyboardInterrupt instead of running. A plain function,
    so it also replaces a method (monkeypatch.setattr(Class, "method", ...))."""
    calls = 0

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        nonlocal calls
        calls += 1
        if calls == n:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapper
