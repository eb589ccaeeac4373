"""Progress inside long analyses, reported to whoever listens (the command line's progress bars).

An analysis calls :func:`tick` with the work done so far and the work in all (steps of a sweep, lags, chunks). By
default nobody listens and a tick costs one context-variable lookup. :func:`listening` installs a listener for the
duration of a ``with`` block, so the analyses need no progress argument of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Listener = Callable[[float, float], None]  # (done, total)

_listener: ContextVar[Listener | None] = ContextVar("gatelens_progress", default=None)


def tick(done: float, total: float) -> None:
    """Report that ``done`` of ``total`` units of the current piece of work are finished."""
    listener = _listener.get()
    if listener is not None:
        listener(done, total)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every :func:`tick` inside the block to ``listener``."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
