"""`openjamba serve` under a `vllm serve` command line: vLLM's common flags, each with the meaning it has here.

Command lines are copied from model cards and vLLM's docs. A flag whose vLLM meaning openjamba has (or always has)
is accepted and does that; one that would ask for something openjamba does not do is refused with one line naming
what it does instead, never accepted and ignored. What each flag means here is in its help text and README's "From
vLLM" note.
"""

from __future__ import annotations

import argparse
import logging

from ..argtypes import at_least, probability, usage_error

# vLLM's parser names for the formats openjamba reads from a checkpoint's chat template (chat_format.output_format).
TOOL_PARSERS = ("hermes", "jamba")
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # output reasoning in <think></think>, as Jamba Reasoning 3B and Jamba2


def tool_call_parser(text: str) -> str:
    if text not in TOOL_PARSERS:
        raise argparse.ArgumentTypeError(f"openjamba reads tool calls in the hermes (<tool_call>) and jamba "
                                         f"(<tool_calls>) formats only, got {text!r}")
    return text


def reasoning_parser(text: str) -> str:
    if text not in REASONING_PARSERS:
        raise argparse.ArgumentTypeError(f"openjamba reads reasoning in <think></think> tags only "
                                         f"({', '.join(REASONING_PARSERS)}), got {text!r}")
    return text


def mamba_ssm_cache_dtype(text: str) -> str:
    if text not in ("float32", "auto"):
        raise argparse.ArgumentTypeError(f"openjamba's Mamba state is always float32 (float32 or auto), got {text!r}")
    return text


def tensor_parallel_size(text: str) -> int:
    value = int(text)
    if value != 1:
        raise argparse.ArgumentTypeError(f"openjamba runs on one device (1), got {value}")
    return value


def quantization(text: str) -> str:
    raise argparse.ArgumentTypeError(f"openjamba does not load vLLM's {text!r} quantization: --quantize int8 "
                                     "quantizes the weights as they load (every large projection, experts included; "
                                     "--quantize int4 in groups)")


class _ModelTag(argparse.Action):
    """`vllm serve MODEL`'s positional MODEL, stored as --model; both, naming different checkpoints, is an error."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:  # argparse calls an absent optional positional's action with its default
            return
        if getattr(namespace, "model", None) is None:
            namespace.model = values
        namespace.model_tag = values  # check_before_loading compares it with a --model given before or after


def add_model_tag(parser: argparse.ArgumentParser) -> None:
    """`serve`'s optional positional MODEL, vLLM's way to name the checkpoint (run-batch, as vLLM's, has --model)."""
    parser.add_argument("model_tag", nargs="?", action=_ModelTag, metavar="MODEL",
                        help="the checkpoint, as `vllm serve MODEL` names it: the same as --model")


def add_vllm_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags that `serve` takes besides those it shares names with (--max-model-len, --max-num-seqs,
    --kv-cache-memory-bytes, --served-model-name...), in their own group of --help."""
    group = parser.add_argument_group("vLLM compatibility", "vLLM's flags, so that a `vllm serve` command line runs "
                                      "with `openjamba serve` in its place; a value openjamba cannot honour is "
                                      "refused rather than ignored")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted: tool_choice \"auto\" always works when the chat template has a tool-call "
                       "format (refused if it has none)")
    group.add_argument("--tool-call-parser", type=tool_call_parser, default=None, metavar="{hermes,jamba}",
                       help="accepted when it names the tool-call format of the chat template, which openjamba "
                       "reads from the template itself; refused otherwise")
    group.add_argument("--reasoning-parser", type=reasoning_parser, default=None,
                       metavar="{" + ",".join(REASONING_PARSERS) + "}",
                       help="accepted when the chat template has <think> reasoning, which openjamba always "
                       "separates into reasoning_content; refused otherwise")
    group.add_argument("--mamba-ssm-cache-dtype", type=mamba_ssm_cache_dtype, default="auto",
                       metavar="{float32,auto}", help="accepted: openjamba's Mamba state is always float32")
    group.add_argument("--gpu-memory-utilization", type=probability, default=None, metavar="F",
                       help="the fraction (0 < F <= 1, default 0.8) of the CUDA memory free after loading that "
                       "--kv-cache-memory auto takes (less --state-store); not of the total, as vLLM's; no effect "
                       "on CPU")
    group.add_argument("--max-num-batched-tokens", type=at_least(1), default=None, metavar="N",
                       help="tokens one engine step processes, its decode rows included (prefill gets the rest), "
                       "at least --max-running; also the prefill chunk unless --prefill-chunk is given")
    group.add_argument("--enable-prefix-caching", action="store_true",
                       help="accepted: state reuse is on unless --no-reuse")
    group.add_argument("--no-enable-prefix-caching", dest="no_reuse", action="store_true",
                       help="--no-reuse, by vLLM's name")
    group.add_argument("--seed", type=int, default=None,
                       help="requests without a seed take theirs from a stream this seeds, so a fresh server given "
                       "the same requests in the same order samples the same tokens (default: random)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="accepted: openjamba never runs a checkpoint's code")
    group.add_argument("--tensor-parallel-size", "-tp", type=tensor_parallel_size, default=1, metavar="1",
                       help="accepted as 1: openjamba runs on one device")
    group.add_argument("--quantization", "-q", type=quantization, default=None, metavar="METHOD",
                       help="refused: --quantize int8 quantizes the weights as they load, experts included")


def _prog(args: argparse.Namespace) -> str:
    return f"openjamba {getattr(args, 'verb', None) or 'serve'}"


def check_before_loading(args: argparse.Namespace) -> None:
    """Combinations refused before anything loads (exit 2)."""
    if getattr(args, "model", "") is None:
        raise usage_error(_prog(args), "the following arguments are required: MODEL or --model")
    typed = getattr(args, "model_id", None) or getattr(args, "model", None)  # before resolve_model_flag fetched it
    if getattr(args, "model_tag", None) not in (None, str(typed)):
        raise usage_error(_prog(args), f"MODEL {args.model_tag!r} and --model {str(typed)!r} name different "
                          "checkpoints")
    if getattr(args, "gpu_memory_utilization", None) is not None and args.kv_cache_memory != "auto":
        raise usage_error(_prog(args), "--gpu-memory-utilization is the share --kv-cache-memory auto takes; "
                          "it has no effect with --kv-cache-memory SIZE or none")
    step, running = getattr(args, "max_num_batched_tokens", None), getattr(args, "max_running", None)
    if step is not None and running is not None and step < running:  # as vLLM's scheduler config refuses it
        raise usage_error(_prog(args), f"--max-num-batched-tokens ({step}) must be at least --max-running "
                          f"({running}): each running request's decode step takes one of its tokens")


def check_chat_format(args: argparse.Namespace, tokenizer) -> str | None:
    """Refuse (exit 2) a --tool-call-parser, --reasoning-parser or --enable-auto-tool-choice the checkpoint's chat
    template (after --chat-template) does not agree with; the line to log at start when one was given, else None."""
    from ..chat_format import output_format

    tool, reasoning = getattr(args, "tool_call_parser", None), getattr(args, "reasoning_parser", None)
    auto = getattr(args, "enable_auto_tool_choice", False)
    if not (tool or reasoning or auto):
        return None
    fmt = output_format(tokenizer) if getattr(tokenizer, "chat_template", None) else None
    tools = fmt.tool_calls if fmt else None
    if tool and tool != tools:
        found = f"the {tools} format" if tools else "no tool-call format"
        raise usage_error(_prog(args), f"--tool-call-parser {tool}: the chat template of this checkpoint "
                          f"writes {found}")
    if auto and not tools:
        raise usage_error(_prog(args), "--enable-auto-tool-choice: the chat template of this checkpoint has "
                          "no tool-call format")
    if reasoning and not (fmt and fmt.thinking):
        raise usage_error(_prog(args), f"--reasoning-parser {reasoning}: the chat template of this checkpoint "
                          "has no <think> reasoning")
    return (f"openjamba reads the tool-call format ({tools or 'none'}) and reasoning "
            f"({'<think>' if fmt and fmt.thinking else 'none'}) from the chat template; "
            "--tool-call-parser, --reasoning-parser and --enable-auto-tool-choice agree with it")


def log_notes(args: argparse.Namespace, engine) -> None:
    """What the accepted vLLM flags mean here, logged once at start."""
    log = logging.getLogger("openjamba.serve")
    if getattr(args, "chat_format_note", None):
        log.info(args.chat_format_note)
    device = next(engine.model.parameters()).device
    if getattr(args, "gpu_memory_utilization", None) is not None and device.type != "cuda":
        log.info("--gpu-memory-utilization has no effect on %s (no K/V bound unless --kv-cache-memory SIZE)",
                 device.type)
