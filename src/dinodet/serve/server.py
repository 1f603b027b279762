"""Running the service: ``run_server`` (what ``dinodet serve`` calls) and ``BackgroundServer``
(the same server in a thread, for tests, notebooks and benchmarks)."""
from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import uvicorn

from ..errors import ConfigError, first_line
from .app import ServeOptions, create_app

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 30  # how long in-flight requests may take to finish after SIGTERM


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: any free port), ready for uvicorn.

    Raises:
        ConfigError: the address cannot be bound (in use, not this machine's, no permission).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or first_line(e)}") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or first_line(e)}") from e
    sock.set_inheritable(True)
    return sock


def auto_device() -> str:
    """``--device auto``: the first CUDA device if there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once it does."""

    url = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("serving on %s (page: /, API: POST /v1/detect); Ctrl-C or SIGTERM stops", self.url)


def _config(app: Any) -> uvicorn.Config:
    # log_config=None: uvicorn leaves logging alone (the CLI prints dinodet's own records); no access log
    return uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False)


def run_server(detector: Any, options: ServeOptions | None = None) -> None:
    """Serve ``detector`` (a loaded detector, or ``inference.predict.DetectorOptions`` to build one;
    its device may be ``auto``) until SIGTERM or Ctrl-C.  The address is bound before the model loads, so a taken port costs no
    loading.  On SIGTERM in-flight requests finish (up to 30 s) and the function returns; Ctrl-C
    does the same and then raises KeyboardInterrupt.

    Raises:
        ConfigError, CheckpointError: bad options, an address that cannot be bound, a model that
            cannot be loaded.
    """
    from ..inference.predict import DetectorOptions

    options = options or ServeOptions()
    options.check()
    options.key()  # an unreadable key file costs no model loading
    if isinstance(detector, DetectorOptions):
        if detector.device == "auto":
            detector = dataclasses.replace(detector, device=auto_device())
        detector.check()
    sock = bind_socket(options.host, options.port)
    try:
        if not is_loopback(options.host) and options.key() is None:
            log.warning("listening on %s without an API key (--api-key-file): anyone who can reach this machine "
                        "can use the service", options.host)
        if isinstance(detector, DetectorOptions):
            detector = detector.build()
        server = _Server(_config(create_app(detector, options)))
        server.url = url_of(sock)
        with _sigterm_returns():
            server.run(sockets=[sock])
    finally:
        sock.close()
    log.info("stopped")


@contextlib.contextmanager
def _sigterm_returns() -> Iterator[None]:
    """uvicorn finishes the in-flight requests on SIGTERM and then re-raises the signal to the handler
    it found; this one lets ``run_server`` return (exit status 0 for a stop that was asked for)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class BackgroundServer:
    """The service of ``create_app(detector, options)`` in a thread of this process::

        with BackgroundServer(detector, ServeOptions(port=0)) as server:
            httpx.post(server.url + "/v1/detect", files={"image": open("a.jpg", "rb")})

    Entering waits until it answers; leaving stops it gracefully (queued requests finish).
    """

    def __init__(self, detector: Any, options: ServeOptions | None = None, app: Any = None) -> None:
        self.options = options or ServeOptions(port=0)
        self.app = app if app is not None else create_app(detector, self.options)
        self._sock = bind_socket(self.options.host, self.options.port)
        self.url = url_of(self._sock)
        self._server = uvicorn.Server(_config(self.app))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="dinodet-serve", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.should_exit = True
        self._thread.join(GRACEFUL_SHUTDOWN_S + 10)
        self._sock.close()
