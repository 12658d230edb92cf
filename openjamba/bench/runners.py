"""What the benchmark measures, per implementation: one prefill, one decode step and one training step over the
same weights, for openjamba (through the inference core's `prefill` and `decode_step`) and for transformers'
JambaForCausalLM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import JambaConfig
from ..generate import decode_step, prefill
from ..runtime import parse_dtype


class Runner:
    """One implementation's prefill / decode / training step, all over the same weights."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device

    def prefill(self, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cache_bytes(self) -> int | None:
        return None

    def cache_read_bytes(self, length: int) -> int | None:
        """Bytes of cache a decode step at `length` cached tokens reads, when known."""
        return None

    def train_step(self, ids: torch.Tensor) -> None:
        self.model.zero_grad(set_to_none=True)
        self.model(ids, labels=ids).loss.backward()


class OpenJambaRunner(Runner):
    def __init__(self, model: torch.nn.Module, device: torch.device, decode_budget: int,
                 kv_dtype: torch.dtype | None = None, on_progress: Callable[[str], None] | None = None) -> None:
        super().__init__(model, device)
        self.decode_budget = decode_budget  # tokens the cache must leave room for after the prompt
        self.kv_dtype = kv_dtype
        self.on_progress = on_progress

    def prefill(self, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        """As `generate` prefills: chunk by chunk into a hybrid cache sized for the decode that follows."""
        self.cache = self.model.make_cache(ids.shape[0], max_length=ids.shape[1] + self.decode_budget,
                                           kv_dtype=self.kv_dtype)
        report = None
        if self.on_progress is not None:
            def report(done: int) -> None:
                self.on_progress(f"prefill {done:,}/{ids.shape[1]:,} tokens")
        return prefill(self.model, ids, self.cache, chunk, on_progress=report)

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        return decode_step(self.model, token, self.cache)

    def cache_bytes(self) -> int:
        return self.cache.nbytes()

    def cache_read_bytes(self, length: int) -> int:
        """The Mamba states whole, and the attention K/V of `length` tokens (of the buffers' static capacity)."""
        capacity = self.cache.max_length or max(1, self.cache.seq_len)
        return int(self.cache.mamba_nbytes() + self.cache.kv_nbytes() * min(1.0, length / capacity))


class TransformersRunner(Runner):
    def prefill(self, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        """One forward over the whole prompt: transformers cannot continue its Mamba layers from a chunk."""
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1]

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(token[:, None], past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1]


def build_runner(spec: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 on_progress: Callable[[str], None] | None = None) -> Runner:
    """The runner a worker's spec names, with its model loaded (or built from config and seed) on `device`."""
    if spec["impl"] == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.JambaForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).to(device)
        return TransformersRunner(model, device)
    from ..model import JambaForCausalLM

    quantize = spec.get("quantize") if spec["impl"] == "openjamba" else None
    if spec.get("model_dir"):
        model = JambaForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, device=device, quantize=quantize)
    elif quantize:
        from ..quant import random_quantized_model

        model = random_quantized_model(JambaConfig.from_dict(spec["config"]), quantize, dtype, spec["seed"])
        model.to(device)
    else:
        torch.manual_seed(spec["seed"])
        with torch.device(device):
            model = JambaForCausalLM(JambaConfig.from_dict(spec["config"])).to(dtype)
    kv_dtype = parse_dtype(spec["kv_dtype"], "kv_dtype") if spec.get("kv_dtype") else None
    return OpenJambaRunner(model, device, spec["decode_tokens"], kv_dtype, on_progress)
