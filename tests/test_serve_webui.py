"""The chat page at / (serve/web.py, serve/web/chat.html): served offline-safe with its security headers, off with
--no-web-ui, and its JavaScript's request building and SSE reading run under node against a live tiny server."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from openjamba import JambaForCausalLM
from openjamba.serve.api import ServerConfig, create_app
from openjamba.serve.engine import Engine
from openjamba.serve.web import PAGE
from openjamba.tokenizer import load_tokenizer

from .serve_helpers import build_checkpoint, tiny_server

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed: the page's JavaScript is run with it")
HTML = PAGE.read_text(encoding="utf-8")
SCRIPT = re.search(r"<script>(.*?)</script>", HTML, re.S).group(1)


@pytest.fixture(scope="module")
def app_of(tmp_path_factory):
    """create_app over a tiny model whose engine never starts (the page's routes do not touch it)."""
    checkpoint = build_checkpoint(tmp_path_factory.mktemp("webui") / "tiny-jamba")
    model = JambaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(checkpoint)

    def make(**config) -> TestClient:
        engine = Engine(model, max_context=1024, eos_token_ids=tokenizer.eos_token_ids)
        server_config = ServerConfig(model_name="tiny-jamba", max_context=1024, vocab_size=model.config.vocab_size,
                                     **config)
        return TestClient(create_app(engine, tokenizer, server_config))
    return make


def test_the_page_is_served_with_its_security_headers_and_no_external_url(app_of):
    r = app_of(api_key="sekrit").get("/")  # no key needed for the page itself
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.text == HTML and r.headers["x-content-type-options"] == "nosniff"
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["script-src"] == f"'sha256-{digest}'" and "unsafe" not in r.headers["content-security-policy"]
    assert not re.search(r"https?://", r.text), "the page must work offline: no external URL"
    assert r.text.count("<script") == 1 and not re.search(r"<[^>]*\s(on[a-z]+|style)=", r.text), \
        "inline handlers and style attributes would need 'unsafe-inline'"
    assert app_of().get("/favicon.ico").status_code == 204
    head = app_of().head("/")  # `curl -I` and uptime monitors (it was a 405)
    assert head.status_code == 200 and head.headers["content-type"] == "text/html; charset=utf-8"
    assert app_of().head("/health").status_code == 503  # answered (not a 405); this engine was never started


def test_no_web_ui_leaves_slash_a_404_in_openai_shape(app_of):
    client = app_of(web_ui=False)
    for path in ("/", "/favicon.ico"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert client.get("/metrics").status_code == 200  # the rest of the server as before


def test_the_flag_maps_to_the_config_and_the_page_ships_as_package_data():
    from openjamba.cli import build_parser

    assert build_parser().parse_args(["serve", "--model", "m"]).web_ui is True
    assert build_parser().parse_args(["serve", "--model", "m", "--no-web-ui"]).web_ui is False
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    section = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    patterns = re.findall(r'"([^"]+)"', section.split("openjamba = ")[1].split("]")[0])
    relative = PAGE.relative_to(Path(__file__).resolve().parents[1] / "openjamba")
    assert any(relative.match(pattern) for pattern in patterns), "a non-editable install would leave the page out"


def run_node(tmp_path: Path, code: str, timeout: float = 60) -> dict:
    """The page's script followed by `code` (which prints one JSON line), run by node; the printed JSON."""
    path = tmp_path / "page_test.js"
    wrapped = f"(async () => {{\n{code}\n}})().catch(e => {{ console.error(e); process.exit(1); }});"
    path.write_text(f"{SCRIPT}\n;{wrapped}\n")
    done = subprocess.run([NODE, str(path)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_node
def test_the_script_passes_node_check(tmp_path):
    path = tmp_path / "chat.js"
    path.write_text(SCRIPT)
    done = subprocess.run([NODE, "--check", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@needs_node
def test_the_pure_functions(tmp_path):
    """SSE split anywhere (mid-line, mid-CRLF), reasoning and content deltas, usage, error events and bodies,
    fenced code, and the request: the key as a Bearer header only when given."""
    out = run_node(tmp_path, r"""
      const stream = 'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\r\n\r\n' +
        'data: {"choices":[{"delta":{"reasoning_content":"hm"}}]}\n\n' +
        'data: {"choices":[{"delta":{"content":"Hi <b>"}}]}\n\n: a comment\n\n' +
        'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n' +
        'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,' +
        '"prompt_tokens_details":{"cached_tokens":5}}}\n\n' +
        'data: [DONE]\n\n';
      const results = [];
      for (const size of [1, 2, 3, 7, stream.length]) {
        const feed = sseFeed(), reply = newReply();
        for (let i = 0; i < stream.length; i += size) {
          for (const d of feed(stream.slice(i, i + size))) applyEvent(reply, d);
        }
        results.push(reply);
      }
      const failed = newReply();
      applyEvent(failed, '{"error":{"message":"the engine failed","type":"server_error"}}');
      const body = JSON.parse(chatRequest({system: "Be terse.", temperature: "0", maxTokens: "", model: "m"},
                                          [{role: "user", content: "hi", reasoning: "x"}]).body);
      console.log(JSON.stringify({
        results, failed: failed.error, note: usageNote(results[0].usage), body,
        keyless: chatRequest({}, []).headers, keyed: chatRequest({apiKey: "sekrit"}, []).headers,
        notFound: errorMessage(404, '{"error":{"message":"no such route"}}'), plain: errorMessage(502, "Bad Gateway"),
        fences: splitFences("See:\n```python\nx = 1\n```\nend"), open: splitFences("```\nhalf"),
      }));
    """)
    for reply in out["results"]:
        assert (reply["content"], reply["reasoning"], reply["finishReason"], reply["done"]) == ("Hi <b>", "hm", "stop",
                                                                                               True)
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 5 and reply["error"] is None
    assert out["failed"] == "the engine failed" and out["note"] == "9 prompt tokens, 5 reused; 2 generated"
    assert out["body"] == {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
                           "stream": True, "stream_options": {"include_usage": True}, "model": "m", "temperature": 0}
    assert out["keyless"] == {"Content-Type": "application/json"}
    assert out["keyed"] == {"Content-Type": "application/json", "Authorization": "Bearer sekrit"}
    assert out["notFound"] == "no such route" and out["plain"] == "HTTP 502: Bad Gateway"
    assert out["fences"] == [{"code": False, "text": "See:"}, {"code": True, "text": "x = 1"},
                             {"code": False, "text": "end"}]
    assert out["open"] == [{"code": True, "text": "half"}]


CONVERSATION = r"""
  const settings = {model: "tiny-jamba", system: "You are terse.", temperature: "0", maxTokens: "12", apiKey: KEY};
  async function turn(conversation) {  // the page's path, then the same messages without streaming
    const reply = newReply();
    let updates = 0;
    await readReply(await fetch(BASE + CHAT_PATH, chatRequest(settings, conversation)), reply, () => updates++);
    const plain = JSON.parse(chatRequest(settings, conversation).body);
    plain.stream = false;
    delete plain.stream_options;
    const init = chatRequest(settings, conversation);
    const whole = await (await fetch(BASE + CHAT_PATH, {...init, body: JSON.stringify(plain)})).json();
    return {reply, updates, message: whole.choices[0].message};
  }
  const conversation = [{role: "user", content: "hello world"}];
  const first = await turn(conversation);
  conversation.push({role: "assistant", content: first.reply.content}, {role: "user", content: "and Paris?"});
  const second = await turn(conversation);
  const models = await fetch(BASE + MODELS_PATH, {headers: authHeaders(KEY)});
  const denied = await fetch(BASE + CHAT_PATH, chatRequest({maxTokens: "2"}, conversation));
  const refused = newReply();
  await readReply(denied, refused);
  console.log(JSON.stringify({first, second, model: (await models.json()).data[0].id, refused: refused.error,
                              deniedStatus: denied.status}));
"""


@needs_node
@pytest.mark.parametrize("key", [None, "sekrit"])
def test_the_page_streams_a_conversation_from_a_live_server(tmp_path, key):
    """Two turns through the page's functions and node's fetch: the streamed text equals the non-streamed greedy
    reply, usage arrives, and the second turn reuses the first's state. With a key the page's Bearer header gets
    through and a request without it reads as the server's 401 message; without one it needs none."""
    with tiny_server(tmp_path / "tiny-jamba", api_key=key) as (url, _, _):
        prelude = f"const BASE = {json.dumps(url + '/')}; const KEY = {json.dumps(key or '')};"
        out = run_node(tmp_path, prelude + CONVERSATION)
    assert out["model"] == "tiny-jamba"
    for turn in (out["first"], out["second"]):
        reply, message = turn["reply"], turn["message"]
        assert reply["error"] is None and reply["done"] and reply["finishReason"] in ("stop", "length")
        assert reply["content"] == message["content"] and reply["reasoning"] == message.get("reasoning_content", "")
        assert turn["updates"] >= 1 and reply["usage"]["completion_tokens"] >= 1
    usage = out["second"]["reply"]["usage"]
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    if key:
        assert out["deniedStatus"] == 401 and "API key" in out["refused"]
    else:
        assert out["deniedStatus"] == 200 and out["refused"] is None
