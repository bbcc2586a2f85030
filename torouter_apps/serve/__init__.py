"""``torouter serve``: an OpenAI-compatible chat completions endpoint in front of a ``ChatTORouter``.

Any OpenAI client can use a trained router as if it were one model: ``POST
/v1/chat/completions`` with ``model="torouter"`` lets the router pick the expert,
``model="<expert>"`` forces one, an optional ``"torouter": {"cost_weight": W, "max_cost": C}``
in the request body overrides the server's routing trade-off for that request (OpenAI
clients send it with ``extra_body``), ``tools`` route among the experts that can call
them, and every response names the answering expert in ``model`` and carries the
routing decision in an extra ``torouter`` field (on the first chunk when streaming).
``GET /v1/models`` lists the router and its experts, ``GET /health`` answers load
balancers.

The server is configured by a YAML file (see ``examples/router.yaml``)::

    router: runs/router                # saved router directory, relative to this file
    experts:
      edge-small: {class: "langchain_torouter:RuleBasedFakeChatModel", kwargs: {model: edge-small}}
      cloud-large: {model: "openai:gpt-4o-mini", kwargs: {api_key: "${OPENAI_API_KEY}"}}
    cost_weight: 50
    auth: {token_env: TOROUTER_TOKEN}  # clients send "Authorization: Bearer <token>"
    limits: {max_request_bytes: 1048576, max_tokens: 4096, max_messages: 256}
    timeouts: {request_s: 600, expert_s: 120, read_s: 15}

Nothing a client or an expert does can hold the server's resources without bound:

* every request has a deadline (``timeouts.request_s``, routing and every expert tried
  included) and every expert attempt one of its own (``timeouts.expert_s``: its whole
  answer, or for a stream its first token and then each gap between tokens); an expert
  past its deadline is cancelled and the next in the ranking answers;
* a client that disconnects cancels its expert call, streamed or not;
* a connection must send its request head and body within ``timeouts.read_s``;
* router inference runs on a thread of its own and each expert gets its own capacity
  (``limits.expert_concurrency`` calls at once, ``limits.expert_threads`` threads for
  blocking work), so a slow or hung expert can only exhaust its own share. Experts
  without an async implementation, those marked ``threaded: true`` and async experts
  seen blocking the event loop run on their own threads, so ``/health`` and the other
  experts keep answering.

Bad input is a 400 before it reaches the router: text that is not valid Unicode (a lone
UTF-16 surrogate), integers of more than 64 digits, NaN, Infinity and numbers beyond a
float. A prompt that still breaks a batched router call fails alone: the batch's other
requests are routed again one by one. An empty answer (no text and no tool call) counts
as a failure of that expert, plain or streamed, and the next expert answers. Keys read
through ``${VAR}`` and the bearer token never appear in reprs, logs or responses.

The package is split by idea: ``config`` (the config file and building the router it
describes), ``protocol`` (OpenAI request and response shapes), ``lanes`` (each expert's
own capacity), ``attempts`` (one expert call for one request), ``batching`` (routing
concurrent requests together), ``service`` (request handling) and ``app`` (the FastAPI
app and its uvicorn server). The names below are its API; the modules' underscored
names are not. Log records go to the ``torouter.serve`` logger.

It needs the ``serve`` extra (FastAPI, uvicorn, PyYAML, LangChain); the core
``torouter`` package never imports it, and the ``torouter serve`` command reaches it
through the ``torouter.commands`` plugin of ``torouter_apps``.
"""

from .app import create_app, run_server, server_config
from .attempts import EmptyAnswer, ExpertTimeout
from .config import (
    DEFAULT_NAME,
    AuthConfig,
    ConfigError,
    ExpertConfig,
    Limits,
    ServeConfig,
    Timeouts,
    build_chat_model,
    load_config,
)

__all__ = ["DEFAULT_NAME", "AuthConfig", "ConfigError", "EmptyAnswer", "ExpertConfig", "ExpertTimeout", "Limits",
           "ServeConfig", "Timeouts", "build_chat_model", "create_app", "load_config", "run_server", "server_config"]
