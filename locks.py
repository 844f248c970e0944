"""A lock that many hold at once, or one alone: the app's answers against an adapter swap, the store's Chroma calls
against a client reopen."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SharedExclusive:
    """Many ``shared`` holders at once, or one ``exclusive`` holder alone. One waiting for ``exclusive`` goes before
    new ``shared`` ones, so a steady stream of shared holders cannot hold it off for ever."""

    def __init__(self):
        self._condition = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self.exclusive_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._exclusive and not self.exclusive_waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._condition:
                self._shared -= 1
                self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self.exclusive_waiting += 1
            self._condition.notify_all()
            self._condition.wait_for(lambda: not self._exclusive and not self._shared)
            self.exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = False
                self._condition.notify_all()
