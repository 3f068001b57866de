"""``dist.rwlock(name)``: many readers or one writer; a waiting writer blocks new readers."""

from __future__ import annotations

from collections.abc import Callable

from asgi_dist.locks.lock import Lock

__all__ = ["RWLock"]

KIND = "rwlock"


class RWLock:
    """``async with rw.read() as held:`` / ``async with rw.write() as held:``.

    Both sides hand out the usual handle (``fence``, ``lost``, ``extend``,
    ``release``); fences of reads and writes share one sequence per name, so a
    write's fence is larger than that of every read granted before it.
    Writer-preferring: once a writer waits, new readers wait behind it, so a
    stream of readers cannot starve writers.
    """

    def __init__(self, name: str, read: Callable[[], Lock], write: Callable[[], Lock]) -> None:
        self.name = name
        self._read = read
        self._write = write

    def __repr__(self) -> str:
        return f"<RWLock {self.name!r}>"

    def read(self) -> Lock:
        return self._read()

    def write(self) -> Lock:
        return self._write()
