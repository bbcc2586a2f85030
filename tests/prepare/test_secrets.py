"""Every value read from ``${VAR}`` is a secret, whatever the key or variable is called.

Headers such as ``x-api-key``, ``Authorization`` and ``X-Auth`` and a password inside a
URL are credentials too, though neither their key nor their variable's name says so.
A failing expert that repeats them in its error, or an endpoint that echoes them in
its answer, must not carry them into the cache, the routing data, logs or errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from pathlib import Path

import pytest
from typer.testing import CliRunner

from torouter.cli import app
from torouter.credentials import Redactor, hide_secrets, reveal
from torouter.prepare import ManifestError, build_expert, prepare
from torouter.prepare.experts import parse_manifest

# Variable names that do not look like credentials (no KEY, TOKEN, SECRET or PASSWORD in them).
VALUES = {
    "TR_HEADER_A": "hdrval-7Q2mZ9kx",
    "TR_HEADER_B": "authz-P4s8Kx1w",
    "TR_HEADER_C": "xauth-W3n6Rt0y",
    "TR_URL_PW": "pw/Lc5+v:J1@q",     # characters a URL must percent-encode
}

EXPERTS_MODULE = '''
import json
import urllib.parse

from langchain_core.language_models.fake_chat_models import FakeListChatModel


def refuse(prompt, headers, base_url):
    # Like an SDK error that repeats the request it refused.
    raise ValueError(f"403 from {base_url}: headers {json.dumps(headers)} were refused")


def echo(prompt, headers, base_url):
    # Like a misconfigured proxy that echoes the request into the answer.
    return {"text": f"You sent {headers} to {base_url}", "input_tokens": 3, "output_tokens": 5}


def quoted(prompt, headers, base_url):
    password = urllib.parse.urlsplit(base_url).password or ""
    raise ConnectionRefusedError(f"cannot connect as svc:{urllib.parse.quote(password, safe='')}@llm")


def fine(prompt, headers, base_url):
    return {"text": "an honest answer", "input_tokens": 3, "output_tokens": 3}


def build_fails(**kwargs):
    raise RuntimeError(f"client rejected its settings: {kwargs}")


class EchoChat(FakeListChatModel):
    default_headers: dict = {}
    base_url: str = ""

    def _call(self, messages, stop=None, run_manager=None, **kwargs):
        raise PermissionError(f"denied for {self.default_headers} at {self.base_url}")
'''

KWARGS = ("{headers: {x-api-key: '${TR_HEADER_A}', Authorization: 'Bearer ${TR_HEADER_B}', "
          "X-Auth: '${TR_HEADER_C}'}, base_url: 'https://svc:${TR_URL_PW}@llm.example.test/v1'}")
LC_KWARGS = ("{responses: [x], default_headers: {x-api-key: '${TR_HEADER_A}', Authorization: 'Bearer ${TR_HEADER_B}', "
             "X-Auth: '${TR_HEADER_C}'}, base_url: 'https://svc:${TR_URL_PW}@llm.example.test/v1'}")

MANIFEST = f"""
experts:
  - name: refuse
    tier: cloud
    retries: 0
    python: {{callable: "secret_experts:refuse", kwargs: {KWARGS}}}
  - name: echo
    tier: cloud
    python: {{callable: "secret_experts:echo", kwargs: {KWARGS}}}
  - name: quoted
    tier: cloud
    retries: 0
    python: {{callable: "secret_experts:quoted", kwargs: {KWARGS}}}
  - name: fine
    tier: edge
    python: {{callable: "secret_experts:fine", kwargs: {KWARGS}}}
  - name: langchain
    tier: cloud
    retries: 0
    langchain: {{class: "secret_experts:EchoChat", kwargs: {LC_KWARGS}}}
"""


def _forms(value: str) -> set[str]:
    """The value and the encodings an error message may carry it in."""
    return {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value), json.dumps(value)[1:-1]}


def _assert_nowhere(*texts: str | bytes) -> None:
    for text in texts:
        blob = text if isinstance(text, str) else text.decode("utf-8", "replace")
        for value in VALUES.values():
            for form in _forms(value):
                assert form not in blob, f"{form!r} leaked into {blob[:300]!r}"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "secret_experts.py").write_text(EXPERTS_MODULE)
    (tmp_path / "experts.yaml").write_text(MANIFEST)
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "prompt": f"question {i}", "reference": "an honest answer"}) + "\n"
        for i in range(3)))
    for name, value in VALUES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib
    import sys

    sys.modules.pop("secret_experts", None)
    importlib.import_module("secret_experts")
    return tmp_path


def _files_bytes(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file() and p.suffix != ".py"
            and p.name != "experts.yaml"]


def test_substituted_values_reach_no_cache_output_log_or_error(workdir, caplog, capfd):
    with caplog.at_level(logging.DEBUG):
        summary = prepare(workdir / "experts.yaml", workdir / "prompts.jsonl", workdir / "data.jsonl",
                          score="exact", progress=False)
    assert summary.run.failed == {"refuse": 3, "echo": 0, "quoted": 3, "fine": 0, "langchain": 3}
    records = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()]
    first = records[0]["responses"]
    # The failures are recorded, with what went wrong, but the values are masked ...
    assert first["refuse"]["error"].startswith("ValueError: 403 from https://svc:***@llm.example.test/v1")
    assert "***" in first["echo"]["text"] and first["fine"]["score"] == 1.0
    assert first["langchain"]["error"].startswith("PermissionError: denied for")
    # ... in the cache (database and WAL), the routing data, logs and the console.
    out, err = capfd.readouterr()
    _assert_nowhere(*_files_bytes(workdir), caplog.text, out, err, repr(summary))


def test_the_cli_masks_values_in_build_errors(workdir):
    (workdir / "broken.yaml").write_text(f"""
experts:
  - name: broken
    tier: cloud
    langchain: {{class: "secret_experts:build_fails", kwargs: {LC_KWARGS}}}
""")
    result = CliRunner().invoke(app, ["prepare", "--experts", "broken.yaml", "--prompts", "prompts.jsonl",
                                      "--out", "data.jsonl", "--score", "none", "--no-progress"])
    assert result.exit_code == 2
    assert "expert 'broken': could not build secret_experts:build_fails: RuntimeError" in result.output
    _assert_nowhere(result.output, *_files_bytes(workdir))


def test_build_error_raised_by_the_library_is_masked(workdir):
    spec = parse_manifest([{"name": "broken", "tier": "cloud", "langchain": {
        "class": "secret_experts:build_fails",
        "kwargs": {"default_headers": {"X-Auth": "${TR_HEADER_C}"}, "base_url": "https://u:${TR_URL_PW}@h"}}}])
    with pytest.raises(ManifestError) as caught:
        asyncio.run(build_expert(spec.experts[0]).start())
    _assert_nowhere(str(caught.value), repr(caught.value))
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_every_substituted_value_is_masked_by_every_redactor(monkeypatch):
    monkeypatch.setenv("PLAIN_NAME", "value-from-env-31")
    revealed = reveal({"headers": {"X-Custom": "pre-${PLAIN_NAME}-post"}}, Redactor())
    assert revealed == {"headers": {"X-Custom": "pre-value-from-env-31-post"}}
    # Any redactor in the process masks it, e.g. the endpoint's, for experts built by the manifest.
    assert Redactor()("error: pre-value-from-env-31-post") == "error: pre-***-post"


def test_credential_like_header_keys_are_hidden_when_written_literally():
    hidden = hide_secrets({"default_headers": {"x-api-key": "lit-aaaa1111", "Authorization": "Bearer lit-bbbb2222",
                                               "X-Auth-Token": "lit-cccc3333", "X-Auth": "lit-dddd4444",
                                               "Accept": "application/json"}})
    text = repr(hidden)
    assert "lit-" not in text and "application/json" in text


def test_a_password_inside_a_url_is_masked_even_when_written_literally():
    redact = Redactor()
    assert redact("failed: https://bot:hunter2-literal@proxy.example:8080/v1 (timeout)") == \
        "failed: https://bot:***@proxy.example:8080/v1 (timeout)"
    assert redact("see https://example.org/a@b and mailto:x@y") == "see https://example.org/a@b and mailto:x@y"


def test_short_values_are_not_masked_everywhere(monkeypatch):
    """A value of a few characters (a port, a flag) cannot be masked without garbling every message."""
    monkeypatch.setenv("TR_PORT", "80")
    reveal({"base_url": "http://localhost:${TR_PORT}"}, Redactor())
    assert Redactor()("HTTP 800 from localhost:80") == "HTTP 800 from localhost:80"


SERVE_KWARGS = {"default_headers": {"x-api-key": "${TR_HEADER_A}", "Authorization": "Bearer ${TR_HEADER_B}",
                                    "X-Auth": "${TR_HEADER_C}"},
                "base_url": "https://svc:${TR_URL_PW}@llm.example.test/v1"}

LEAKY_CHAT = '''
from langchain_torouter import ChatRuleBased


class LeakyChat(ChatRuleBased):
    default_headers: dict = {}
    base_url: str = ""

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        raise RuntimeError(f"401 from {self.base_url} with {self.default_headers}")

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):
        raise RuntimeError(f"401 from {self.base_url} with {self.default_headers}")
'''


def test_the_endpoint_masks_values_in_502_bodies_and_logs(tmp_path, monkeypatch, caplog):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from helpers.langchain_experts import trained_router
    from torouter_apps.serve import ServeConfig, create_app
    from torouter.synthetic import EXPERTS

    for name, value in VALUES.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "leaky_chat.py").write_text(LEAKY_CHAT)
    monkeypatch.syspath_prepend(str(tmp_path))
    router_dir = trained_router().save(tmp_path / "router")
    config = ServeConfig.model_validate({"router": str(router_dir), "experts": {
        name: {"class": "leaky_chat:LeakyChat", "kwargs": {"model": name, **SERVE_KWARGS}} for name in EXPERTS}})
    with caplog.at_level(logging.DEBUG):
        client = TestClient(create_app(config))
        plain = client.post("/v1/chat/completions", json={"model": "torouter",
                                                          "messages": [{"role": "user", "content": "hi"}]})
        streamed = client.post("/v1/chat/completions", json={
            "model": "torouter", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert plain.status_code == 502 and "RuntimeError: 401 from https://svc:***@llm" in plain.text
    _assert_nowhere(plain.text, streamed.text, caplog.text)
