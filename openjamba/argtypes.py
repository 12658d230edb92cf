"""Argument types and the parser class shared by the command line's verbs: a bad value is one line naming the flag
and what it takes (argparse's own message), never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import sys

from . import runtime


class Parser(argparse.ArgumentParser):
    """A bad argument is one line naming it, not the whole usage text (which --help prints)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a flag the chosen verb does not take is reported by that verb, as its other errors
        are (argparse reports it from the top-level parser, pointing at the wrong --help)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            prog = f"{self.prog} {parsed.verb}" if getattr(parsed, "verb", None) else self.prog
            self.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extras)} (see {prog} --help)\n")
        return parsed


def usage_error(prog: str, message: str) -> SystemExit:
    """A bad use of a verb's flags that only the verb can see (flags that need one another, a list with an unknown
    item), reported as argparse reports a bad flag: its one line on stderr, then exit status 2 (raise what this
    returns)."""
    sys.stderr.write(f"{prog}: error: {message} (see {prog} --help)\n")
    return SystemExit(2)


def at_least(minimum: int):
    """An integer flag that must be >= `minimum` (argparse reports a bad value as its one-line usage error)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def device_name(text: str) -> str:
    try:
        return runtime.parse_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def count_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(parse_count(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_count(text: str) -> int:
    """'8192', '8K' (= 8192) or '256k' (= 262144)."""
    text = text.strip()
    return int(text[:-1]) * 1024 if text[-1:] in "kK" and text[:-1] else int(text)


def memory_size(text: str) -> int:
    """A size in bytes: '24GB' (10^9), '24GiB' (2^30), '512MB', '1e9'."""
    from .info import parse_bytes

    try:
        value = parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return value


def json_object(text: str) -> dict:
    """A flag whose value is a JSON object, e.g. '{"enable_thinking": false}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg} at character {err.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, help: str, required: bool = True, group=None) -> None:
    """`--model` (a checkpoint directory or a Hugging Face Hub repo id) and `--revision`; `group` takes `--model`
    where it is one of mutually exclusive sources."""
    (group or parser).add_argument("--model", required=required and group is None, metavar="DIR|REPO_ID",
                                   help=f"{help}; or a Hugging Face Hub repo id such as "
                                   "ai21labs/AI21-Jamba-Reasoning-3B, fetched into the Hugging Face cache (HF_HOME)")
    parser.add_argument("--revision", default=None, help="with a repo id: the branch, tag or commit to fetch "
                        "(default main)")


def resolve_model_flag(args: argparse.Namespace) -> None:
    """Turn `--model` into the checkpoint directory (`hf.resolve_checkpoint`: fetched when it is a Hub repo id) once
    per command, keeping what was typed in `args.model_id`; a no-op for a verb without `--model`, with `--url`
    (bench-serve names a server's model) or when already done. A verb that sets `config_only` (info) fetches
    only config.json; one that sets `resolve_later` (run-batch: its input is checked first) calls this itself after
    clearing it."""
    if getattr(args, "model", None) is None or getattr(args, "url", None) or hasattr(args, "model_id") \
            or getattr(args, "resolve_later", False):
        return
    from .hf import resolve_checkpoint

    args.model_id = str(args.model)
    args.model = resolve_checkpoint(args.model, getattr(args, "revision", None),
                                    weights=not getattr(args, "config_only", False))
