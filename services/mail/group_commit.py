"""Group commit: many callers' writes to the database go out together, a batch per command.

Used by the mail storage for new emails, by the queue engine for attempt
outcomes (which it keeps while the database is away), and by the send path to group
concurrent requests' suppression lookups (reads, same mechanism: one query per group).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from services.core.mongo import MAX_WRITE_BATCH, is_transient

log = logging.getLogger(__name__)
_Item = TypeVar("_Item")


class GroupCommit(Generic[_Item]):
    """Writes many callers' documents together: one batch per command instead of one each.

    FerretDB (SQLite) pays mostly per command and per transaction: one insertMany of 50
    documents costs about as much as two single inserts. Callers that arrive while a batch is
    being written wait for the next one, so a lone caller is written at once and a burst
    shares commands (group commit, as databases do with their log). A batch never exceeds
    `MAX_WRITE_BATCH` items, so neither does any command written for it.

    With ``keep_while_unreachable`` a batch that fails because the database is away (see
    `is_transient`) is not failed: it stays first in line and is written again, with a capped
    backoff, until the database answers. Its callers simply wait, so memory stays bounded by
    the number of callers (delivery loops), who claim nothing new meanwhile. Other failures
    fail the batch's callers, as without the option.
    """

    # Waits between attempts to write a batch the database did not take (seconds).
    _RETRY_FIRST = 0.1
    _RETRY_MAX = 2.0

    def __init__(
        self,
        write: Callable[[list[_Item]], Awaitable[list[bool]]],
        *,
        keep_while_unreachable: bool = False,
    ) -> None:
        self._write = write
        self._keep = keep_while_unreachable
        self._pending: list[tuple[_Item, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._writing = 0  # items of the batch being written
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        """Items submitted and not written yet (the batch being written included)."""
        return len(self._pending) + self._writing

    async def submit(self, item: _Item) -> bool:
        """Have `item` written with the next batch; the batch's verdict on it."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if self._writer is None or self._writer.done():
            # A fresh context: the writer serves many callers, so it must not inherit the
            # first one's request deadline (pymongo.timeout lives in a context variable and
            # would fail every later batch once that request's time is up) or its trace.
            self._idle.clear()
            self._writer = asyncio.create_task(self._write_all(), context=contextvars.Context())
        # Shielded: a caller that gives up (deadline, cancellation) does not cancel the write
        # of the others' items; its own may still be written, as with a single command.
        return await asyncio.shield(done)

    async def drain(self, within: float) -> bool:
        """Wait up to `within` seconds until everything submitted is written (or failed).

        Returns:
            Whether nothing is left to write.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=within)
        return self._idle.is_set()

    async def _write_all(self) -> None:
        delay = self._RETRY_FIRST
        try:
            while self._pending:
                batch = self._pending[:MAX_WRITE_BATCH]
                del self._pending[:MAX_WRITE_BATCH]
                self._writing = len(batch)
                try:
                    verdicts = await self._write([item for item, _ in batch])
                except Exception as exc:
                    self._writing = 0
                    if self._keep and is_transient(exc):
                        if delay == self._RETRY_FIRST:
                            log.warning(
                                "database unreachable; keeping writes to retry",
                                extra={"fields": {"kept": len(batch) + len(self._pending)}},
                            )
                        self._pending[:0] = batch  # first in line when the database is back
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, self._RETRY_MAX)
                        continue
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                            # Retrieved here so that a caller who gave up meanwhile (deadline)
                            # leaves no "exception never retrieved" noise; others still get it.
                            done.exception()
                    continue
                self._writing = 0
                if delay != self._RETRY_FIRST:
                    log.warning("database back; kept writes written", extra={"fields": {}})
                delay = self._RETRY_FIRST
                for (_, done), ok in zip(batch, verdicts, strict=True):
                    if not done.done():
                        done.set_result(ok)
        finally:
            if not self._pending:
                self._idle.set()


__all__ = ["GroupCommit"]
