"""A server app under uvicorn in a thread: real sockets, in-process state (for direct seeding)."""

from __future__ import annotations

import threading
import time
from typing import Any

from firmware_sim.services import free_port

START_TIMEOUT_S = 60.0  # seconds for uvicorn to bind


class LiveServer:
    """``with LiveServer(app) as srv: httpx.get(srv.url + ...)``."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        import uvicorn

        self.app = app
        self.url = f"http://127.0.0.1:{port or free_port()}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]), log_level="warning"
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
