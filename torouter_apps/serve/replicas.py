"""The endpoint as several Ray Serve replicas of one config.

The endpoint keeps no state between requests apart from its config (the router, the
experts, auth and limits), so replicas built from the same config answer the same way and
need no coordination; each batches the routing of its own concurrent requests. Ray Serve
puts one HTTP proxy in front and spreads requests over ``replicas`` copies of the app,
each built on its replica by ``create_app(config)``::

    serve run torouter_apps.serve.replicas:build config=/abs/path/serve.yaml replicas=4

or from Python (``serve.run(replicas_app("serve.yaml", replicas=4))``). The config (and
the router it names) must be readable at the same path on every node. Ray Serve's proxy
replaces uvicorn in front of the app: the connection limits and read deadlines of
``torouter serve`` do not apply there (Ray Serve's ``request_timeout_s`` and
``max_ongoing_requests`` are its own); request deadlines, sizes and auth are the app's and do.
Needs the ``ray`` extra (``pip install 'torouter[ray]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import ConfigError


def replicas_app(config: str | os.PathLike, replicas: int = 2, num_cpus: float = 1.0,
                 max_ongoing_requests: int = 100) -> Any:
    """A Ray Serve application of ``replicas`` copies of the endpoint served from ``config``."""
    try:
        from ray import serve
    except ImportError as exc:
        raise ConfigError(f"replicas need Ray Serve: pip install 'torouter[ray]' ({exc})") from None
    if replicas < 1:
        raise ConfigError(f"replicas must be at least 1, not {replicas}")
    path = Path(config).resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: no such server config")

    def build_asgi_app() -> Any:  # runs on each replica
        from .app import create_app

        return create_app(path)

    class TorouterEndpoint:
        """One replica: the FastAPI app of ``create_app(config)``."""

    ingress = serve.ingress(build_asgi_app)(TorouterEndpoint)
    deployment = serve.deployment(name="torouter", num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
                                  ray_actor_options={"num_cpus": num_cpus})(ingress)
    return deployment.bind()


def build(args: dict[str, str]) -> Any:
    """The application builder of ``serve run torouter_apps.serve.replicas:build config=... replicas=N``."""
    unknown = set(args) - {"config", "replicas", "num_cpus"}
    if "config" not in args or unknown:
        raise ConfigError("serve run torouter_apps.serve.replicas:build takes config=PATH [replicas=N] "
                          f"[num_cpus=C]; got {sorted(args)}")
    return replicas_app(args["config"], int(args.get("replicas", 2)), float(args.get("num_cpus", 1.0)))
