"""``torouter route`` on Ray Data: prompts embedded and routed in batches on a pool of actors.

Each actor loads the saved router once (from its directory, which every node must see: a
shared volume, or the same path on each machine) and routes one block of prompts per call;
the driver puts the choices back in the input's order. The choices are the local engine's:
the same router, the same batches of ``Router.route``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data import Prompt
from . import EngineError
from .ray_session import cluster_workers, ray_session

ROUTE_BLOCK = 1024  # prompts per actor call: large enough that the encoder works in full batches


class RouteBatch:
    """A Ray Data actor holding one loaded router."""

    def __init__(self, router_dir: str, cost_weight: float, max_cost: float | None):
        from ..routers import load_router

        self.cost_weight, self.max_cost = cost_weight, max_cost
        # Ray restarts an actor whose constructor fails, without end: a router that cannot load
        # fails the first block instead, and the run.
        self.start_error: BaseException | None = None
        try:
            self.router = load_router(router_dir)
            # Encoders load on first use: load now, while the actor starts, not inside the first block.
            self.router.route(["warm-up"])
        except Exception as exc:  # noqa: BLE001 - raised again, as it is, by __call__
            self.start_error = exc

    def __call__(self, block: Mapping[str, Any]) -> dict[str, list[Any]]:
        if self.start_error is not None:
            from .ray_prepare import portable

            raise portable(self.start_error)
        started, started_at = time.perf_counter(), time.time()
        prompts = [json.loads(str(p)) for p in block["prompt"]]
        experts = self.router.route(prompts, cost_weight=self.cost_weight, max_cost=self.max_cost)
        spent = time.perf_counter() - started
        # The block's time on its first row, so that the driver's sum is the time spent in actors.
        n = len(prompts)
        return {"i": [int(i) for i in block["i"]], "expert": list(experts), "task_s": [spent] + [0.0] * (n - 1),
                "started_at": [started_at] * n, "ended_at": [time.time()] * n}


def route_on_ray(router_dir: str | os.PathLike, prompts: Sequence[Prompt], *, cost_weight: float = 0.0,
                 max_cost: float | None = None, address: str | None = None, num_cpus: int | None = None,
                 actors: int | None = None, block: int = ROUTE_BLOCK,
                 timings: dict[str, float] | None = None) -> list[str]:
    """The chosen expert for each prompt, routed on a Ray cluster; ``timings`` (if given) gets
    ``task_s`` (time inside the actors' calls), ``actors_start_s`` (until the first block started:
    starting the actors and loading the router), ``blocks_span_s`` (first block start to last end)
    and ``wall_s``."""
    router_dir = Path(router_dir).resolve()
    if not router_dir.is_dir():
        raise EngineError(f"{router_dir}: no saved router there")
    with ray_session(address, num_cpus) as ray:
        started = time.perf_counter()
        pool = actors or cluster_workers(ray)
        rows = [{"i": i, "prompt": json.dumps(p, ensure_ascii=False)} for i, p in enumerate(prompts)]
        blocks = max(1, math.ceil(len(rows) / block))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            RouteBatch, batch_size=None, batch_format="numpy",
            fn_constructor_kwargs={"router_dir": str(router_dir), "cost_weight": cost_weight, "max_cost": max_cost},
            compute=ray.data.ActorPoolStrategy(size=min(pool, blocks)), num_cpus=1)
        chosen: list[str | None] = [None] * len(rows)
        task_s, first_start, last_end, started_at = 0.0, math.inf, 0.0, time.time()
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for i, expert, spent in zip(batch["i"], batch["expert"], batch["task_s"]):
                    chosen[int(i)] = str(expert)
                    task_s += float(spent)
                first_start = min(first_start, float(min(batch["started_at"])))
                last_end = max(last_end, float(max(batch["ended_at"])))
        except Exception as exc:  # noqa: BLE001 - a Ray failure says what failed underneath
            from .ray_prepare import _root_cause

            cause = _root_cause(exc)
            raise EngineError(f"routing on Ray stopped: {type(cause).__name__}: {cause}") from None
        if timings is not None:
            timings.update(task_s=task_s, wall_s=time.perf_counter() - started,
                           actors_start_s=first_start - started_at, blocks_span_s=last_end - first_start)
    return [c for c in chosen if c is not None]
