"""A tiny checkpoint with a tokenizer and a ChatML chat template written here, and a live server in a thread."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import torch
from tokenizers import AddedToken

from openjamba import JambaConfig, JambaForCausalLM

from .conftest import byte_level_tokenizer

# ChatML as Jamba2 and Jamba Reasoning 3B write it: tools in the system turn, Hermes <tool_call> output, <think>.
CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools, one <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call> each, after thinking in <think></think>:\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
CORPUS = [
    "hello world, this is a small test of the server and the chat.",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "user assistant system tool weather city temperature think answer question",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
] * 20


def build_checkpoint(directory: Path, chat_template: bool | str = True, seed: int = 0,
                     added_tokens: Sequence[str] = ()) -> Path:
    """A random 4-layer Jamba (attention, Mamba, MoE) with a byte-level BPE tokenizer (ChatML's <|im_start|> and
    <|im_end|> added, <|im_end|> the EOS, then `added_tokens` as ordinary added tokens) and, unless told not to, a
    ChatML chat template (or the template given), saved as a checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    backend = byte_level_tokenizer(CORPUS, vocab_size=400).backend  # <pad>=0, <bos>=1, <eos>=2
    backend.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    backend.add_tokens([AddedToken(t, special=False) for t in added_tokens])
    backend.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<bos>", "eos_token": "<|im_end|>", "pad_token": "<pad>"}
    if chat_template:
        tokenizer_config["chat_template"] = chat_template if isinstance(chat_template, str) else CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = JambaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4,
        attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=backend.token_to_id("<|im_end|>"), max_position_embeddings=1024,
    )
    torch.manual_seed(seed)
    JambaForCausalLM(config).save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app):
    """Serve `app` with uvicorn on 127.0.0.1 and a free port in a thread; yields the base URL; stops it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def tiny_server(directory: Path, chat_template: bool | str = True, added_tokens: Sequence[str] = (), **config):
    """A tiny checkpoint in `directory` served live on one thread: yields (url, tokenizer, the server's ChatFormat);
    stops engine and server after. `chat_template`, `added_tokens`: as build_checkpoint's; `config`: more
    ServerConfig fields."""
    from openjamba.serve.api import ServerConfig, create_app
    from openjamba.serve.engine import Engine
    from openjamba.serve.templating import ChatFormat
    from openjamba.tokenizer import load_tokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    checkpoint = build_checkpoint(directory, chat_template=chat_template, added_tokens=added_tokens)
    model = JambaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(checkpoint)
    engine = Engine(model, max_context=1024, eos_token_ids=tokenizer.eos_token_ids)
    engine.start()
    server_config = ServerConfig(model_name=directory.name, max_context=1024, vocab_size=model.config.vocab_size,
                                 **config)
    chat = ChatFormat.of(tokenizer)
    try:
        with running_server(create_app(engine, tokenizer, server_config, chat)) as url:
            yield url, tokenizer, chat
    finally:
        engine.stop()
        torch.set_num_threads(before)


def wait_for(condition, timeout: float = 20.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def serve_process(checkpoint: Path, *argv: str) -> tuple[subprocess.Popen, int]:
    """`openjamba serve` as a user runs it: a subprocess on 127.0.0.1 and a free port, one thread, stdout and stderr
    together as text; (process, port) once /health answers or the process has ended. The caller stops it."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "openjamba", "serve", "--model", str(checkpoint), "--port",
                             str(port), "--threads", "1", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: healthy(port) or proc.poll() is not None, timeout=60)
    return proc, port
