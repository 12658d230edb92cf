"""`openjamba` command line: one thin verb per workflow over the library modules."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path

import torch

from . import argtypes, runtime
from .argtypes import (
    Parser,
    add_model_arguments,
    at_least,
    count_list,
    device_name,
    non_negative_float,
    parse_count,
    positive_float,
    probability,
)
from .config import PRESETS, JambaConfig, get_preset
from .files import write_atomic
from .info import DTYPE_BYTES, checkpoint_dtype_name, format_model_report, human_bytes, model_report
from .runtime import default_device
from .train.config import add_arguments as add_train_arguments


def resolve_dtype(name: str | None, device: str, flag: str = "--dtype") -> torch.dtype:
    """`runtime.resolve_dtype`, with an unknown name as the command's one-line error."""
    try:
        return runtime.resolve_dtype(name, device, flag)
    except ValueError as err:
        raise SystemExit(f"openjamba: error: {err}") from None


def model_config_from_args(args: argparse.Namespace) -> tuple[JambaConfig, str]:
    """The config named by `--model DIR|REPO_ID` or `--preset NAME`, and a name for reports."""
    if args.model:
        return JambaConfig.from_pretrained(args.model), getattr(args, "model_id", str(args.model))
    return get_preset(args.preset), args.preset


# ---------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> None:
    from .info import context_that_fits, format_fit, parse_bytes, weight_bytes

    config, name = model_config_from_args(args)
    if args.model and any(Path(args.model).glob("*.safetensors*")):  # a config.json alone still plans memory
        from .hf import check_checkpoint

        check_checkpoint(args.model)
    cache_dtype = args.cache_dtype or checkpoint_dtype_name(config)
    # A checkpoint's weights are counted as it stores them (its dtype, its quantization) unless the flags say else.
    stored = (config.extra.get("quantization_config") or {}) if args.model else {}
    args.quantize = args.quantize or stored.get("method")
    args.weight_dtype = args.weight_dtype or (checkpoint_dtype_name(config) if args.model else "bf16")
    report = model_report(config, name, args.context, args.batch, cache_dtype)
    try:
        report["weight_bytes"] = weight_bytes(config, args.quantize, args.weight_dtype, args.skip_mamba,
                                              stored.get("group_size"))
        report["weight_scheme"] = {"quantize": args.quantize, "weight_dtype": args.weight_dtype,
                                   "skip_mamba": args.skip_mamba}
        if args.device_memory:
            report["fit"] = context_that_fits(config, parse_bytes(args.device_memory), args.quantize,
                                              args.weight_dtype, cache_dtype, args.skip_mamba, args.reserve,
                                              args.batch)
    except ValueError as err:
        raise SystemExit(f"openjamba info: error: {err}") from None
    if args.json:
        print(json.dumps(report))
        return
    print(format_model_report(report))
    w = report["weight_bytes"]
    scheme = (args.quantize or args.weight_dtype) + (f" (Mamba in {args.weight_dtype})" if args.skip_mamba else "")
    print(f"\nweights ({scheme}): {human_bytes(w['total'])}")
    if args.device_memory:
        print(f"\nlargest context in {args.device_memory}:\n" + format_fit(report["fit"]))


def load_model(args: argparse.Namespace, device: str):
    """The checkpoint `--model` names, in `--dtype`, quantized as `--quantize` asks; load errors as one line."""
    from .hf import CheckpointError
    from .model import JambaForCausalLM

    try:
        return JambaForCausalLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype, device), device=device,
                                                quantize=getattr(args, "quantize", None), progress=True)
    except (CheckpointError, ValueError) as err:
        raise SystemExit(f"openjamba {args.verb}: error: {err}") from None


# ---------------------------------------------------------------------- quantize
def cmd_quantize(args: argparse.Namespace) -> None:
    from .hf import CheckpointError, load_pretrained

    out = Path(args.out)
    if out.resolve() == Path(args.model).resolve():
        raise SystemExit("openjamba quantize: error: --out must differ from --model")
    try:
        model = load_pretrained(args.model, dtype=torch.float32, quantize=args.quantize, group_size=args.group_size,
                                prepare_kernels=False, progress=True)
    except (CheckpointError, ValueError) as err:
        raise SystemExit(f"openjamba quantize: error: {err}") from None
    model.save_pretrained(out, max_shard_size=args.max_shard_size)
    copied = []
    for file in sorted(Path(args.model).iterdir()):  # tokenizer and chat-template files travel with the weights
        if file.is_file() and file.name != "config.json" and not file.name.startswith("model") \
                and file.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            shutil.copy2(file, out / file.name)
            copied.append(file.name)
    q = model.quantization
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{args.quantize}: {len(q['modules'])} weights quantized"
          + (f" (groups of {q['group_size']}; int8 fallback for {len(q['int8_fallback'])})"
             if args.quantize == "int4" else "")
          + f"; {human_bytes(size)} of safetensors -> {out}" + (f"; copied {', '.join(copied)}" if copied else ""))


# ---------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import TextStreamer
    from .ops import backend_for
    from .tokenizer import load_tokenizer

    device = args.device or default_device()
    kv_dtype = resolve_dtype(args.kv_dtype, device, "--kv-dtype") if args.kv_dtype else None
    tokenizer = load_tokenizer(args.model)  # before the weights: a missing tokenizer fails in a second, not minutes
    model = load_model(args, device)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        if model.config.bos_token_id is None:
            raise SystemExit("the prompt encodes to no tokens and the config has no bos_token_id")
        ids = [model.config.bos_token_id]
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    backend_for(torch.device(device))  # a first run's "compiling CPU kernels" line comes before the text, not inside it
    sys.stdout.write(args.prompt)
    model.generate(
        torch.tensor([ids]),
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        generator=generator,
        streamer=TextStreamer(tokenizer, skip_special_tokens=True),
        kv_dtype=kv_dtype,
    )


# ---------------------------------------------------------------------- prepare / train
def cmd_prepare(args: argparse.Namespace) -> None:
    from .train.data import DataError, prepare

    try:
        meta = prepare(args.paths, args.out, vocab_size=args.vocab_size, tokenizer_file=args.tokenizer,
                       val_fraction=args.val_fraction, text_key=args.text_key)
    except (DataError, FileNotFoundError) as err:
        raise SystemExit(f"openjamba prepare: error: {err}") from None
    print(describe_prepared(meta, args.out))


def describe_prepared(meta: dict, out: str | Path) -> str:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    return (f"{meta['files']} files, {meta['documents']} documents, {human_bytes(meta['bytes'])} of text; "
            f"{meta['skipped_summary']}\n"
            f"vocabulary {meta['vocab_size']} ({meta['dtype']}); train {train['tokens']:,} tokens in "
            f"{len(train['shards'])} shard(s), validation {val['tokens']:,} tokens -> {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from .train import DataError, NonFiniteLoss, TrainConfig, TrainingInterrupted
    from .train.config import config_from_args
    from .train.rundir import RunDirectoryBusy
    from .train.trainer import resume_config, train

    try:
        resume, base = None, None
        if args.resume is not None:
            target = args.resume if isinstance(args.resume, str) else getattr(args, "out", TrainConfig.out)
            resume, base = resume_config(target)
        result = train(config_from_args(args, base), resume, overwrite=args.overwrite)
    except TrainingInterrupted as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"openjamba train: {err}; continue with --resume", file=sys.stderr)
        raise SystemExit(128 + err.signum) from None
    except (NonFiniteLoss, DataError, ValueError, OSError, RunDirectoryBusy) as err:
        raise SystemExit(f"openjamba train: error: {err}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {result.checkpoint_dir}\nmetrics: {result.metrics_file}\nloss curve: {result.loss_png}\n"
              f"model: {result.model_dir}")


# ---------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> None:
    from .corpus import CorpusStats, read_corpus
    from .eval.perplexity import evaluate_texts
    from .tokenizer import load_tokenizer

    if not args.paths and not args.tasks:
        raise SystemExit("openjamba eval: error: give text/JSONL files or directories to score, or --tasks")
    if args.tasks and importlib.util.find_spec("lm_eval") is None:
        raise SystemExit("openjamba eval --tasks needs lm-evaluation-harness: pip install 'openjamba[eval]'")
    device = args.device or default_device()
    tokenizer = load_tokenizer(args.model)  # before the weights, as generate
    model = load_model(args, device)
    model.eval()
    report: dict = {"model": getattr(args, "model_id", str(args.model))}
    if args.paths:
        stats = CorpusStats()
        texts = list(read_corpus(args.paths, stats, args.text_field))
        result = evaluate_texts(model, tokenizer, texts, args.context_length, args.stride, args.batch_size)
        if result.tokens == 0:
            raise ValueError(f"nothing to score in {' '.join(args.paths)}: {stats.files} file(s) read as text, "
                             f"{stats.documents} non-empty document(s); {stats.skipped_summary()}")
        report["perplexity"] = {**result.to_dict(), "skipped": stats.skipped_counts(),
                                "skipped_summary": stats.skipped_summary()}  # as prepare's meta.json
        if not args.json:
            print(result.summary())
            if any(stats.skipped_counts().values()):
                print(stats.skipped_summary())
    if args.tasks:
        results = _run_lm_eval(model, tokenizer, args)
        report["tasks"] = results["results"]
        if not args.json:
            from lm_eval.utils import make_table

            print(make_table(results))
    if args.json:
        print(json.dumps(report, default=str, allow_nan=False))
    if args.output:
        write_atomic(Path(args.output), json.dumps(report, indent=2, default=str, allow_nan=False) + "\n")


def _run_lm_eval(model, tokenizer, args: argparse.Namespace) -> dict:
    """lm-evaluation-harness tasks on the loaded model, through `simple_evaluate`; prints lm_eval's table."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from .eval.harness import OpenJambaLM

    lm = OpenJambaLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.context_length)
    return lm_eval.simple_evaluate(
        model=lm, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot, limit=args.limit,
        task_manager=TaskManager(include_path=args.include_path) if args.include_path else None, log_samples=False)


# ---------------------------------------------------------------------- ablate
def cmd_ablate(args: argparse.Namespace) -> None:
    import dataclasses

    from .train.ablate import DEFAULT, SMOKE, run_ablation

    base = SMOKE if args.smoke else DEFAULT
    changes: dict = {k: getattr(args, k) for k in ("out", "seed", "threads", "lm_data") if getattr(args, k) is not None}
    if args.steps is not None:
        changes.update(mqar_steps=args.steps, lm_steps=args.steps)
    for name in ("variants", "tasks"):
        if getattr(args, name):
            changes[name] = tuple(item.strip() for item in getattr(args, name).split(",") if item.strip())
    try:
        run_ablation(dataclasses.replace(base, **changes))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"openjamba ablate: error: {err}") from None


# ---------------------------------------------------------------------- quickstart (the README's main job)
# The `quickstart` preset (Mamba, Mamba+MoE, attention, Mamba+MoE; 2.4M parameters) trained on the standard library:
# few enough steps for a CPU, enough to write recognisable Python. One thread: on a busy two-core machine two OpenMP
# threads can stall for seconds per step, while one thread keeps a steady pace.
QUICKSTART = dict(preset="quickstart", steps=300, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=30,
                  log_every=25, eval_every=100, eval_batches=4, save_every=100, seed=0, threads=1)
QUICKSTART_PROMPTS = ["import os\n", "def ", "class Parser:\n    def __init__(self", "    for line in "]


def cmd_quickstart(args: argparse.Namespace) -> None:
    from .generate import TextStreamer
    from .model import JambaForCausalLM
    from .tokenizer import load_tokenizer
    from .train import TrainConfig, prepare, train
    from .train.rundir import existing_outputs

    out = Path(args.out)
    data = out / "data"
    if existing_outputs(out) and not args.overwrite:  # checked before the minutes of preparing data
        raise SystemExit(f"openjamba quickstart: error: {out} already holds a run ({', '.join(existing_outputs(out))})"
                         f"; continue it with `openjamba train --out {out} --resume --steps N`, pass --overwrite "
                         "to train it again from scratch, or choose another --out")
    print(f"== 1/3 prepare: this interpreter's standard library (*.py) -> {data}", flush=True)
    if (data / "meta.json").is_file():
        meta = json.loads((data / "meta.json").read_text())
        print("already prepared; reusing it (delete the directory to prepare again)")
    else:
        meta = prepare(None, data, vocab_size=4096)
    print(describe_prepared(meta, data))

    print(f"\n== 2/3 train: preset quickstart, {args.steps} steps on {default_device()} -> {out}", flush=True)
    result = train(TrainConfig(data=str(data), out=str(out), **{**QUICKSTART, "steps": args.steps}),
                   overwrite=args.overwrite)

    print(f"\n== 3/3 samples from the exported model {result.model_dir} (temperature 0.7, top-k 40)", flush=True)
    model = JambaForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(result.model_dir)
    generator = torch.Generator().manual_seed(0)
    for prompt in QUICKSTART_PROMPTS:
        print(f"--- prompt {prompt!r}")
        sys.stdout.write(prompt)
        model.generate(torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=args.sample_tokens,
                       do_sample=True, temperature=0.7, top_k=40, generator=generator,
                       streamer=TextStreamer(tokenizer, skip_special_tokens=True))
    print(f"\nvalidation loss: {result.val_loss:.3f} nats/token" if result.val_loss is not None else "")
    print(f"loss curve: {result.loss_png}\nmetrics: {result.metrics_file}\nmodel: {result.model_dir}\n"
          f"next: openjamba generate --model {result.model_dir} --prompt 'def parse('\n"
          f"      openjamba train --out {out} --resume --steps {2 * args.steps}    # train on")


# ---------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import format_bench_report, plot_bench_report, run_bench

    config, name = model_config_from_args(args)
    if args.model:  # the cells load it in worker processes: a broken checkpoint is one error here, not N
        from .hf import check_checkpoint

        check_checkpoint(args.model)
    device = args.device or default_device()
    dtype = args.dtype or runtime.dtype_name(runtime.default_dtype(device))
    try:
        report = run_bench(
            config, name, args.model, contexts=args.contexts, batches=args.batch_sizes,
            phases=tuple(args.phases.split(",")), compare=tuple(args.compare), device=device, dtype=dtype,
            kv_dtype=args.kv_dtype, threads=args.threads, decode_tokens=args.decode_tokens,
            prefill_chunk=args.prefill_chunk, repeats=args.repeats, timeout_s=args.timeout, seed=args.seed,
            quantize=args.quantize,
        )
    except ValueError as err:
        raise SystemExit(f"openjamba bench: error: {err}") from None
    print(format_bench_report(report))
    if args.plot:
        print(f"plot: {plot_bench_report(report, args.plot)}")
    print(json.dumps(report))
    failed = [error for row in report["rows"] for error in row.get("errors", [])]
    if failed:
        raise SystemExit(f"openjamba bench: error: {len(failed)} cell(s) failed, e.g. {failed[0]}")


# ---------------------------------------------------------------------- bench-serve (serve, chat, run-batch: in serve/)
def cmd_bench_serve(args: argparse.Namespace) -> None:
    from .bench.serve import SERVE_PHASES, format_serve_report, plot_serve_report, run_serve_bench
    from .model import JambaForCausalLM
    from .runtime import on_fresh_thread

    phases = tuple(p.strip() for p in (args.phases or ",".join(SERVE_PHASES)).split(",") if p.strip())
    if unknown := set(phases) - set(SERVE_PHASES):
        raise argtypes.usage_error("openjamba bench-serve", f"--phases: unknown phase(s) {', '.join(sorted(unknown))}; "
                                   f"choose from {', '.join(SERVE_PHASES)}")
    if args.url:
        from .bench.http_serve import cmd_bench_serve_http

        return cmd_bench_serve_http(args)
    if not (args.preset or args.model):
        raise argtypes.usage_error("openjamba bench-serve", "one of --preset, --model or --url is required")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(1)  # as `serve`: the model is built on a thread that exits, the engines compute
    config, name = model_config_from_args(args)

    def build() -> JambaForCausalLM:
        if args.model:
            return JambaForCausalLM.from_pretrained(args.model, dtype=torch.float32, progress=True)
        torch.manual_seed(args.seed)
        return JambaForCausalLM(config)

    model = on_fresh_thread(build, threads)
    report = run_serve_bench(model, name, threads=threads, phases=phases, streams=args.streams,
                             prefix=args.prefix_tokens, suffix=args.suffix_tokens, output=args.output_tokens,
                             history=args.history, long_prompt=args.long_prompt, prefill_chunk=args.prefill_chunk,
                             seed=args.seed, temperature=args.temperature, top_p=args.top_p)
    print(format_serve_report(report))
    if args.plot:
        print(f"plot: {plot_serve_report(report, args.plot)}")
    print(json.dumps(report))


# ---------------------------------------------------------------------- parser
QUANTIZE_CHOICES = ("int8", "int4")  # openjamba.quant.METHODS, named here so the parser needs no torch import


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="openjamba", description=__doc__)
    parser.add_argument("--debug", action="store_true", help=f"show full tracebacks on errors (or set {DEBUG_ENV}=1)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    info = verbs.add_parser("info", help="parameters, layer plan and inference memory of a preset or checkpoint")
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS))
    add_model_arguments(info, "checkpoint directory with config.json", group=source)
    info.add_argument("--context", type=at_least(1), default=262144, help="context length in tokens (default 262144)")
    info.add_argument("--batch", type=at_least(1), default=1, help="sequences held at once (default 1)")
    info.add_argument("--cache-dtype", "--dtype", dest="cache_dtype", default=None, choices=sorted(DTYPE_BYTES),
                      help="dtype of the K/V cache and conv state (default: the checkpoint's dtype with --model, "
                           "bf16 for a preset; --dtype is the older spelling)")
    info.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                      help="weight bytes with openjamba's int8/int4 weight-only quantization (default: none, or a "
                           "quantized checkpoint's own)")
    info.add_argument("--weight-dtype", default=None, choices=["bf16", "fp16", "fp32"],
                      help="dtype of the weights left in full precision (default: the checkpoint's dtype with "
                           "--model, bf16 for a preset)")
    info.add_argument("--skip-mamba", action="store_true",
                      help="keep the Mamba layers' projections in --weight-dtype (Jamba-v0.1's model-card recipe)")
    info.add_argument("--device-memory", default=None, metavar="SIZE",
                      help="also the largest context that fits this memory, e.g. 80GB (10^9 B) or 80GiB")
    info.add_argument("--reserve", type=float, default=0.1,
                      help="share of --device-memory kept for the CUDA context, allocator and framework (0.1)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    info.set_defaults(func=cmd_info, config_only=True)  # a Hub repo id: config.json alone, not the weights

    gen = verbs.add_parser("generate", help="stream text from a checkpoint directory with its tokenizer")
    add_model_arguments(gen, "checkpoint directory with its tokenizer")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=at_least(0), default=100, help="most tokens to add (default 100)")
    gen.add_argument("--temperature", type=non_negative_float, default=0.8,
                     help="0 for greedy decoding (default 0.8)")
    gen.add_argument("--top-k", type=at_least(1), default=50, help="sample among the k likeliest (default 50)")
    gen.add_argument("--top-p", type=probability, default=None, help="nucleus sampling (default off)")
    gen.add_argument("--min-p", type=probability, default=None, help="drop tokens less likely than this times the "
                     "most likely one")
    gen.add_argument("--repetition-penalty", type=positive_float, default=None, help="transformers': the logits of "
                     "tokens already in the text divided by this where positive, multiplied where negative")
    gen.add_argument("--seed", type=int, default=None, help="seed of the sampling (reproducible)")
    gen.add_argument("--device", type=device_name, default=None, help="default: cuda if available, else cpu")
    gen.add_argument("--dtype", default=None, help="default: bf16 on GPU, fp32 on CPU")
    gen.add_argument("--kv-dtype", default=None, help="attention K/V cache dtype, e.g. bf16 under fp32 weights "
                     "(half the cache; default: the model's)")
    gen.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                     help="quantize the weights as they load (weight-only int8 per channel, int4 in groups)")
    gen.set_defaults(func=cmd_generate)

    qnt = verbs.add_parser("quantize", help="write a weight-only int8/int4 checkpoint (safetensors) that loads "
                                            "without the full-precision weights")
    add_model_arguments(qnt, "full-precision checkpoint directory")
    qnt.add_argument("--out", type=Path, required=True, help="output directory")
    qnt.add_argument("--quantize", choices=QUANTIZE_CHOICES, required=True,
                     help="int8 per output channel, or int4 in groups of --group-size")
    qnt.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256],
                     help="int4 inputs per scale/zero (default 128; a smaller one where a weight needs it)")
    qnt.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    qnt.set_defaults(func=cmd_quantize)

    prep = verbs.add_parser("prepare", help="train a tokenizer and tokenize text into shards for training")
    prep.add_argument("paths", nargs="*", help="text files, directories and .jsonl files (default: the Python "
                      "standard library of this interpreter)")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--vocab-size", type=at_least(1), default=4096, help="BPE vocabulary size (default 4096)")
    prep.add_argument("--tokenizer", help="use this tokenizer.json (or a checkpoint directory holding one) instead "
                      "of training one, e.g. a released Jamba tokenizer for fine-tuning")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens for validation")
    prep.add_argument("--text-key", default="text", help="the field holding the text in .jsonl lines")
    prep.set_defaults(func=cmd_prepare)

    trn = verbs.add_parser("train", help="pretrain or fine-tune (also under torchrun: FSDP2 over the layers)",
                           description="Train a Jamba model. Settings: defaults < --recipe FILE < flags; model "
                           "fields via --preset/--config/--init-from and --set FIELD=VALUE.")
    add_train_arguments(trn)
    trn.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                     help="continue the run in --out (or the given checkpoint / run directory) exactly")
    trn.add_argument("--overwrite", action="store_true",
                     help="delete the previous run in --out (checkpoints, model, metrics) and start afresh")
    trn.set_defaults(func=cmd_train)

    ev = verbs.add_parser("eval", help="perplexity and bits per byte on texts; lm-evaluation-harness tasks")
    add_model_arguments(ev, "checkpoint directory with its tokenizer")
    ev.add_argument("paths", nargs="*", help="text files (one document each), .jsonl files (one per line) and "
                                             "directories of .txt/.text/.md/.jsonl files")
    ev.add_argument("--text-field", default="text", help="the JSONL field holding the text (default: text)")
    ev.add_argument("--context-length", type=at_least(2), default=2048, help="tokens per forward (default 2048)")
    ev.add_argument("--stride", type=at_least(1), default=None,
                    help="tokens a window advances; each is scored with >= context-length - stride tokens of "
                         "context (default: half the context length)")
    ev.add_argument("--batch-size", type=at_least(1), default=4, help="windows (or requests) per forward (default 4)")
    ev.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (needs openjamba[eval])")
    ev.add_argument("--num-fewshot", type=int, default=None,
                    help="lm-eval: examples in each prompt (default: the task's)")
    ev.add_argument("--limit", type=float, default=None, help="lm-eval: at most this many examples per task")
    ev.add_argument("--include-path", default=None, help="lm-eval: a directory of extra task YAML files")
    ev.add_argument("--device", type=device_name, default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--dtype", default=None, help="default: bf16 on GPU, fp32 on CPU")
    ev.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                    help="quantize the weights as they load (weight-only int8 per channel, int4 in groups)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of the human lines")
    ev.add_argument("--output", default=None, help="also write the JSON report to this file")
    ev.set_defaults(func=cmd_eval)

    bench = verbs.add_parser("bench", help="prefill/decode/training speed and peak memory against context length",
                             description="Each cell runs in its own process. Prints a table, then JSON as the "
                             "last line.")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS))
    add_model_arguments(bench, "checkpoint directory with config.json", group=source)
    bench.add_argument("--contexts", type=count_list, default=(1024, 4096, 8192),
                       help="comma-separated context lengths; 8K = 8192 (default 1024,4096,8192)")
    bench.add_argument("--batch-sizes", type=count_list, default=(1,), help="comma-separated (default 1)")
    bench.add_argument("--phases", default="prefill,decode,scan",
                       help="comma-separated from prefill, decode, train (forward+backward), scan (the selective "
                            "scan alone), profile (where prefill time goes); default prefill,decode,scan")
    bench.add_argument("--compare", action="append", default=[], choices=["transformers", "attention-only"],
                       help="also run transformers' JambaForCausalLM on the same weights, or the attention-only "
                            "model of equal shape; repeatable")
    bench.add_argument("--decode-tokens", type=at_least(1), default=32, help="tokens decoded after each prefill")
    bench.add_argument("--prefill-chunk", type=at_least(1), default=2048, help="prefill chunk (as generate's default)")
    bench.add_argument("--repeats", type=at_least(1), default=3, help="best of up to this many runs (5 s budget)")
    bench.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (default: torch's default)")
    bench.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds per cell before giving up on it")
    bench.add_argument("--device", type=device_name, default=None, help="default: cuda if available, else cpu")
    bench.add_argument("--dtype", default=None, choices=runtime.SHORT_DTYPES,
                       help="default: bf16 on GPU, fp32 on CPU")
    bench.add_argument("--kv-dtype", default=None, choices=runtime.SHORT_DTYPES,
                       help="openjamba's attention K/V cache dtype (default: the model's)")
    bench.add_argument("--quantize", default=None, metavar="{int8,int4}[,...]",
                       help="openjamba's weights quantized at load (a preset's random weights: built quantized, "
                            "weight by weight); a comma-separated list (none = unquantized), e.g. none,int8,int4, "
                            "measures every format in one process per cell, decode interleaved, with their ratios")
    bench.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    bench.add_argument("--plot", default=None, help="write throughput and memory against context to this PNG")
    bench.set_defaults(func=cmd_bench)

    from .serve.batch import add_run_batch_arguments
    from .serve.chat import add_chat_arguments, run_chat
    from .serve.server import add_serve_arguments, serve

    srv = verbs.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching, state reuse)",
                           description="Serve a checkpoint: OpenAI's /v1/models, /v1/completions, /v1/chat/completions"
                           ", /v1/responses; Anthropic's /v1/messages; /tokenize, /detokenize, /health, /metrics; a "
                           "chat page at / (--no-web-ui: none).")
    add_serve_arguments(srv)
    srv.set_defaults(func=serve)

    cht = verbs.add_parser("chat", help="chat with a checkpoint in the terminal (each turn reads only its new "
                           "tokens)", description="Commands in the chat: /retry, /undo, /reset, /system [TEXT|off], "
                           "/set [NAME VALUE], /save FILE, /load FILE, /help, /exit.")
    add_chat_arguments(cht)
    cht.set_defaults(func=run_chat)

    rbt = verbs.add_parser("run-batch", help="a file of requests in OpenAI's Batch format through the server's "
                           "handlers, offline (vLLM's run-batch; resumable)", description="Run INPUT.jsonl (one "
                           "{custom_id, method, url, body} a line) through the handlers `openjamba serve` runs, in "
                           "process, batched; each result is appended to OUTPUT.jsonl as it finishes, and a rerun "
                           "with the same output runs only what it lacks.")
    add_run_batch_arguments(rbt)

    bsv = verbs.add_parser("bench-serve", help="the serving engine: throughput and latency against concurrent "
                           "streams, chat-turn reuse, a long prompt among decoding streams",
                           description="Prints a table, then JSON as the last line. In process (--preset or "
                           "--model), or with --url the streams phase against any OpenAI-compatible server over "
                           "HTTP (openjamba serve, llama-server, vLLM, Ollama).")
    source = bsv.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS))
    add_model_arguments(bsv, "checkpoint directory with config.json (--url: the server's model name)", group=source)
    bsv.add_argument("--url", default=None, help="an OpenAI-compatible server's base URL, e.g. "
                     "http://127.0.0.1:8000/v1: run the streams phase over HTTP (prompts of random words; "
                     "--prefix-tokens and --suffix-tokens then count words)")
    bsv.add_argument("--api-key", default=None, help="with --url: sent as a Bearer token")
    bsv.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                     help="with --url: /v1/completions (default) or /v1/chat/completions")
    bsv.add_argument("--timeout", type=positive_float, default=600.0,
                     help="with --url: seconds per request (default 600)")
    bsv.add_argument("--phases", default=None, help="comma-separated from streams, chat, interference (default "
                     "all; with --url only streams)")
    bsv.add_argument("--streams", type=count_list, default=(1, 2, 4, 8, 16), help="concurrent streams to try "
                     "(default 1,2,4,8,16)")
    bsv.add_argument("--prefix-tokens", type=at_least(1), default=256, help="shared system prefix of every stream")
    bsv.add_argument("--suffix-tokens", type=at_least(1), default=32, help="each stream's own prompt tokens")
    bsv.add_argument("--output-tokens", type=at_least(1), default=128, help="tokens generated per stream (default 128)")
    bsv.add_argument("--history", type=parse_count, default=4000, help="chat history before the second turn")
    bsv.add_argument("--long-prompt", type=parse_count, default=4000, help="the prompt that arrives while 8 "
                     "streams decode")
    bsv.add_argument("--prefill-chunk", type=at_least(1), default=512, help="the engine's prefill chunk (default 512)")
    bsv.add_argument("--temperature", type=non_negative_float, default=0.0, help="the streams' sampling (default "
                     "0: greedy)")
    bsv.add_argument("--top-p", type=probability, default=1.0, help="the streams' top-p (default 1: off)")
    bsv.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (default: torch's default)")
    bsv.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights and the prompts")
    bsv.add_argument("--plot", default=None, help="write throughput, TTFT and ITL against streams to this PNG")
    bsv.set_defaults(func=cmd_bench_serve)

    quick = verbs.add_parser("quickstart", help="the README's main job: prepare the stdlib, train, sample")
    quick.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    quick.add_argument("--steps", type=at_least(1), default=QUICKSTART["steps"],
                       help=f"optimizer steps (default {QUICKSTART['steps']})")
    quick.add_argument("--sample-tokens", type=at_least(0), default=60,
                       help="tokens sampled after each prompt at the end (default 60)")
    quick.add_argument("--overwrite", action="store_true", help="replace a previous quickstart run in --out "
                       "(its prepared data is reused)")
    quick.set_defaults(func=cmd_quickstart)

    abl = verbs.add_parser("ablate", help="attention vs Mamba vs hybrids (± MoE) at equal parameters and tokens, "
                                          "on MQAR recall and language modelling: table and plots")
    abl.add_argument("--out", default=None, help="output directory (default runs/ablate)")
    abl.add_argument("--steps", type=int, default=None, help="optimizer steps of every run (default: the preset's, "
                                                             "1200 MQAR and 250 LM)")
    abl.add_argument("--variants", default=None, help="comma-separated: attention,mamba,hybrid-1:3,hybrid-1:7,"
                                                      "hybrid-1:3-moe,hybrid-1:7-moe (default all)")
    abl.add_argument("--tasks", default=None, help="comma-separated: mqar,lm (default both)")
    abl.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (default 1)")
    abl.add_argument("--seed", type=int, default=None, help="seed of initialisation and data (default 0)")
    abl.add_argument("--lm-data", default=None, help="prepared data for the LM task (default: prepare the standard "
                                                     "library into OUT/data)")
    abl.add_argument("--smoke", action="store_true", help="toy settings that run in seconds (tests)")
    abl.set_defaults(func=cmd_ablate)
    return parser


DEBUG_ENV = "OPENJAMBA_DEBUG"
_STOPPED_BY: list[int] = []  # SIGTERM, when it is what stopped the verb (its exit status is then 143)


def main(argv: list[str] | None = None) -> None:
    """Run one verb. Any error is one line on stderr and a non-zero exit; `--debug` (or OPENJAMBA_DEBUG=1)
    shows the full traceback instead."""
    runtime.use_huge_pages()  # before anything large is allocated
    args = build_parser().parse_args(argv)
    if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        argtypes.resolve_model_flag(args)
        return args.func(args)
    name = f"openjamba {args.verb}"
    previous = _one_line_warnings(name), _stop_on_sigterm()
    try:
        argtypes.resolve_model_flag(args)  # once per command: a Hub repo id becomes its cached snapshot directory
        args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught below, rather than at interpreter exit
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        raise SystemExit(128 + _STOPPED_BY[-1] if _STOPPED_BY else 130) from None
    except SystemExit as err:  # a verb's own message: in the same `openjamba VERB: error:` form as the rest
        if isinstance(err.code, str) and not err.code.startswith("openjamba"):
            raise SystemExit(f"{name}: error: {err.code}") from None
        if isinstance(err.code, str) and err.code.startswith("openjamba: error: "):  # a shared helper's: name the verb
            raise SystemExit(f"{name}: error: {err.code.removeprefix('openjamba: error: ')}") from None
        raise
    except BrokenPipeError:  # the reader closed the pipe (`openjamba info ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed at exit
        raise SystemExit(1) from None
    except Exception as err:  # noqa: BLE001 - the one place that turns any error into one line
        raise SystemExit(f"{name}: error: {describe_error(err)}") from None
    finally:
        warnings.showwarning = previous[0]
        if previous[1] is not None:
            signal.signal(signal.SIGTERM, previous[1])


def describe_error(err: BaseException) -> str:
    """The message of an error the user can act on; an unexpected one is named as such, with the way to see more."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    lines = text.splitlines()
    if len(lines) > 6:  # a long list (e.g. of tensors) is summarised: the first lines say what is wrong
        text = "\n".join(lines[:6] + [f"  ... {len(lines) - 6} more lines (--debug shows everything)"])
    if isinstance(err, (ValueError, OSError, LookupError)):  # CheckpointError, DataError are ValueErrors
        return text
    return f"{type(err).__name__}: {text} (unexpected; run with --debug for the traceback and please report it)"


def _one_line_warnings(name: str):
    """Warnings as `openjamba VERB: warning: ...` lines instead of Python's two-line file:line form."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{name}: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show
    return previous


def _stop_on_sigterm():
    """SIGTERM unwinds like Ctrl-C, so that partial outputs are removed (the trainer installs its own handler to
    save a checkpoint first)."""
    def handler(signum, frame):
        _STOPPED_BY.append(signum)
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


if __name__ == "__main__":
    main()
