"""`python -m gateway`: serve the REST gateway on Settings.host:Settings.port until SIGTERM.

Shutdown is graceful: on SIGTERM or SIGINT the listener closes, requests in flight get
`Settings.shutdown_grace` seconds to finish, then the channels to the services close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.server import create_runner
from services.core.event_loop import run_event_loop
from services.core.logs import configure_logging
from services.core.settings import Settings, SettingsError

SERVICE_NAME = "gateway"
log = logging.getLogger("azora.gateway")


async def serve(settings: Settings, config: GatewayConfig) -> None:
    """Run the application until a termination signal arrives."""
    app = await create_app(settings, config=config)
    # access_log=None: our middleware writes the access log (templates, not raw paths).
    runner = create_runner(
        app, access_log=None, handle_signals=False, shutdown_timeout=settings.shutdown_grace
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("serving", extra={"fields": {"host": settings.host, "port": settings.port}})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"fields": {"grace_seconds": settings.shutdown_grace}})
    await runner.cleanup()
    log.info("stopped")


def main() -> None:
    """Entry point: settings, logging, serve."""
    try:
        settings = Settings.from_env(os.environ, service_name=SERVICE_NAME)
        config = GatewayConfig.from_env(os.environ)
    except SettingsError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(service=SERVICE_NAME, level=settings.log_level)
    run_event_loop(serve(settings, config), settings)


if __name__ == "__main__":
    main()
