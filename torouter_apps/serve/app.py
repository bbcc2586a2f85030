"""The FastAPI app around the request handling, and the uvicorn server that serves it with its deadlines."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import traceback
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from langchain_torouter import ChatTORouter
from torouter.credentials import Redactor

from .config import DEFAULT_NAME, ConfigError, Limits, ServeConfig, Timeouts, _auth_token, _build, load_config
from .protocol import _APIError
from .service import _Service

logger = logging.getLogger("torouter.serve")


def create_app(config_or_chat_model: Any, *, token: str | None = None, limits: Limits | None = None,
               name: str | None = None, timeouts: Timeouts | None = None, threaded: Iterable[str] = ()) -> FastAPI:
    """The FastAPI app serving a router as an OpenAI-compatible endpoint.

    ``config_or_chat_model`` is a config file path, a ``ServeConfig`` or a ready
    ``ChatTORouter``. ``token`` (bearer auth), ``limits``, ``name`` and ``timeouts``
    override the config's; ``threaded`` names experts to call through their sync API on
    their own threads (added to those the config marks ``threaded: true``); with a
    ``ChatTORouter`` these are the only settings. Raises ``ConfigError`` when the config
    cannot be built, before anything listens.

    The app makes the event loop's default executor send blocking work submitted
    during an expert call to that expert's own threads (see ``Limits.expert_threads``);
    work submitted outside expert calls runs on an ordinary pool, as before. Serve it
    with ``run_server`` (or ``server_config``) to get the connection deadlines too.
    """
    redactor = Redactor()
    if isinstance(config_or_chat_model, (str, os.PathLike)):
        config_or_chat_model = load_config(config_or_chat_model)
    if isinstance(config_or_chat_model, ServeConfig):
        config = config_or_chat_model
        chat_model = _build(config, redactor)
        if token is None and config.auth is not None:
            token = _auth_token(config.auth)
        limits = limits or config.limits
        name = name or config.name
        timeouts = timeouts or config.timeouts
        threaded = {*threaded, *(n for n, spec in config.experts.items() if spec.threaded)}
    elif isinstance(config_or_chat_model, ChatTORouter):
        chat_model = config_or_chat_model
    else:
        raise TypeError(f"create_app takes a config path, a ServeConfig or a ChatTORouter, "
                        f"not a {type(config_or_chat_model).__name__}")
    if token is not None and not token.strip():
        raise ConfigError("token: an empty bearer token would let anyone in; pass None to turn auth off")
    name = name or DEFAULT_NAME
    if name in chat_model.experts or DEFAULT_NAME in chat_model.experts:
        raise ConfigError(f"name: {name!r} (or {DEFAULT_NAME!r}) is also an expert's name")
    service = _Service(chat_model, name, limits or Limits(), timeouts or Timeouts(), token, redactor, threaded)

    app = FastAPI(title="torouter", summary="OpenAI-compatible endpoint for a TO-Router",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.torouter = service

    @app.exception_handler(_APIError)
    async def api_error(request: Request, exc: _APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(service, exc)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Any:
        service.check_auth(request)
        return service.models()

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request) -> Any:
        service.check_auth(request)
        if model_id not in (service.name, *service.experts):
            raise _APIError(404, f"The model {model_id!r} does not exist.", code="model_not_found", param="model")
        return service.model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            return await service.chat(request)
        except _APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered as a generic 500, detail only in the log
            return _internal_error(service, exc)

    return app


def _internal_error(service: _Service, exc: BaseException) -> JSONResponse:
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    logger.error("internal error while serving a request:\n%s", service.redact(detail))
    return _APIError(500, "The server had an internal error while processing the request.",
                     type="server_error", code="internal_error").response()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _head_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection that has not sent a complete request head in ``seconds``.

    uvicorn bounds idle keep-alive connections, but not a connection that never finishes
    its request head (or drips it): without this, a few hundred such sockets stay open
    for as long as their client likes. There is no request to answer yet, so the
    connection is simply closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._expect_head(None)

        def on_response_complete(self) -> None:
            finished = self.cycle
            super().on_response_complete()
            if self.cycle is finished:  # no pipelined request started: the next head must come in time
                self._expect_head(finished)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _expect_head(self, cycle: Any) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            if not self.transport.is_closing():
                self._head_timer = self.loop.call_later(seconds, self._head_overdue, cycle)

        def _head_overdue(self, cycle: Any) -> None:
            self._head_timer = None
            if self.cycle is cycle and not self.transport.is_closing():  # still no new request
                self.transport.close()

    return HeadDeadlineH11Protocol


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> Any:
    """The ``uvicorn.Config`` that serves ``app`` with its connection limits and deadlines.

    From the app's ``Limits`` and ``Timeouts``: at most ``max_connections`` connections
    (503 beyond), a request head within ``read_s`` (the connection is closed otherwise;
    the body's deadline is enforced by the app), idle keep-alive connections closed after
    ``keep_alive_s``. Other keyword arguments go to ``uvicorn.Config``.
    """
    import uvicorn

    service: _Service = app.state.torouter
    options: dict[str, Any] = {
        "server_header": False, "http": _head_deadline_protocol(service.timeouts.read_s),
        "timeout_keep_alive": service.timeouts.keep_alive_s, "limit_concurrency": service.limits.max_connections}
    return uvicorn.Config(app, host=host, port=port, **{**options, **kwargs})


def run_server(app_or_config: Any, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
               timeout_graceful_shutdown: float = 30.0) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests then get up to ``timeout_graceful_shutdown`` s to finish."""
    import uvicorn

    app = app_or_config if isinstance(app_or_config, FastAPI) else create_app(app_or_config)
    service: _Service = app.state.torouter
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    if service._token_digest is None and not _is_loopback(host):
        logger.warning("serving on %s without auth: anyone who can reach it can spend your experts' budget; "
                       "set auth: {token_env: ...} in the config", host)
    logger.info("router %r over experts %s", service.name, service.experts)
    try:  # load the encoder now, so the first client does not wait for it
        service.chat_model.route("warm-up")
    except Exception as exc:  # noqa: BLE001 - the first request will report the problem
        logger.warning("router warm-up failed: %s", service.redact(f"{type(exc).__name__}: {exc}"))
    config = server_config(app, host, port, log_level=log_level, timeout_graceful_shutdown=timeout_graceful_shutdown)
    uvicorn.Server(config).run()
