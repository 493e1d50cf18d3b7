r"""A counting SMTP sink for the benchmarks and drills: records the Message-ID of every message.

Postfix's ``smtp-sink`` can only prove arrival through ``-d`` dumps, which its manual says slow
it down by orders of magnitude; this asyncio server keeps one line per accepted message
(``<arrival epoch>\t<Message-ID>\t<first RCPT TO>\t<1 if DKIM-signed else 0>``) in a
log file, so that a run can check that every message arrived exactly once. It also injects
the faults the drills need:

* ``--tempfail-until EPOCH``: answer ``451 4.3.0`` to every RCPT TO until then (relay 4xx);
* ``--reject-prefix PREFIX``: answer ``550 5.1.1`` to recipients whose local part starts
  with PREFIX, always (permanently undeliverable mail);
* ``--data-delay SECONDS``: wait that long before the final 250 to each message (deliveries
  stay in flight for a while: the database drill stops the database in the middle of them).

Run: ``python -m bench.sink --port 2525 --log build/bench/sink.log``. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from typing import TextIO

MAX_LINE = 1 << 20


class Sink:
    """The SMTP conversation: enough of RFC 5321 for our relays, Postfix and smtp-source."""

    def __init__(
        self, log: TextIO, *, tempfail_until: float, reject_prefix: str, data_delay: float = 0.0
    ) -> None:
        self.log = log
        self.tempfail_until = tempfail_until
        self.reject_prefix = reject_prefix.lower()
        self.data_delay = data_delay
        self.count = 0

    def rcpt_reply(self, address: str) -> bytes:
        """The reply to RCPT TO for `address`."""
        if time.time() < self.tempfail_until:
            return b"451 4.3.0 sink: try again later\r\n"
        if self.reject_prefix and address.lower().startswith(self.reject_prefix):
            return b"550 5.1.1 sink: no such user\r\n"
        return b"250 2.1.5 ok\r\n"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One SMTP session."""
        writer.write(b"220 bench-sink ESMTP\r\n")
        rcpts: list[str] = []
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-bench-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    rcpts = []
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == b"RCPT":
                    address = line.split(b":", 1)[1].strip().strip(b"<>").split(b">")[0]
                    reply = self.rcpt_reply(address.decode(errors="replace"))
                    if reply.startswith(b"250"):
                        rcpts.append(address.decode(errors="replace"))
                    writer.write(reply)
                elif verb == b"DATA":
                    if not rcpts:
                        writer.write(b"554 5.5.1 no valid recipients\r\n")
                        continue
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    message_id, signed = await self.read_data(reader)
                    if self.data_delay:
                        await asyncio.sleep(self.data_delay)
                    self.count += 1
                    self.log.write(f"{time.time():.6f}\t{message_id}\t{rcpts[0]}\t{signed:d}\n")
                    writer.write(b"250 2.0.0 ok: queued\r\n")
                    rcpts = []
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    break
                else:  # RSET, NOOP, XFORWARD, ...
                    rcpts = [] if verb == b"RSET" else rcpts
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def read_data(reader: asyncio.StreamReader) -> tuple[str, bool]:
        """Read a message up to the lone dot; return its Message-ID ("" if none), DKIM-signed."""
        message_id = ""
        signed = False
        in_headers = True
        while (line := await reader.readline()) not in (b".\r\n", b".\n", b""):
            if in_headers:
                if line in (b"\r\n", b"\n"):
                    in_headers = False
                elif line[:11].lower() == b"message-id:":
                    message_id = line[11:].strip().decode(errors="replace")
                elif line[:15].lower() == b"dkim-signature:":
                    signed = True
        return message_id, signed


async def main_async(args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT."""
    with open(args.log, "a", buffering=1) as log:  # noqa: ASYNC230 - one open at start-up
        sink = Sink(
            log,
            tempfail_until=args.tempfail_until,
            reject_prefix=args.reject_prefix,
            data_delay=args.data_delay,
        )
        server = await asyncio.start_server(
            sink.serve, args.host, args.port, limit=MAX_LINE, backlog=1024
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()
            # Leave at once, as a relay that goes down does: cancelling the open sessions one
            # by one only makes asyncio print a traceback per connection.
            log.flush()
            os._exit(0)


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True, help="file that gets one line per message")
    parser.add_argument("--tempfail-until", type=float, default=0.0)
    parser.add_argument("--reject-prefix", default="")
    parser.add_argument("--data-delay", type=float, default=0.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
