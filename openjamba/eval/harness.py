"""lm-evaluation-harness adapter: the `openjamba` model for `lm_eval`, `simple_evaluate` and `openjamba eval --tasks`.

    openjamba eval --model DIR --tasks hellaswag --limit 100                   # simple_evaluate on a loaded model
    python -m openjamba.eval.harness --model openjamba --model_args pretrained=DIR,dtype=bfloat16 --tasks hellaswag

The second is lm_eval's own command line with `openjamba` registered in its model registry. pyproject.toml also
declares the model in lm_eval's "lm_eval.models" entry-point group, so an lm_eval release that discovers plugins
that way offers `lm_eval --model openjamba` as well; nothing runs at interpreter start-up.

Padding through the Mamba layers is what an SSM adapter must get right:
  - scoring (loglikelihood, loglikelihood_rolling) pads on the right: the model is causal, so trailing pads cannot
    reach the positions that are scored (`perplexity.score_spans`);
  - generation pads on the left with an attention mask, which openjamba's forward turns into exact per-row results
    (pads are zeroed before the convolution and skipped by the scan), so no pad token leaks into the state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.utils import simple_parse_args_string
from tqdm.auto import tqdm

from ..generate import generate
from ..hf import resolve_checkpoint
from ..model import JambaForCausalLM
from ..runtime import default_device, resolve_dtype
from ..tokenizer import load_tokenizer
from .perplexity import document_nlls, prefix_token_id, score_spans

MODEL_NAME = "openjamba"
DEFAULT_MAX_LENGTH = 2048
MAX_TOKEN_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")

logger = logging.getLogger(__name__)


class OpenJambaLM(TemplateLM):
    """lm-eval model over an openjamba checkpoint directory or Hub repo id (or an already loaded model and tokenizer).

    model_args: pretrained=DIR, dtype (auto|float32|bfloat16|float16), device, batch_size, max_length (the most
    tokens one forward sees: longer inputs are truncated on the left, rolling scores use windows of it),
    max_gen_toks (default generation budget), add_bos_token (prefix every context with BOS; default False, as
    lm-eval's `hf` model does, so scores compare). max_batch_size is accepted and ignored (no automatic batch
    sizing; batch_size=auto means 1).
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        model: JambaForCausalLM | None = None,
        tokenizer=None,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = False,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (model is None):
            raise ValueError("give either pretrained=DIR or an already loaded model (with its tokenizer)")
        if model is None:
            device = _available_device(device)
            dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(
                None if dtype in (None, "auto") else str(dtype), device)
            checkpoint = resolve_checkpoint(pretrained)  # a Hub repo id once, for the weights and the tokenizer
            model = JambaForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device)
            tokenizer = tokenizer or load_tokenizer(checkpoint)
        elif tokenizer is None:
            raise ValueError("a model passed directly needs its tokenizer too")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pretrained = str(pretrained) if pretrained is not None else None
        self._device = model.device
        self.batch_size = _parse_batch_size(batch_size)
        self.max_length = int(max_length or DEFAULT_MAX_LENGTH)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _parse_bool(add_bos_token)
        config = model.config
        if not config.eos_token_ids:
            raise ValueError("the checkpoint's config has no eos_token_id, which lm-eval needs as end of text")
        self.eos_ids = list(config.eos_token_ids)

    # ------------------------------------------------------------------ construction from lm_eval's arguments
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> OpenJambaLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> OpenJambaLM:
        """model_args win over the CLI's --batch_size/--device, which lm_eval always sends (defaults 1, cuda:0)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's CLI sends its default cuda:0 whether or not anyone asked: on a CPU-only machine that is no
            # request worth a warning; a device given in model_args still gets one (see _available_device).
            del extra["device"]
        return cls(**arg_dict, **extra)

    # ------------------------------------------------------------------ tokenization (TemplateLM's hooks)
    @property
    def eot_token_id(self) -> int:
        return self.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.model.config)

    @property
    def tokenizer_name(self) -> str:
        return (self.pretrained or "openjamba").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """No special tokens from the tokenizer's post-processor; BOS only when add_bos_token asks for it."""
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        bos = self.model.config.bos_token_id
        if self.add_bos_token and add_special_tokens is not False and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each (context, continuation) becomes one span: the last max_length + 1 tokens, continuation scored."""
        spans = []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-(self.max_length + 1):]
            spans.append((tokens, min(len(continuation), len(tokens) - 1)))
        scored = [i for i, (_, n) in enumerate(spans) if n > 0]  # an empty continuation has log-likelihood 0
        results = [(0.0, True)] * len(spans)
        with tqdm(total=len(scored), desc="loglikelihood", disable=True if disable_tqdm else None) as bar:
            for i, result in zip(scored, score_spans(self.model, [spans[i] for i in scored], self.batch_size,
                                                     progress=bar)):
                results[i] = result
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihoods in disjoint windows of max_length tokens after the prefix token."""
        texts = [request.args[0] for request in requests]
        documents = [self.tok_encode(text, add_special_tokens=False) for text in texts]
        with tqdm(total=sum(map(len, documents)), desc="loglikelihood_rolling", unit="tok",
                  disable=True if disable_tqdm else None) as bar:
            nlls = document_nlls(self.model, documents, self.prefix_token_id, self.max_length,
                                 stride=self.max_length, batch_size=self.batch_size, progress=bar)
        results = [-nll for nll, _ in nlls]
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Batches of equal generation settings, longest context first, left-padded with an attention mask."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        with tqdm(total=len(requests), desc="generate_until", disable=True if disable_tqdm else None) as bar:
            for indices in groups.values():
                options = self._generation_options(requests[indices[0]].args[1])
                contexts = {i: self._context_tokens(requests[i].args[0], options["max_gen_toks"]) for i in indices}
                indices.sort(key=lambda i: -len(contexts[i]))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    texts = self._generate_batch([contexts[i] for i in batch], options)
                    for i, text in zip(batch, texts):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return results

    def _generation_options(self, gen_kwargs: dict) -> dict:
        """lm-eval's generation kwargs -> ours: `until` as a list, max_gen_toks from any alias, greedy unless
        do_sample with a positive temperature."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        budgets = [kwargs.pop(alias) for alias in MAX_TOKEN_ALIASES if alias in kwargs]
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        do_sample = _parse_bool(kwargs.pop("do_sample", temperature > 0)) and temperature > 0
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        if kwargs:
            logger.warning("openjamba: ignoring generation kwargs %s", sorted(kwargs))
        return {"until": [s for s in until if s], "max_gen_toks": int(budgets[0]) if budgets else self.max_gen_toks,
                "do_sample": do_sample, "temperature": temperature if do_sample else 1.0,
                "top_k": int(top_k) if top_k is not None and do_sample else None,
                "top_p": float(top_p) if top_p is not None and do_sample else None}

    def _context_tokens(self, context: str, max_gen_toks: int) -> list[int]:
        """Left-truncated so context and generation fit in max_length; the prefix token stands in for no context."""
        ids = self.tok_encode(context)[-max(1, self.max_length - max_gen_toks):]
        return ids or [self.prefix_token_id]

    def _generate_batch(self, contexts: list[list[int]], options: dict) -> list[str]:
        width = max(map(len, contexts))
        ids = torch.full((len(contexts), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros(len(contexts), width, dtype=torch.long)
        for row, context in enumerate(contexts):  # left padding: real tokens end at the same column
            ids[row, width - len(context):] = torch.tensor(context)
            mask[row, width - len(context):] = 1
        until = options["until"]

        def should_stop(new_tokens: torch.Tensor) -> torch.Tensor:
            texts = [self._decode_generation(row) for row in new_tokens.tolist()]
            return torch.tensor([any(stop in text for stop in until) for text in texts])

        out = generate(
            self.model, ids, attention_mask=mask if not bool(mask.all()) else None,
            max_new_tokens=options["max_gen_toks"], do_sample=options["do_sample"],
            temperature=options["temperature"], top_k=options["top_k"], top_p=options["top_p"],
            eos_token_id=self.eos_ids, should_stop=should_stop if until else None)
        return [_cut_at_stop(self._decode_generation(row), until) for row in out[:, width:].tolist()]

    def _decode_generation(self, tokens: list[int]) -> str:
        """Text of the generated tokens up to (not including) the first EOS."""
        for i, token in enumerate(tokens):
            if token in self.eos_ids:
                tokens = tokens[:i]
                break
        return self.tok_decode(tokens)

    def get_model_info(self) -> dict:
        config = self.model.config
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self.model.dtype),
                "model_name": self.pretrained or "openjamba", "num_hidden_layers": config.num_hidden_layers}


def _cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the earliest stop string (lm-eval's convention: the stop string itself is dropped)."""
    cuts = [text.find(stop) for stop in until if stop in text]
    return text[:min(cuts)] if cuts else text


def _available_device(device: str | None) -> str:
    """lm_eval's CLI sends device=cuda:0 by default; fall back to the CPU rather than fail without a GPU."""
    if device is None:
        return default_device()
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("openjamba: %s requested but CUDA is not available; using the CPU", device)
        return "cpu"
    return str(device)


def _parse_batch_size(batch_size: int | str) -> int:
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        logger.warning("openjamba: batch_size=%s is not supported; using 1", batch_size)
        return 1
    size = int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return size


def _parse_bool(value: bool | str) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y")
    return bool(value)


def register() -> None:
    """Register OpenJambaLM as `openjamba` in lm_eval's model registry (idempotent).

    lm_eval fills its registry with its own models only when the registry is empty at the first lookup, so
    registering ours first would hide `hf` and the rest: import them first.
    """
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import register_model

    register_model(MODEL_NAME)(OpenJambaLM)  # also replaces a lazy entry-point placeholder of the same name


def main(argv: list[str] | None = None) -> None:
    """`python -m openjamba.eval.harness ...`: lm_eval's own command line, with `--model openjamba` available.
    A checkpoint that cannot be loaded (a wrong `pretrained=` path, a broken or badly quantized checkpoint) is
    one line on stderr, as with `openjamba eval`; lm_eval's own errors keep its reporting."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from ..hf import CheckpointError
    from ..quant import QuantizationError

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except (CheckpointError, QuantizationError, FileNotFoundError) as err:
        raise SystemExit(f"python -m openjamba.eval.harness: error: {err}") from None


if __name__ == "__main__":
    # Run through the importable module, so the registered class is openjamba.eval.harness.OpenJambaLM (the one
    # the "openjamba.eval.harness:OpenJambaLM" entry point resolves to), not a second copy in __main__.
    from openjamba.eval.harness import main as _main

    _main()
else:
    register()
