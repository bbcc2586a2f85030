"""The endpoint as two Ray Serve replicas of one config: both up, /health answers, and every
request is answered as one in-process app built from the same config answers it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="replicas need the ray extra: pip install 'torouter[ray]'")
serve = pytest.importorskip("ray.serve", reason="replicas need Ray Serve: pip install 'torouter[ray]'")
pytest.importorskip("fastapi")
import httpx  # noqa: E402
import yaml  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from torouter.data import RoutingDataset  # noqa: E402
from torouter.routers import make_router  # noqa: E402
from torouter.synthetic import EXPERTS, make_synthetic  # noqa: E402
from torouter_apps.serve import ConfigError, create_app  # noqa: E402
from torouter_apps.serve.replicas import build, replicas_app  # noqa: E402

QUESTIONS = ["What is 2 plus 2?", "Write a python function that reverses a list.",
             "Which drug treats hypertension?", "Who wrote Hamlet?"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("replicas")
    make_router("knn", k=5, backend="static").fit(RoutingDataset(make_synthetic(120))).save(folder / "router")
    experts = {n: {"class": "langchain_torouter:ChatRuleBased", "kwargs": {"model": n}} for n in EXPERTS}
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump({"router": "router", "experts": experts}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(config):
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(replicas_app(config, replicas=2, num_cpus=0.5), name="torouter", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _ask(client: TestClient | str, question: str) -> tuple[str, str, str]:
    """(question, answering expert, answer) from an in-process app or a server's base URL."""
    body = {"model": "torouter", "messages": [{"role": "user", "content": question}]}
    if isinstance(client, TestClient):
        response = client.post("/v1/chat/completions", json=body)
    else:
        response = httpx.post(f"{client}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    return question, body["model"], body["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_two_replicas_answer_as_one_app_from_the_same_config(base, config):
    status = serve.status().applications["torouter"].deployments["torouter"]
    assert status.replica_states.get("RUNNING") == 2
    health = httpx.get(f"{base}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    with TestClient(create_app(config)) as local:
        expected = [_ask(local, q) for q in QUESTIONS]
    # Several rounds, so that requests land on both replicas; every answer is the same.
    for _ in range(3):
        assert [_ask(base, q) for q in QUESTIONS] == expected
    assert len({model for _, model, _ in expected}) > 1  # the router did route


def test_bad_replica_settings_are_clear_errors(config, tmp_path):
    with pytest.raises(ConfigError, match="replicas must be at least 1"):
        replicas_app(config, replicas=0)
    with pytest.raises(ConfigError, match="no such server config"):
        replicas_app(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="takes config=PATH"):
        build({"replicas": "2"})
