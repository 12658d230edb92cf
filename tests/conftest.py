"""Shared fixtures: tiny configs covering the architecture's variations, and random models built from them."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported, and many modules (torch._dynamo, transformers) import it, so it
    # is set before any of them: without a GPU the Triton kernels' tests run in its interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from openjamba import JambaConfig, JambaForCausalLM  # noqa: E402

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=2,
    expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

# Each differs from BASE in what the parity tests must cover.
CONFIGS = {
    "moe-gqa": {},
    "dense-mha-biases-tied": dict(num_experts=1, num_experts_per_tok=1, num_key_value_heads=4,
                                  mamba_proj_bias=True, tie_word_embeddings=True, attn_layer_period=2,
                                  attn_layer_offset=1),
    "moe-every-layer-top1-noconvbias": dict(num_experts=3, num_experts_per_tok=1, expert_layer_period=1,
                                            expert_layer_offset=0, mamba_conv_bias=False, attn_layer_period=3,
                                            attn_layer_offset=0, num_key_value_heads=1, mamba_d_conv=3),
    "moe-period3-two-attention": dict(num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=2,
                                      expert_layer_period=3, expert_layer_offset=0, mamba_dt_rank=5),
}


def make_config(name: str = "moe-gqa", **overrides) -> JambaConfig:
    return JambaConfig(**{**BASE, **CONFIGS[name], **overrides})


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.15) -> torch.nn.Module:
    """Give every parameter random values of a size that makes all paths matter (norms, D, biases, A_log too)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 4 + 0.5))
        elif "norm" in name or name.endswith(".D"):
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith("dt_proj.bias"):
            p.copy_(-2.0 + 0.5 * noise)
        else:
            p.copy_(scale * noise)
    return model


def random_model(name: str = "moe-gqa", seed: int = 0, **overrides) -> JambaForCausalLM:
    torch.manual_seed(seed)
    return randomize_(JambaForCausalLM(make_config(name, **overrides)), seed).eval()


@pytest.fixture(params=list(CONFIGS))
def config_name(request) -> str:
    return request.param


def left_padded_batch(lengths: list[int], vocab: int, seed: int = 0, pad_id: int = 0):
    """Random prompts of the given lengths, left-padded to the longest: (ids, mask, list of unpadded rows)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    rows = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask, rows


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """A small synthetic Python corpus, prepared once for all training tests (vocabulary 320)."""
    from openjamba.train import prepare

    from .train_helpers import write_corpus

    root = tmp_path_factory.mktemp("corpus")
    corpus = write_corpus(root / "text")
    prepare([corpus], root / "data", vocab_size=320, val_fraction=0.2, progress=False)
    return root / "data"


@pytest.fixture
def one_thread():
    """Tiny training runs: one thread is faster (and far steadier on a busy machine) than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def byte_level_tokenizer(corpus: list[str] | None = None, vocab_size: int = 320):
    """A small byte-level BPE tokenizer (any text encodes) with <pad>=0, <bos>=1, <eos>=2 as in BASE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from openjamba.tokenizer import Tokenizer as TextTokenizer

    corpus = corpus or ["the quick brown fox jumps over the lazy dog. hello world, hello there!\n"] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return TextTokenizer.from_backend(tokenizer)


def mutated_text(sequence, rng, alphabet):
    """`sequence` (bytes or str) with one to three random edits: an element of `alphabet` inserted or substituted,
    or one deleted. The near-valid inputs on which the grammar and parser tests hold a recogniser to its plain
    reference."""
    items = list(sequence)
    for _ in range(rng.randint(1, 3)):
        at, kind = rng.randrange(len(items) + 1), rng.randrange(3)
        if kind == 0 or not items:
            items.insert(at, rng.choice(alphabet))
        elif kind == 1:
            del items[min(at, len(items) - 1)]
        else:
            items[min(at, len(items) - 1)] = rng.choice(alphabet)
    return bytes(items) if isinstance(sequence, bytes) else "".join(items)
