"""``capture:`` in a ``torouter serve`` config records routed prompts, masked, answers only when asked."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
import yaml  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from helpers.langchain_experts import trained_router  # noqa: E402

from torouter.prepare.pipeline import read_prompts  # noqa: E402
from torouter.synthetic import EXPERTS  # noqa: E402
from torouter_apps.serve import ConfigError, create_app, load_config  # noqa: E402

LEAK = "sk-live-0123456789abcdefSERVE"


def _config(tmp_path, capture):
    router = tmp_path / "router"
    if not router.exists():
        trained_router().save(router)
    config = {"router": "router", "capture": capture,
              "experts": {n: {"class": "langchain_torouter:ChatRuleBased", "kwargs": {"model": n}} for n in EXPERTS}}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ask(client, text, stream=False):
    body = {"model": "torouter", "messages": [{"role": "user", "content": text}], "stream": stream}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def test_endpoint_captures_prompts_without_answers(tmp_path):
    path = _config(tmp_path, {"path": "captured/prompts.jsonl", "patterns": [r"\d{3}-\d{4}"], "task": "support"})
    assert load_config(path).capture.path == tmp_path / "captured" / "prompts.jsonl"   # relative to the config
    with TestClient(create_app(path)) as client:
        reply = _ask(client, f"What is 12 * 12? my key is {LEAK}, call 555-1234").json()
        _ask(client, "Tell me about the heart", stream=True)
    lines = [json.loads(x) for x in (tmp_path / "captured" / "prompts.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["prompt"] == "What is 12 * 12? my key is ***, call ***"
    assert lines[0]["routed_to"] == reply["torouter"]["chosen"] and lines[0]["source"] == "serve"
    assert lines[0]["task"] == "support" and all("answer" not in line for line in lines)
    assert len(read_prompts(tmp_path / "captured" / "prompts.jsonl")) == 2          # prepare takes it as is


def test_endpoint_records_answers_when_asked(tmp_path):
    path = _config(tmp_path, {"path": "prompts.jsonl", "include_answers": True})
    with TestClient(create_app(path)) as client:
        reply = _ask(client, "What is 12 * 12?").json()
    (line,) = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert line["answer"] == reply["choices"][0]["message"]["content"]
    assert line["routed_to"] == reply["model"]


def test_bad_capture_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="capture: .*bad redaction pattern"):
        create_app(_config(tmp_path, {"path": "p.jsonl", "patterns": ["("]}))
    with pytest.raises(ConfigError, match="capture"):
        load_config(_config(tmp_path, {"file": "p.jsonl"}))
