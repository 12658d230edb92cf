"""`openjamba` command line: one thin verb per workflow over the library modules."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from .config import PRESETS, JambaConfig, get_preset
from .info import format_report, model_report


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are hundreds of times slower on most CPUs)."""
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise SystemExit(f"unknown --dtype {name!r}; choose from {', '.join(table)}")
    return table[name]


# ---------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> None:
    if args.model:
        config, name = JambaConfig.from_pretrained(args.model), str(args.model)
    else:
        config, name = get_preset(args.preset), args.preset
    report = model_report(config, name, args.context, args.batch, args.dtype)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))


# ---------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import TextStreamer
    from .model import JambaForCausalLM
    from .tokenizer import load_tokenizer

    device = args.device or default_device()
    model = JambaForCausalLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype, device), device=device)
    tokenizer = load_tokenizer(args.model)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        if model.config.bos_token_id is None:
            raise SystemExit("the prompt encodes to no tokens and the config has no bos_token_id")
        ids = [model.config.bos_token_id]
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    sys.stdout.write(args.prompt)
    model.generate(
        torch.tensor([ids]),
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
        streamer=TextStreamer(tokenizer),
    )


# ---------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> None:
    from .eval.perplexity import evaluate_texts, read_texts
    from .model import JambaForCausalLM
    from .tokenizer import load_tokenizer

    if not args.paths and not args.tasks:
        raise SystemExit("openjamba eval: give text/JSONL files or directories to score, or --tasks")
    if args.tasks and importlib.util.find_spec("lm_eval") is None:
        raise SystemExit("openjamba eval --tasks needs lm-evaluation-harness: pip install 'openjamba[eval]'")
    device = args.device or default_device()
    model = JambaForCausalLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype, device), device=device)
    model.eval()
    tokenizer = load_tokenizer(args.model)
    report: dict = {"model": str(args.model)}
    if args.paths:
        result = evaluate_texts(model, tokenizer, read_texts(args.paths, args.text_field), args.context_length,
                                args.stride, args.batch_size)
        report["perplexity"] = result.to_dict()
        if not args.json:
            print(result.summary())
    if args.tasks:
        results = _run_lm_eval(model, tokenizer, args)
        report["tasks"] = results["results"]
        if not args.json:
            from lm_eval.utils import make_table

            print(make_table(results))
    if args.json:
        print(json.dumps(report, default=str))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n")


def _run_lm_eval(model, tokenizer, args: argparse.Namespace) -> dict:
    """lm-evaluation-harness tasks on the loaded model, through `simple_evaluate`; prints lm_eval's table."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .eval.harness import OpenJambaLM

    lm = OpenJambaLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.context_length)
    return lm_eval.simple_evaluate(
        model=lm, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot, limit=args.limit,
        task_manager=TaskManager(include_path=args.include_path) if args.include_path else None, log_samples=False)


# ---------------------------------------------------------------------- quickstart (the README's main job)
def cmd_quickstart(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .model import JambaForCausalLM

    print("== openjamba info --preset jamba-v0.1 --context 262144 (the paper's memory table)")
    print(format_report(model_report(get_preset("jamba-v0.1"), "jamba-v0.1", 262144)))
    out = Path(args.out)
    print(f"\n== a tiny random Jamba checkpoint with a byte-level BPE tokenizer -> {out}")
    corpus = [p.read_text() for p in sorted(Path(__file__).parent.rglob("*.py"))]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    torch.manual_seed(0)
    model = JambaForCausalLM(get_preset("tiny", vocab_size=tokenizer.get_vocab_size()))
    model.save_pretrained(out, tokenizer=tokenizer)
    print(f"saved {model.num_parameters() / 1e6:.2f}M parameters ({model.num_parameters(active=True) / 1e6:.2f}M "
          f"active) to {out}")
    print(f"\n== openjamba generate --model {out} --prompt 'def main(' (untrained weights: expect noise)")
    cmd_generate(argparse.Namespace(model=out, prompt="def main(", max_new_tokens=32, temperature=0.8, top_k=50,
                                    top_p=None, seed=0, device="cpu", dtype="fp32"))


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openjamba", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    info = verbs.add_parser("info", help="parameters, layer plan and inference memory of a preset or checkpoint")
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS))
    source.add_argument("--model", type=Path, help="checkpoint directory with config.json")
    info.add_argument("--context", type=int, default=262144, help="context length in tokens (default 262144)")
    info.add_argument("--batch", type=int, default=1)
    info.add_argument("--dtype", default="bf16", help="cache dtype: bf16 (default), fp16, fp32, int8")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    info.set_defaults(func=cmd_info)

    gen = verbs.add_parser("generate", help="stream text from a checkpoint directory with a tokenizer.json")
    gen.add_argument("--model", type=Path, required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    gen.add_argument("--dtype", default=None, help="default: bf16 on GPU, fp32 on CPU")
    gen.set_defaults(func=cmd_generate)

    ev = verbs.add_parser("eval", help="perplexity and bits per byte on texts; lm-evaluation-harness tasks")
    ev.add_argument("--model", type=Path, required=True, help="checkpoint directory with a tokenizer.json")
    ev.add_argument("paths", nargs="*", help="text files (one document each), .jsonl files (one per line) and "
                                             "directories of .txt/.text/.md/.jsonl files")
    ev.add_argument("--text-field", default="text", help="the JSONL field holding the text (default: text)")
    ev.add_argument("--context-length", type=int, default=2048, help="tokens per forward (default 2048)")
    ev.add_argument("--stride", type=int, default=None,
                    help="tokens a window advances; each is scored with >= context-length - stride tokens of "
                         "context (default: half the context length)")
    ev.add_argument("--batch-size", type=int, default=4, help="windows (or requests) per forward (default 4)")
    ev.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (needs openjamba[eval])")
    ev.add_argument("--num-fewshot", type=int, default=None)
    ev.add_argument("--limit", type=float, default=None, help="lm-eval: at most this many examples per task")
    ev.add_argument("--include-path", default=None, help="lm-eval: a directory of extra task YAML files")
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--dtype", default=None, help="default: bf16 on GPU, fp32 on CPU")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of the human lines")
    ev.add_argument("--output", default=None, help="also write the JSON report to this file")
    ev.set_defaults(func=cmd_eval)

    quick = verbs.add_parser("quickstart", help="the README's main job: memory table, tiny checkpoint, generation")
    quick.add_argument("--out", default="runs/quickstart/model")
    quick.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
