"""Serve the upscaler as a Runware-compatible API on one port (REST + WebSocket); see docs/serving.md.

    python -m latentup.serve weights=sd-x2-latent-upscaler/ port=8765
    LATENTUP_API_KEYS=k1,k2 python -m latentup.serve host=0.0.0.0
    python -m latentup.serve redis_url=redis://127.0.0.1:6379/0      # one of many replicas sharing a Redis

Prints ``serving on http://HOST:PORT (ws://HOST:PORT/v1)`` once it accepts connections. SIGINT / SIGTERM drain:
accepted tasks finish and are delivered (at most ``drain_timeout`` s), new ones get a ``serverShuttingDown`` error;
then what still runs is stopped, the temporary store removed, and the process exits 0.
"""

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import tempfile
from pathlib import Path

import uvicorn
from omegaconf import DictConfig, ListConfig
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.server import ServerProtocol

from latentup.cli import command
from latentup.config_files import config_dir
from latentup.errors import ConfigError, exit_on_error
from latentup.serve.app import create_app
from latentup.serve.fetch import UrlFetcher
from latentup.serve.limits import Limits
from latentup.serve.records import Records
from latentup.serve.redis_link import DOWN, Link
from latentup.serve.redis_queue import SharedQueue, create_group
from latentup.serve.redis_records import RedisRecords
from latentup.serve.redis_sessions import RedisSessions
from latentup.serve.redis_store import RedisStore
from latentup.serve.redis_worker import Worker
from latentup.serve.tasks import TaskError
from latentup.serve.service import Service
from latentup.serve.sessions import Sessions
from latentup.serve.store import ImageStore

FREE_TEXT = ("weights", "host", "public_url", "store_dir", "autoencoder", "text_encoder", "redis_url")
log = logging.getLogger("latentup.serve")
PURGE_INTERVAL = 10.0  # seconds between deletions of expired outputs, records and sessions
KEEPALIVE = 20.0  # seconds between WebSocket pings, and to wait for a pong (a message is acknowledged after both)
POSITIVE = {"max_queue": int, "max_batch": int, "max_tasks_per_request": int, "task_timeout": float,
            "max_request_mb": float, "output_ttl": float, "session_ttl": float, "drain_timeout": float,
            "fetch_max_mb": float, "fetch_timeout": float, "max_prompt_chars": int, "max_step_megapixels": float,
            "max_inflight_per_key": int, "max_inflight_per_connection": int, "max_records_per_key": int,
            "session_buffer_mb": float, "store_max_mb": float, "auth_timeout": float, "max_auth_kb": float,
            "redis_claim_after": float}
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _check(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """One-line ConfigErrors for bad knobs; returns (API keys, fetch hosts)."""
    for name, kind in {**POSITIVE, "batch_wait": float, "port": int, "model_workers": int}.items():
        value = cfg[name]
        low = 0 if name in ("batch_wait", "port", "model_workers") else (1 if kind is int else 1e-9)
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value < low:
            raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'} >= {low:g}, got "
                              f"{value!r}")
    if cfg.model_workers > 1:
        raise ConfigError(f"model_workers must be 0 or 1 (one model per process: start more replicas for more), got "
                          f"{cfg.model_workers}")
    if cfg.port > 65535:
        raise ConfigError(f"port must be 0..65535, got {cfg.port}")
    lists = {}
    for name in ("api_keys", "fetch_hosts"):
        value = cfg[name]
        if not isinstance(value, (list, ListConfig)) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{name} must be a list of non-empty texts, e.g. {name}=[a,b], got {value!r}")
        lists[name] = list(value)
    keys = lists["api_keys"] + [k.strip() for k in os.environ.get("LATENTUP_API_KEYS", "").split(",") if k.strip()]
    if not keys and not _is_loopback(str(cfg.host)):
        raise ConfigError(f"host {cfg.host} is reachable from other machines but no API key is set: pass "
                          "api_keys=[...] or LATENTUP_API_KEYS, or serve on host=127.0.0.1")
    return keys, lists["fetch_hosts"]


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror}): choose another host= or port=") from None
    return sock


def _link(cfg: DictConfig) -> Link | None:
    """The Redis link of ``redis_url`` (else ``LATENTUP_REDIS_URL``); None: everything stays in this process."""
    url = cfg.redis_url or os.environ.get("LATENTUP_REDIS_URL") or None
    if url is None:
        if cfg.model_workers != 1:
            raise ConfigError(f"model_workers={cfg.model_workers} needs redis_url (without it this process is the "
                              "only worker): set redis_url or model_workers=1")
        return None
    link = Link(str(url))
    create_group(link)
    return link


def _load(cfg: DictConfig):
    from latentup.pipeline import Upscaler, default_weights

    speed = {k: cfg[k] for k in ("unet_tile", "vae_tile", "channels_last", "compile", "winograd")}
    weights = cfg.weights if cfg.weights is not None else default_weights()
    return Upscaler.from_pretrained(weights, device=cfg.device, dtype=cfg.dtype, autoencoder=cfg.autoencoder,
                                    text_encoder=cfg.text_encoder, download=cfg.download, **speed)


def first_frame_capped(max_bytes: int) -> type:
    """uvicorn's WebSocket protocol that reads at most ``max_bytes`` per message until the app sent its first one
    (the authentication answer): an unauthenticated client cannot make the server buffer a large frame."""
    if not hasattr(ServerProtocol(), "max_message_size"):  # older websockets would ignore the cap silently
        raise ConfigError("the server needs websockets >= 16.0 (its protocol has no max_message_size): "
                          "pip install 'websockets>=16'")

    class FirstFrameCapped(WebSocketsSansIOProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.conn.max_message_size = max_bytes

        async def send(self, message) -> None:
            if message["type"] == "websocket.send":
                self.conn.max_message_size = self.config.ws_max_size
            await super().send(message)

    return FirstFrameCapped


class Server(uvicorn.Server):
    """uvicorn's server, which drains the service before it closes connections, and ends normally on SIGINT and
    SIGTERM alike (uvicorn would raise the signal again once drained, killing the process before its cleanup)."""

    def __init__(self, config: uvicorn.Config, service: Service, pending, drain_timeout: float, ready_line: str):
        super().__init__(config)
        self.service, self.pending, self.drain_timeout, self.ready_line = service, pending, drain_timeout, ready_line

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            print(self.ready_line, flush=True)

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self.service.drain(self.pending, self.drain_timeout)
        # what is left of drain_timeout for connections that still do not end (a request body that drips)
        self.config.timeout_graceful_shutdown = max(0.5, self.drain_timeout - (loop.time() - start))
        await super().shutdown(sockets)


def serve(cfg: DictConfig) -> None:
    keys, fetch_hosts = _check(cfg)
    sock = _bind(str(cfg.host), cfg.port)
    host = f"[{cfg.host}]" if ":" in str(cfg.host) else str(cfg.host)
    port = sock.getsockname()[1]
    address = f"{host}:{port}"
    # imageURLs without public_url: the request's Host, else this (never a wildcard address nobody can fetch from)
    fallback = f"http://{socket.gethostname() if str(cfg.host) in WILDCARD_HOSTS else host}:{port}"
    link = _link(cfg)  # before the model loads: a Redis that is not there fails at once
    upscaler = _load(cfg)
    with contextlib.ExitStack() as stack:
        fetch = UrlFetcher(fetch_hosts, int(cfg.fetch_max_mb * 2**20), cfg.fetch_timeout) if fetch_hosts else None
        limits = Limits(cfg.max_prompt_chars, cfg.max_step_megapixels, cfg.max_inflight_per_key,
                        cfg.max_inflight_per_connection)
        store_bytes, buffer_bytes = int(cfg.store_max_mb * 2**20), int(cfg.session_buffer_mb * 2**20)
        if link is None:
            folder = cfg.store_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="latentup-serve-"))
            store, queue = ImageStore(Path(str(folder)), cfg.output_ttl, store_bytes), None
            records = Records(cfg.max_records_per_key, cfg.max_inflight_per_key)
            sessions = Sessions(cfg.session_ttl, buffer_bytes, 2 * KEEPALIVE)
        else:
            store, queue = RedisStore(link, cfg.output_ttl, store_bytes), SharedQueue(link, cfg.max_queue,
                                                                                     cfg.task_timeout)
            records = RedisRecords(link, cfg.max_records_per_key, cfg.max_inflight_per_key,
                                   cfg.task_timeout + cfg.redis_claim_after + cfg.output_ttl, buffer_bytes)
            sessions = RedisSessions(link, cfg.session_ttl, buffer_bytes, 2 * KEEPALIVE, PURGE_INTERVAL)
        service = Service(upscaler, store, dict(max_queue=cfg.max_queue, max_batch=cfg.max_batch,
                                                batch_wait=cfg.batch_wait), keys, fetch, cfg.task_timeout, limits,
                          records, queue)
        worker = Worker(link, service, cfg.redis_claim_after) if link is not None and cfg.model_workers else None

        @contextlib.asynccontextmanager
        async def lifespan(app):
            async def purge():
                while True:
                    await asyncio.sleep(PURGE_INTERVAL)
                    try:
                        await asyncio.to_thread(store.purge)
                        await service.records.purge()
                        await sessions.purge()
                    except (TaskError, *DOWN) as error:  # Redis away: the next round
                        log.warning("purge skipped: %s", error)
                    except Exception as error:  # never end the loop: log it and go on
                        log.error("purge failed (%s: %s): the next round in %g s", type(error).__name__, error,
                                  PURGE_INTERVAL)

            def ended(loop: asyncio.Future) -> None:  # a loop that ends while serving: say so, and in /health
                if not loop.cancelled():
                    error = loop.exception()
                    log.error("a background loop ended (%s): /health says unavailable", error or "returned")
                    service.broken = True

            loops = [service.batcher.run_forever(), purge()]
            if link is not None:
                loops.append(link.listen())
            if worker is not None:
                loops.append(worker.run_forever())
            running = [asyncio.ensure_future(loop) for loop in loops]
            for loop in running:
                loop.add_done_callback(ended)
            yield
            for loop in running:
                loop.cancel()
            service.batcher.close()

        max_bytes, max_auth_bytes = int(cfg.max_request_mb * 2**20), int(cfg.max_auth_kb * 2**10)
        app = create_app(service, sessions, cfg.max_tasks_per_request, max_bytes, lifespan,
                         max_auth_bytes=max_auth_bytes, auth_timeout=cfg.auth_timeout,
                         public_url=cfg.public_url or "", fallback_url=fallback,
                         max_pending=cfg.max_inflight_per_connection + cfg.max_tasks_per_request)
        config = uvicorn.Config(app, log_level=cfg.log_level, access_log=False, ws_max_size=max_bytes,
                                ws=first_frame_capped(max_auth_bytes), ws_ping_interval=KEEPALIVE,
                                ws_ping_timeout=KEEPALIVE, lifespan="on",
                                timeout_graceful_shutdown=cfg.drain_timeout)
        held = (lambda: len(worker.held)) if worker is not None else (lambda: 0)  # queued tasks this worker runs
        Server(config, service, lambda: app.state.pending() + held(), cfg.drain_timeout,
               f"serving on http://{address} (ws://{address}/v1)").run(sockets=[sock])


@command(config_dir("serve"), "serve", __doc__, FREE_TEXT)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_error():
        serve(cfg)


if __name__ == "__main__":
    main()
