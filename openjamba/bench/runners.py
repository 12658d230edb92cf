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
        model = random_quantized_model(JambaConfig.from_dict(spec["config"]), quantize, dtype, spec["seed"])
        model.to(device)
    else:
        torch.manual_seed(spec["seed"])
        with torch.device(device):
            model = JambaForCausalLM(JambaConfig.from_dict(spec["config"])).to(dtype)
    kv_dtype = parse_dtype(spec["kv_dtype"], "kv_dtype") if spec.get("kv_dtype") else None
    return OpenJambaRunner(model, device, spec["decode_tokens"], kv_dtype, on_progress)


@torch.no_grad()
def random_quantized_model(config: JambaConfig, method: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                           group_size: int = 128) -> torch.nn.Module:
    """A randomly initialised quantized model built weight by weight (benchmarks of shapes with no checkpoint):
    peak memory is the quantized model plus one full-precision weight, never the full-precision model."""
    from torch import nn

    from ..model import JambaForCausalLM, MambaMixer, RMSNorm, init_mamba_parameters
    from ..quant import (
        QuantizedWeight,
        check_method,
        install,
        prepare_all,
        quantization_config,
        quantize_rows,
        quantized_params,
    )

    check_method(method)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = JambaForCausalLM(config)
    std = config.initializer_range
    weights = {}
    for name, shape in quantized_params(model).items():
        rows = quantize_rows(lambda start, stop, K=shape[-1]: torch.empty(stop - start, K).normal_(0.0, std),
                             shape, method, group_size)
        weights[name] = QuantizedWeight(rows)
    install(model, weights, prepare=False)
    model = model.to(dtype)
    for weight in weights.values():
        weight.restore_scale_dtypes()
    # to_empty would discard the quantized buffers: give only the still-empty (meta) tensors storage.
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor.is_meta:
                fresh = torch.empty(tensor.shape, dtype=tensor.dtype)
                if isinstance(module, RMSNorm) or name == "D":
                    fresh.fill_(1.0)
                elif name == "bias":
                    fresh.zero_()
                elif tensor.dtype.is_floating_point:
                    fresh.normal_(0.0, std)
                setattr(module, name, nn.Parameter(fresh, requires_grad=False) if isinstance(tensor, nn.Parameter)
                        else fresh)
    for module in model.modules():
        if isinstance(module, MambaMixer):
            init_mamba_parameters(module)
    prepare_all(model)
    model.quantization = quantization_config(method, group_size, weights)
    return model.eval()
