"""Joining a Ray cluster, or starting a local Ray instance, for one torouter command.

``--ray-address`` joins an existing cluster (``auto``, ``HOST:PORT`` of its head node, or a
``ray://HOST:PORT`` Ray Client address); without it a local Ray instance starts with
``--ray-cpus`` CPUs and stops when the command ends. A session already started by the
caller (``ray.init`` in a notebook or a test) is used as it is and left running.

An address that cannot be reached is refused after a short TCP check, with a message that
names it, instead of Ray's own retry loop (which waits a minute before saying anything).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from . import EngineError

INSTALL_HINT = "the Ray engine needs Ray: pip install 'torouter[ray]'"
CONNECT_TIMEOUT_S = 5.0


def import_ray() -> Any:
    """The ``ray`` module, or an ``EngineError`` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data comes with the ray[data] extra
    except ImportError as exc:
        raise EngineError(f"{INSTALL_HINT} ({exc})") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``HOST:PORT`` or ``ray://HOST:PORT`` address; None for ``auto``/``local``."""
    plain = address.removeprefix("ray://")
    if plain in ("auto", "local"):
        return None
    host, sep, port = plain.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EngineError(f"--ray-address {address!r}: expected HOST:PORT (the head node's GCS address, e.g. "
                          "10.0.0.5:6379), ray://HOST:PORT (Ray Client) or auto")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an address nothing listens on, before Ray spends a minute retrying it."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as exc:
        raise EngineError(f"--ray-address {address!r}: cannot reach a Ray cluster there "
                          f"({exc.strerror or exc}); start one with 'ray start --head' or give the head "
                          "node's address") from None


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, progress: bool = False) -> Iterator[Any]:
    """The ``ray`` module, connected for the length of the ``with`` block."""
    ray = import_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    # An expert's or scorer's own error (a ManifestError, a ScoreError) reaches the caller as it is.
    context.raise_original_map_exception = True
    if not progress:  # Ray Data's per-dataset "Starting execution" lines
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if address is not None:
        check_reachable(address)
    if ray.is_initialized():
        yield ray
        return
    # Workers inherit this process's environment (PYTHONPATH, credentials named in the manifest).
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": progress,
                               "configure_logging": False}
    try:
        if address is not None:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {address!r}" if address is not None else "locally"
        raise EngineError(f"cannot start or join a Ray cluster {where}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_workers(ray: Any) -> int:
    """CPUs the cluster offers: how many actors an expert or a scorer may spread over."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("GPU", 0))
