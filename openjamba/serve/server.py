"""`openjamba serve` and the loading both front ends share: model, tokenizer and engine from a checkpoint."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import socket
import threading
from pathlib import Path

import torch

from ..argtypes import add_model_arguments, at_least, json_object, memory_size, non_negative_float, resolve_model_flag
from ..info import human_bytes

API_KEY_ENV = "OPENJAMBA_API_KEY"


def add_engine_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    """Flags shared by `serve` and `chat`: the checkpoint, where it runs, and the engine's bounds."""
    add_model_arguments(parser, "checkpoint directory (config.json, safetensors, tokenizer files)", model_required)
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"],
                        help="quantize the weights as they load (weight-only int8 per channel, int4 in groups)")
    parser.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--prefill-chunk", type=at_least(1), default=None,
                        help="prompt tokens per prefill step, interleaved with decode steps (default 512, or "
                        "--max-num-batched-tokens where serve has it)")
    parser.add_argument("--no-reuse", action="store_true",
                        help="do not keep conversation state between requests (every prompt is read in full)")
    parser.add_argument("--state-store", type=non_negative_float, default=1024, metavar="MB",
                        help="bytes of stored sequence states for reuse, in MB (default 1024)")
    parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                        help="also keep finished outputs' states (of at least 256 tokens) in DIR, so that after a "
                        "restart a conversation's next turn resumes instead of re-reading its history (default off)")
    parser.add_argument("--state-dir-size", type=non_negative_float, default=10, metavar="GB",
                        help="bytes of state files in --state-dir, in GB; the least recently used are deleted "
                        "beyond it (default 10)")
    parser.add_argument("--max-context", "--max-model-len", type=at_least(1), default=None,
                        help="longest prompt plus output in tokens (default: the config's max_position_embeddings); "
                        "--max-model-len is vLLM's name")
    parser.add_argument("--chat-template", default=None, metavar="FILE|NAME|TEMPLATE",
                        help="the chat template to use instead of the checkpoint's: a Jinja file, the name of one of "
                        "the checkpoint's templates (tool_use), or the template itself; gives a base model such as "
                        "Jamba-v0.1 a chat format (default: the checkpoint's)")
    parser.add_argument("--default-chat-template-kwargs", type=json_object, default=None, metavar="JSON",
                        help="variables every chat rendering gets unless a request's chat_template_kwargs sets them, "
                        "as vLLM's flag, e.g. '{\"enable_thinking\": false}'")
    parser.add_argument("--generation-config", default="auto", choices=["auto", "none"],
                        help="auto (default): sampling settings a request leaves out come from the checkpoint's "
                        "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty), as vLLM "
                        "does; none: built-in defaults")


def add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `serve` and `run-batch`: the model's name in requests and replies, and the batch's bounds."""
    parser.add_argument("--served-model-name", default=None, help="the model id clients use (default: the "
                        "repo id --model names, else the checkpoint directory's name)")
    parser.add_argument("--max-running", "--max-num-seqs", type=at_least(1), default=32,
                        help="sequences decoded together (default 32); --max-num-seqs is vLLM's name")
    parser.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", type=kv_cache_memory, default="auto",
                        metavar="SIZE|auto|none",
                        help="bound on the attention K/V of the requests in flight, e.g. 20GB or 16GiB (a bare "
                        "number is bytes): requests "
                        "wait for room, rows that outgrow it are preempted and resumed from their exact state, and "
                        "one that could never fit is refused with a 400. auto (default): on CUDA 80%% of the memory "
                        "free after loading less --state-store, none on CPU; none: unbounded. "
                        "--kv-cache-memory-bytes is vLLM's name")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .vllm_flags import add_model_tag, add_vllm_arguments

    add_model_tag(parser)
    add_engine_arguments(parser, model_required=False)  # or vLLM's positional MODEL
    add_batching_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=8000,
                        help="default 8000; 0: any free port (the start line names it)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require `Authorization: Bearer KEY` (or `x-api-key: KEY`) on /v1/ routes (default: "
                        f"${API_KEY_ENV}, which keeps the key out of the process list)")
    parser.add_argument("--allowed-origins", type=origin_list, default=[], help="comma-separated origins whose "
                        "web pages may call the API from a browser (CORS), e.g. http://localhost:3000 or * (default: "
                        "none)")
    parser.add_argument("--no-web-ui", "--no-webui", dest="web_ui", action="store_false",
                        help="do not serve the built-in chat page at / (llama-server's --no-webui)")
    parser.add_argument("--max-waiting", type=at_least(1), default=256,
                        help="requests queued beyond --max-running; more get 429 with Retry-After (default 256)")
    parser.add_argument("--max-stored-responses", type=at_least(0), default=1000,
                        help="/v1/responses kept in memory for previous_response_id and GET, the least recently "
                        "used dropped beyond this (default 1000; 0 stores none)")
    parser.add_argument("--shutdown-timeout", type=non_negative_float, default=5.0, metavar="SECONDS",
                        help="after SIGINT or SIGTERM, how long requests in flight may still run; then they end with "
                        "finish_reason \"abort\", their streams closed in order (default 5)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="the server's log level (default info)")
    parser.add_argument("--log-stats-interval", type=non_negative_float, default=10.0, metavar="SECONDS",
                        help="log the engine's throughput, queue and memory this often while it works (default 10; "
                        "0: never)")
    parser.add_argument("--disable-log-stats", dest="log_stats_interval", action="store_const", const=0.0,
                        help="--log-stats-interval 0, by vLLM's name")
    add_vllm_arguments(parser)


def port_number(text: str) -> int:
    """--port: a TCP port, or 0 for one the system picks (the start line names it)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free one), got {value}")
    return value


def origin_list(text: str) -> list[str]:
    """--allowed-origins: comma-separated origins as a browser sends them (`Origin: http://localhost:3000`, no
    path, no trailing slash), or *; anything else would never match, leaving the page's calls refused unexplained."""
    origins = [o.strip() for o in text.split(",") if o.strip()]
    for origin in origins:
        scheme, _, rest = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not rest or "/" in rest):
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin: scheme://host[:port] as the browser "
                                             "sends it, e.g. http://localhost:3000 (no path or trailing slash), or *")
    return origins


def kv_cache_memory(text: str) -> int | str | None:
    """--kv-cache-memory: bytes, "auto" or "none" (None)."""
    lowered = text.strip().lower()
    if lowered in ("auto", "none"):
        return lowered if lowered == "auto" else None
    return memory_size(text)


def load(args: argparse.Namespace, require_chat: bool = False, **engine_kwargs):
    """(model, tokenizer, engine not yet started) from parsed `add_engine_arguments` flags. `require_chat`: a
    checkpoint without a chat template is refused before its weights load."""
    from ..chat_format import ChatTemplateError, load_chat_template
    from ..model import JambaForCausalLM
    from ..runtime import default_device, on_fresh_thread, resolve_dtype
    from ..tokenizer import load_tokenizer
    from .engine import Engine
    from .protocol import check_template_variables
    from .vllm_flags import check_chat_format

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(1)  # this thread computes nothing heavy: the engine's thread holds the one OpenMP pool
    device = args.device or default_device()
    resolve_model_flag(args)  # a no-op when the command line did it
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"no config.json in {args.model}: --model takes a checkpoint directory")
    try:
        tokenizer = load_tokenizer(args.model)
    except FileNotFoundError as err:
        raise SystemExit(f"cannot load the tokenizer of {args.model}: {err}") from None
    if args.chat_template is not None:
        try:  # it replaces all of the checkpoint's templates, so tool requests use it too
            tokenizer.chat_templates = {"default": load_chat_template(args.chat_template, tokenizer.chat_templates)}
        except (ChatTemplateError, OSError) as err:
            raise SystemExit(f"--chat-template: {err}") from None
    try:
        check_template_variables(args.default_chat_template_kwargs)
    except ValueError as err:
        raise SystemExit(f"--default-chat-template-kwargs: {err}") from None
    args.chat_format_note = check_chat_format(args, tokenizer)  # vLLM's parser flags, before the weights load
    if require_chat and not tokenizer.chat_template:
        raise SystemExit(f"{getattr(args, 'model_id', args.model)} has no chat template (chat_template in "
                         "tokenizer_config.json or chat_template.jinja): give one with --chat-template, or use "
                         "`openjamba generate` for plain text")
    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    model = on_fresh_thread(lambda: JambaForCausalLM.from_pretrained(
        args.model, dtype=dtype, device=device, quantize=getattr(args, "quantize", None), progress=True), threads)
    model.eval()
    max_context = args.max_context or model.config.max_position_embeddings
    eos = list(getattr(tokenizer, "eos_token_ids", None) or model.config.eos_token_ids)
    if engine_kwargs.get("kv_cache_bytes") == "auto":
        from .kv_budget import AUTO_FRACTION, default_kv_cache_bytes

        fraction = getattr(args, "gpu_memory_utilization", None) or AUTO_FRACTION
        engine_kwargs["kv_cache_bytes"] = default_kv_cache_bytes(device, int(args.state_store * 2**20), fraction)
    step_tokens = getattr(args, "max_num_batched_tokens", None)  # vLLM's per-step token budget
    engine = Engine(model, prefill_chunk=args.prefill_chunk or step_tokens or 512, step_token_budget=step_tokens,
                    reuse=not args.no_reuse, store_bytes=int(args.state_store * 2**20), max_context=max_context,
                    eos_token_ids=eos, threads=threads, **engine_kwargs)
    if args.state_dir is not None and not args.no_reuse:
        from .state_disk import DiskTier, tokenizer_identity

        engine.store.attach(DiskTier(args.state_dir, int(args.state_dir_size * 2**30), model,
                                     fingerprint_extra=tokenizer_identity(args.model)))
    # Everything loaded so far lives as long as the process: out of the collector's sight, a full collection (which
    # holds the GIL, so the engine's thread waits through it) scans only what comes later, not the hundreds of
    # thousands of objects of torch, FastAPI and the model (docs/serving-notebook.md has the measured cost).
    gc.collect()
    gc.freeze()
    return model, tokenizer, engine


def sampling_defaults(args: argparse.Namespace, vocab_size: int) -> dict[str, float]:
    """The checkpoint's recommended sampling settings (`--generation-config auto`), checked; {} for none."""
    from .sampling import SamplingParams, generation_config_defaults

    if args.generation_config == "none":
        return {}
    try:
        defaults = generation_config_defaults(args.model)
        SamplingParams(**defaults).check(vocab_size)
    except ValueError as err:
        raise SystemExit(f"{args.model / 'generation_config.json'}: {err} (--generation-config none ignores "
                         "the file)") from None
    return defaults


def served_model_name(args: argparse.Namespace) -> str:
    """`--served-model-name`, else the Hub repo id `--model` gave (vLLM's convention), else the directory's name."""
    given = getattr(args, "model_id", None)
    if args.served_model_name:
        return args.served_model_name
    if given is not None and not Path(given).expanduser().exists():  # resolved from the Hub, not a directory
        return given
    return Path(args.model).resolve().name


DELIVERY_S = 2.0  # after the engine aborts what is left, the time its responses get to reach their clients


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads (as uvicorn would bind it, not yet listening), so that a
    port in use or a wrong --host is one line at once rather than a uvicorn error after minutes of loading."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {err.strerror or err} (--host, --port)") from None
    return sock


def run_until_stopped(app, engine, shutdown_timeout: float, sockets: list[socket.socket] | None = None,
                      **uvicorn_options) -> None:
    """Serve `app` with uvicorn until SIGINT or SIGTERM (a second SIGINT: at once). New connections are refused
    from the signal on; requests in flight get `shutdown_timeout` seconds to finish, then the engine aborts the rest
    (`Engine.abort_all`), so each streamed response still ends in order (finish_reason "abort", then `[DONE]`) and a
    waiting one gets its partial reply, instead of uvicorn dropping their connections. `sockets`: already bound
    (`bind_listener`), else uvicorn binds host and port."""
    import uvicorn

    timers: list[threading.Timer] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not timers:
                timers.append(threading.Timer(shutdown_timeout, engine.abort_all))
                timers[0].daemon = True
                timers[0].start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout + DELIVERY_S, **uvicorn_options))
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # the signal, raised again by uvicorn once it has shut down (as uvicorn.run ignores it)
        pass
    finally:
        for timer in timers:
            timer.cancel()
    if not server.started:  # uvicorn has logged why (e.g. the port is in use)
        raise SystemExit(3)


def check_kv_bound(budget, max_context: int) -> None:
    """Refuse a --kv-cache-memory bound that holds no request (a size given without its unit is bytes, as vLLM's
    --kv-cache-memory-bytes); warn when it holds less than the context, as longer requests are then refused."""
    if budget is None:
        return
    if budget.most_to_generate(1) < 1:  # not even a one-token prompt and one generated token fit
        raise SystemExit(f"--kv-cache-memory {budget.max_bytes:,} bytes hold {budget.tokens} tokens of attention K/V "
                         f"({budget.bytes_per_token:,} bytes a token), too few for any "
                         "request: give a size with its unit, e.g. 20GB")
    if budget.tokens < max_context:
        logging.getLogger("openjamba.serve").warning(
            "--kv-cache-memory %s holds %s tokens of K/V, less than the context (%s): a request whose prompt and "
            "max_tokens need more is refused with a 400", human_bytes(budget.max_bytes), f"{budget.tokens:,}",
            f"{max_context:,}")


def server_app(args: argparse.Namespace, model, tokenizer, engine, **config):
    """(the FastAPI app `serve` runs, its ServerConfig, the ChatFormat or None) over a loaded engine: the served
    model name, the context, the checkpoint's sampling defaults from the flags; `config`: more ServerConfig fields.
    `run-batch` drives the same app in process."""
    from .api import ServerConfig, create_app
    from .templating import ChatFormat

    chat = ChatFormat.of(tokenizer, args.default_chat_template_kwargs)
    server_config = ServerConfig(model_name=served_model_name(args),
                                 max_context=args.max_context or model.config.max_position_embeddings,
                                 vocab_size=model.config.vocab_size,
                                 sampling_defaults=sampling_defaults(args, model.config.vocab_size), **config)
    return create_app(engine, tokenizer, server_config, chat), server_config, chat


def serve(args: argparse.Namespace) -> None:
    from .metrics import StatsLogger
    from .vllm_flags import check_before_loading, log_notes

    check_before_loading(args)
    listener = bind_listener(args.host, args.port)
    args.port = listener.getsockname()[1]  # the one the system picked for --port 0
    try:
        model, tokenizer, engine = load(args, max_running=args.max_running, max_waiting=args.max_waiting,
                                        kv_cache_bytes=args.kv_cache_memory, seed=args.seed)
    except BaseException:
        listener.close()
        raise
    app, config, chat = server_app(args, model, tokenizer, engine, api_key=args.api_key,
                                   allowed_origins=args.allowed_origins,
                                   max_stored_responses=args.max_stored_responses, web_ui=args.web_ui)
    name, max_context, defaults = config.model_name, config.max_context, config.sampling_defaults
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    check_kv_bound(engine.kv_budget, max_context)
    log_notes(args, engine)
    if defaults:
        logging.info("sampling defaults from generation_config.json (a request's own values win): %s",
                     ", ".join(f"{k}={v}" for k, v in defaults.items()))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.warning("listening on %s without an API key: anyone who can reach this port can use the model "
                        "(--api-key or $%s sets one)", args.host, API_KEY_ENV)
    if chat is None:
        logging.warning("%s has no chat template: /v1/chat/completions, /v1/responses, /v1/messages and the chat "
                        "page answer 400 (--chat-template gives one); /v1/completions works",
                        getattr(args, "model_id", args.model))  # the repo id, not its cache snapshot's path
    engine.start()
    stats = StatsLogger(engine.stats, args.log_stats_interval).start() if args.log_stats_interval > 0 else None
    try:
        budget = engine.kv_budget
        bound = "unbounded" if budget is None else f"{human_bytes(budget.max_bytes)} = {budget.tokens:,} tokens"
        print(f"openjamba serve: {name} on http://{args.host}:{args.port}/v1 (max {args.max_running} running, "
              f"{args.max_waiting} waiting; K/V {bound}; state reuse {'off' if args.no_reuse else 'on'})"
              + (f"; chat page http://{args.host}:{args.port}/" if args.web_ui else ""), flush=True)
        run_until_stopped(app, engine, args.shutdown_timeout, [listener],
                          host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if stats is not None:
            stats.stop()
        engine.stop()
