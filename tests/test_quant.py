"""Weight-only quantization: each kernel against the dequantize-then-F.linear reference, the quantized model against
fp32, quantize-at-load, and save -> load of a quantized checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from openjamba import JambaForCausalLM, quant
from openjamba.hf import CheckpointError
from openjamba.ops import cpu_kernels
from openjamba.tokenizer import Tokenizer as TextTokenizer

from .conftest import make_config, random_model, randomize_

# The CPU kernels quantize activations to int8 (blocks of 32 inputs for int8 weights, one weight group for int4) and
# sum each block's integer products exactly: against `kernel_reference` (the same arithmetic in float64) they
# differ by fp32 accumulation only. Against the plain reference (full-precision activations) they differ by the
# activations' rounding, at most half a step of max|x| / 127 per block: measured 0.5-0.9% of the largest output on
# random data, bounded here at 2%.
KERNEL_RTOL = 1e-5
ACTIVATION_RTOL = 0.02


def assert_kernel_matches(out: torch.Tensor, x: torch.Tensor, tensors: dict, bias=None) -> None:
    ref = quant.kernel_reference(x, tensors)
    plain = quant.reference_linear(x, tensors)
    if bias is not None:
        ref, plain = ref + bias.double(), plain + bias
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= KERNEL_RTOL * scale
    assert (out - plain).abs().max().item() <= ACTIVATION_RTOL * scale


SHAPES = [(64, 256, 128), (40, 160, 32), (36, 96, 32), (64, 512, 256), (20, 192, 64), (7, 64, 32)]  # N, K, group


@pytest.mark.parametrize("method", quant.METHODS)
@pytest.mark.parametrize("rows", [1, 3, 5, 17])
def test_kernel_matches_dequantized_reference(method, rows):
    torch.manual_seed(rows)
    for N, K, group in SHAPES:
        tensors = quant.quantize_weight(torch.randn(N, K), method, group)
        assert tensors["qweight"].dtype == (torch.int8 if method == "int8" else torch.uint8)
        qw = quant.QuantizedWeight({k: v.clone() for k, v in tensors.items()}).prepare()
        x = torch.randn(2, rows, K)
        bias = torch.randn(N)
        out = qw.linear(x, bias=bias)
        assert out.shape == (2, rows, N) and out.dtype == torch.float32
        assert_kernel_matches(out, x, tensors, bias)
        # strided rows (a slice of a wider tensor) read in place
        wide = torch.randn(rows, K + 32)
        assert_kernel_matches(qw.linear(wide[:, :K]), wide[:, :K], tensors)


def test_activation_quantization_matches_the_kernel():
    """The kernel's activation rounding (ops/csrc/quant_linear.cpp) is exactly `quant.quantize_activations`."""
    lib = quant._cpu_library()
    x = torch.randn(3, 128) * torch.logspace(-3, 3, 128)
    x[1] = 0.0  # a zero block has scale 0 and values 0
    x[2, :32] = torch.arange(32) - 15.5  # ties round to even
    for block in (32, 64, 128):
        q, scales = torch.empty(3, 128, dtype=torch.int8), torch.empty(3, 128 // block)
        lib.qlinear_quantize_activations(x.data_ptr(), q.data_ptr(), scales.data_ptr(), 3, 128, block)
        ref_q, ref_scales = quant.quantize_activations(x, block)
        assert torch.equal(q, ref_q) and torch.equal(scales, ref_scales)


def test_kernel_rows_independent_of_threads_and_rows():
    """Work items of about 1 MB (the last ones cut smaller when threaded) read as two or four streams: a matrix of
    several items with uneven stretches gives each output the same bits on 1 or 2 threads, alone or among other
    rows of x; so do short rows (a Mamba dt_proj's 160 inputs), which one row of x also takes four at a time."""

    lib = quant._cpu_library()
    if lib is None:
        pytest.skip("no compiled kernels")
    torch.manual_seed(0)
    N = 1031  # K = 1024: 1 MB of int8, several items on 2 threads, stretches of unequal length
    for method, K, group in [(m, K, g) for m in quant.METHODS for K, g in ((1024, 128), (160, 32))]:
        tensors = quant.quantize_weight(torch.randn(N, K), method, group)
        q, s = tensors["qweight"], tensors["scales"]
        x = torch.randn(5, K)
        outs = []
        for rows, threads in ((5, 1), (5, 2), (1, 2), (1, 1)):
            y = torch.empty(rows, N)
            args = (rows, K, N)
            if method == "int8":
                lib.qlinear_int8(x.data_ptr(), q.data_ptr(), s.data_ptr(), None, None, y.data_ptr(), *args, K, N,
                                 threads)
            else:
                lib.qlinear_int4(x.data_ptr(), q.data_ptr(), s.data_ptr(), tensors["zeros"].data_ptr(), None, None,
                                 y.data_ptr(), *args, K // s.shape[-1], K, N, threads)
            outs.append(y)
        assert_kernel_matches(outs[0], x, tensors)
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(outs[2][0], outs[0][0]) and torch.equal(outs[3], outs[2])


def test_int4_long_rows_one_row():
    """One row of x over long int4 rows (more than 512 inputs: two weight rows per step, their sums reduced
    together) gives the bits of the same row among several rows of x (four weight rows per step, each reduced
    alone), and matches the reference: groups of 128 (one per piece) over more than one chunk of 16 groups, groups
    of 256 and 512 (several pieces per group), odd row counts (a last step of one row)."""
    lib = quant._cpu_library()
    if lib is None:
        pytest.skip("no compiled kernels")
    torch.manual_seed(0)
    for N, K, group in ((37, 2560, 128), (9, 1024, 256), (5, 4096, 256), (6, 5120, 512)):
        tensors = quant.quantize_weight(torch.randn(N, K), "int4", group)
        q, s, z = tensors["qweight"], tensors["scales"], tensors["zeros"]
        x = torch.randn(5, K)
        outs = []
        for rows in (1, 5):
            y = torch.empty(rows, N)
            lib.qlinear_int4(x.data_ptr(), q.data_ptr(), s.data_ptr(), z.data_ptr(), None, None, y.data_ptr(), rows,
                             K, N, group, K, N, 1)
            outs.append(y)
        assert_kernel_matches(outs[1], x, tensors)
        assert torch.equal(outs[0][0], outs[1][0])


def test_int4_one_row_bias_and_experts():
    """One row of x over long int4 rows in groups of 128 (on AVX2 a path of its own) gives the bits of the same row
    among several rows of x, with a bias and with its matrix chosen from a stack by index (a decode step's expert)."""
    lib = quant._cpu_library()
    if lib is None:
        pytest.skip("no compiled kernels")
    torch.manual_seed(0)
    E, N, K = 3, 37, 2560
    tensors = quant.quantize_weight(torch.randn(E, N, K), "int4", 128)
    q, s, z = tensors["qweight"], tensors["scales"], tensors["zeros"]
    x, bias, index = torch.randn(4, K), torch.randn(N), torch.tensor([2, 0, 1, 2])

    def product(rows, first=0, experts=None):
        y = torch.empty(rows, N)
        lib.qlinear_int4(x[first].data_ptr(), q.data_ptr(), s.data_ptr(), z.data_ptr(), bias.data_ptr(),
                         None if experts is None else experts[first].data_ptr(), y.data_ptr(), rows, K, N, 128, K, N,
                         1)
        return y

    several = product(4)
    assert_kernel_matches(several, x, {name: t[0] for name, t in tensors.items()}, bias)
    gathered = product(4, experts=index)
    for r in range(4):
        assert torch.equal(product(1, r)[0], several[r])
        assert torch.equal(product(1, r, index)[0], gathered[r])


@pytest.mark.parametrize("march, avx2", [("x86-64-v2", 0), ("x86-64-v3", 1)])
def test_builds_without_avx512_match(tmp_path, march, avx2):
    """The kernels without AVX-512: the plain C++ loops (x86-64-v2) and the AVX2 ones (x86-64-v3, quant_avx2.h)
    give the same products, and a row's bits do not depend on the rows beside it or on the thread count."""
    import ctypes
    import shutil
    import subprocess

    from openjamba.ops import cpu_build

    cxx = cpu_build._compiler()
    if cxx is None or shutil.which("uname") is None or subprocess.run(["uname", "-m"], capture_output=True,
                                                                         text=True).stdout.strip() != "x86_64":
        pytest.skip("needs an x86-64 C++ compiler")
    lib_path = tmp_path / "quant_plain.so"
    result = cpu_build.compile_library(cxx, [f"-march={march}", "-fopenmp"], lib_path,
                                       [cpu_build.CSRC / "quant_linear.cpp"])
    assert result.returncode == 0, result.stderr[-2000:]
    lib = ctypes.CDLL(str(lib_path))
    assert lib.qlinear_vnni() == 0 and lib.qlinear_avx2() == avx2
    lib.qlinear_int8.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6
    lib.qlinear_int4.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7
    torch.manual_seed(0)
    for method in quant.METHODS:
        for N, K, group in SHAPES + [(37, 2560, 128), (9, 1024, 256), (6, 160, 32), (5, 4096, 256)]:
            tensors = quant.quantize_weight(torch.randn(N, K), method, group)
            q, s = tensors["qweight"], tensors["scales"]
            x = torch.randn(5, K)
            outs = []
            for rows, threads in ((5, 2), (5, 1), (1, 1), (3, 2)):
                y = torch.empty(rows, N)
                if q.dtype == torch.int8:
                    lib.qlinear_int8(x.data_ptr(), q.data_ptr(), s.data_ptr(), None, None, y.data_ptr(), rows, K, N, K,
                                     N, threads)
                else:
                    lib.qlinear_int4(x.data_ptr(), q.data_ptr(), s.data_ptr(), tensors["zeros"].data_ptr(), None,
                                     None, y.data_ptr(), rows, K, N, K // s.shape[-1], K, N, threads)
                outs.append(y)
            assert_kernel_matches(outs[0], x, tensors)
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2][0], outs[0][0])
            assert torch.equal(outs[3], outs[0][:3])


@pytest.mark.parametrize("method", quant.METHODS)
def test_quantization_error_is_bounded(method):
    """Round-to-nearest: every weight within half a step of its value (steps: max|w|/127, or the group range/15)."""
    torch.manual_seed(0)
    weight = torch.randn(32, 128)
    tensors = quant.quantize_weight(weight, method, group_size=32)
    error = (quant.dequantize(tensors) - weight).abs()
    if method == "int8":
        step = tensors["scales"][:, None]
    else:
        step = tensors["scales"].repeat_interleave(32, dim=1)
    assert bool((error <= 0.5 * step * 1.01 + 1e-6).all())
    assert method == "int8" or tensors["qweight"].shape == (32, 64)


def test_int4_group_fallback():
    assert quant.int4_group_size(5120, 192) == 128
    assert quant.int4_group_size(160, 5120) == 32  # Jamba's dt_proj (dt_rank 160): groups of 32
    assert quant.int4_group_size(48, 32) is None  # no group divides 48 inputs: int8
    assert quant.int4_group_size(64, 18) == 64  # any number of rows
    assert quant.quantize_weight(torch.randn(18, 48), "int4")["qweight"].dtype == torch.int8
    with pytest.raises(quant.QuantizationError, match="groups of 32"):
        quant.quantize_int4(torch.randn(16, 48), 32)


def test_expert_weights_by_index():
    """One expert matrix by its number (prefill's grouped path), and each row through its own expert by an index
    tensor the kernel reads (a decode step's experts)."""
    torch.manual_seed(0)
    weight = torch.randn(3, 32, 64)  # (E, N, K)
    for method in quant.METHODS:
        tensors = quant.quantize_weight(weight, method, group_size=32)
        qw = quant.QuantizedWeight({k: v.clone() for k, v in tensors.items()}).prepare()
        x = torch.randn(4, 64)
        for e in range(3):
            assert_kernel_matches(qw.linear(x, e), x, {k: v[e] for k, v in tensors.items()})
        index = torch.tensor([2, 0, 2, 1])
        out = qw.expert_linear(x, index)
        for r, e in enumerate(index.tolist()):
            assert_kernel_matches(out[r:r + 1], x[r:r + 1], {k: v[e] for k, v in tensors.items()})
        token = x[:1].expand(2, -1)  # a decode step's one token, once per chosen expert (stride 0)
        assert torch.equal(qw.expert_linear(token, index[:2]), qw.expert_linear(token.contiguous(), index[:2]))


def small_weights_model(name: str, vocab_size: int = 128) -> JambaForCausalLM:
    """conftest's random models are chaotic (weights of std 0.15: a 1% weight change moves logits 10%); with std
    0.05, closer to a trained model's, logits respond to weight error in proportion."""
    torch.manual_seed(0)
    model = JambaForCausalLM(make_config(name, hidden_size=64, vocab_size=vocab_size))
    return randomize_(model, 0, scale=0.05).eval()


# Logit error of a tiny quantized model against fp32, as the RMS of the difference over the RMS of the logits. Measured
# on these models over six prompts: int8 1.5-3% (6% for one prompt whose expert choice flips), of which the weights
# alone (fp32 arithmetic on the dequantized weights) give 1.1-2.8%; int4 (groups of 32) 13-17%, weights alone the same.
LOGIT_TOLERANCE = {"int8": 0.08, "int4": 0.25}


def _rms_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("method", quant.METHODS)
@pytest.mark.parametrize("name", ["moe-gqa", "dense-mha-biases-tied"])
def test_quantized_model_logits_near_fp32(method, name, monkeypatch):
    model = small_weights_model(name)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        quant.quantize_model(model, method, group_size=32)
        out = model(ids).logits
        # Every product through kernel_reference instead (float64, the kernels' arithmetic): the model's wiring of
        # the kernels (biases, strided rows, experts by number) changes nothing but fp32 accumulation, which can
        # move a later layer's activation across a rounding boundary (measured up to 0.2%; 1e-7 per product).
        def reference(self, x, bias, index, gather):
            if x.shape[-1] % cpu_kernels.QUANT_K_MULTIPLE:
                return None  # the plain reference serves these (as in the model)
            tensors = {k: v[index] for k, v in self.tensors().items()} if index else self.tensors()
            y = quant.kernel_reference(x, tensors).float()
            return y if bias is None else y + bias
        monkeypatch.setattr(quant.QuantizedWeight, "_cpu_kernel", reference)
        through_reference = model(ids).logits
    assert not any(isinstance(m, torch.nn.Linear) and not n.endswith("router") for n, m in model.named_modules())
    assert 0 < _rms_error(out, ref) < LOGIT_TOLERANCE[method]
    assert _rms_error(out, through_reference) < 0.01


@pytest.mark.parametrize("method", quant.METHODS)
def test_quantized_decode_never_syncs(method):
    """A quantized MoE model's decode steps (experts through the kernels by index) never read a tensor into
    Python, and equal the same steps with the grouped (one expert at a time) path."""
    model = quant.quantize_model(random_model("moe-gqa", hidden_size=64, vocab_size=128), method, group_size=32)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache(1, max_length=8)
        pieces = [model(ids[:, :5], cache=cache).logits]
        with pytest.MonkeyPatch.context() as patch:
            for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
                patch.setattr(torch.Tensor, name, _refuse)
            pieces += [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=0.03 * full.abs().max().item(), rtol=0)


def _refuse(*args, **kwargs):
    raise AssertionError("host synchronisation in a decode step")


@pytest.mark.parametrize("method", quant.METHODS)
def test_quantized_decode_matches_full_forward(method):
    """The cached one-token path (the kernels at one row, the experts by index) agrees with a full forward."""
    model = quant.quantize_model(random_model("moe-gqa", hidden_size=64, vocab_size=128), method, group_size=32)
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = model.make_cache(1)
        model(ids[:, :-1], cache=cache)
        step = model(ids[:, -1:], cache=cache).logits[:, -1]
    assert torch.allclose(step, full, rtol=0, atol=0.02 * full.abs().max().item())


@pytest.mark.parametrize("method", quant.METHODS)
@pytest.mark.parametrize("name", ["moe-gqa", "dense-mha-biases-tied"])
def test_quantize_at_load_equals_quantizing_loaded(tmp_path, method, name):
    model = random_model(name, hidden_size=64, vocab_size=128)
    model.save_pretrained(tmp_path / "fp32")
    loaded = JambaForCausalLM.from_pretrained(tmp_path / "fp32", quantize=method)
    quant.quantize_model(model, method)
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.quantization["method"] == method


@pytest.mark.parametrize("method", quant.METHODS)
@pytest.mark.parametrize("name", ["moe-gqa", "dense-mha-biases-tied"])
def test_quantized_checkpoint_save_load_bit_identical(tmp_path, method, name):
    model = random_model(name, hidden_size=64, vocab_size=128)
    quant.quantize_model(model, method)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["method"] == method
    loaded = JambaForCausalLM.from_pretrained(tmp_path / "q")
    saved, again = dict(quant.logical_state(model)), dict(quant.logical_state(loaded))
    assert saved.keys() == again.keys()
    for name_, value in saved.items():
        other = again[name_]
        if isinstance(value, dict):
            assert value.keys() == other.keys() and all(torch.equal(value[k], other[k]) for k in value), name_
        else:
            assert torch.equal(value, other), name_
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # The quantized checkpoint holds no full-precision copy of a quantized weight.
    from safetensors import safe_open

    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mamba.in_proj.qweight" in names and "model.layers.0.mamba.in_proj.weight" not in names


@pytest.mark.parametrize("method", quant.METHODS)
def test_quantized_weights_share_one_aligned_buffer(method):
    """After quantizing, the weights' tensors lie in one buffer starting on a 2 MB boundary (huge pages), each
    64-byte aligned and with its own shape and dtype; the products give the same bits as from separate tensors."""
    model = quant.quantize_model(random_model("moe-gqa", hidden_size=64, vocab_size=128), method, group_size=32)
    weights = list(quant.quantized_weights(model).values())
    tensors = [t for w in weights for t in w.tensors().values()]
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storages) == 1
    starts = sorted(t.data_ptr() for t in tensors)
    assert starts[0] % quant.ARENA_ALIGN == 0 and all(p % 64 == 0 for p in starts)
    assert all(t.is_contiguous() for t in tensors)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gathered = model(ids).logits
        for w in weights:
            for name, t in w.tensors().items():
                setattr(w, name, t.clone())
        assert torch.equal(model(ids).logits, gathered)


def test_quantized_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = quant.quantize_model(random_model("moe-gqa", hidden_size=64, vocab_size=128), "int4")
    model.save_pretrained(tmp_path / "q")
    with pytest.raises(CheckpointError, match="already quantized to int4"):
        JambaForCausalLM.from_pretrained(tmp_path / "q", quantize="int8")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    del tensors["model.layers.0.mamba.in_proj.scales"]
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.0\.mamba\.in_proj\.scales"):
        JambaForCausalLM.from_pretrained(tmp_path / "q")
    with pytest.raises(quant.QuantizationError, match="unknown quantization 'int3'"):
        JambaForCausalLM.from_pretrained(tmp_path / "q", quantize="int3")


def test_int4_checkpoint_with_fp32_scales_loads(tmp_path):
    """Checkpoints written before int4 scales and zeros moved to bf16 hold them in fp32 (bf16-exact): they load to
    the same model."""
    from safetensors.torch import load_file, save_file

    model = quant.quantize_model(random_model("moe-gqa", hidden_size=64, vocab_size=128), "int4", group_size=32)
    model.save_pretrained(tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert tensors["model.layers.0.mamba.in_proj.scales"].dtype == torch.bfloat16
    save_file({k: v.float() if k.endswith((".scales", ".zeros")) else v for k, v in tensors.items()},
              tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    loaded = JambaForCausalLM.from_pretrained(tmp_path / "q")
    assert loaded.model.layers[0].mamba.in_proj.quantized.scales.dtype == torch.bfloat16
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tied_embedding_lookup_is_quantized_table():
    model = random_model("dense-mha-biases-tied", hidden_size=64, vocab_size=128)
    for method in quant.METHODS:
        m = quant.quantize_model(random_model("dense-mha-biases-tied", hidden_size=64, vocab_size=128), method)
        head = m.lm_head.quantized
        ids = torch.tensor([[3, 50, 127]])
        expected = quant.dequantize(head.tensors())[ids]
        assert torch.equal(m.model.embed_tokens(ids), expected)
        if quant._cpu_library() is not None:  # the compiled lookup (one call per token) gives the reference's bits
            assert torch.equal(m.model.embed_tokens._cpu_kernel(ids), expected)
            assert torch.equal(m.model.embed_tokens(ids[0, 1]), expected[0, 1])
            with pytest.raises(IndexError, match="128 is out of range"):
                m.model.embed_tokens(torch.tensor([1, 128]))
        assert (expected - model.model.embed_tokens(ids)).abs().max() < 0.1 * model.lm_head.weight.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", quant.METHODS)
def test_cuda_bf16_quantized_linear(method):
    torch.manual_seed(0)
    tensors = quant.quantize_weight(torch.randn(64, 256), method)
    qw = quant.QuantizedWeight({k: v.cuda() for k, v in tensors.items()}).prepare()
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), quant.dequantize({k: v.cuda() for k, v in tensors.items()}))
    assert (qw.linear(x).float() - ref).abs().max() <= 2 ** -6 * ref.abs().max()


# ---------------------------------------------------------------------- command line
def _checkpoint_with_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["def f(x):\n    return x\n"] * 10, trainers.BpeTrainer(
        vocab_size=288, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = small_weights_model("moe-gqa", vocab_size=tokenizer.get_vocab_size())
    model.save_pretrained(path, tokenizer=TextTokenizer.from_backend(tokenizer))
    return model


def test_cli_quantize_then_generate_and_eval(tmp_path, capsys):
    from openjamba.cli import main

    _checkpoint_with_tokenizer(tmp_path / "fp32")
    main(["quantize", "--model", str(tmp_path / "fp32"), "--out", str(tmp_path / "q"), "--quantize", "int4",
          "--group-size", "32"])
    assert "int4:" in capsys.readouterr().out
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    stored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert stored["method"] == "int4" and stored["group_size"] == 32 and stored["bits"] == 4
    direct = quant.quantize_model(JambaForCausalLM.from_pretrained(tmp_path / "fp32"), "int4", 32)
    loaded = JambaForCausalLM.from_pretrained(tmp_path / "q")
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, direct(ids).logits)
    (tmp_path / "text.txt").write_text("def f(x):\n    return x\n" * 20)
    main(["eval", "--model", str(tmp_path / "q"), str(tmp_path / "text.txt"), "--context-length", "32", "--json"])
    assert json.loads(capsys.readouterr().out)["perplexity"]["perplexity"] > 1
    main(["generate", "--model", str(tmp_path / "fp32"), "--prompt", "def f(", "--max-new-tokens", "3",
          "--temperature", "0", "--quantize", "int8"])
    assert capsys.readouterr().out.startswith("def f(")


def test_cli_quantize_errors(tmp_path, capsys):
    from openjamba.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tmp_path), "--prompt", "x", "--quantize", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--out must differ"):
        main(["quantize", "--model", str(tmp_path), "--out", str(tmp_path), "--quantize", "int8"])


def test_info_weight_bytes_and_the_paper_single_gpu_context(capsys):
    """Jamba-v0.1 in 8 bits with its Mamba layers in 16 (the model card's recipe) on one 80 GB GPU: about 140K
    tokens of context (the paper). The arithmetic rests on a stated allowance; see docs/quantization.md."""
    from openjamba.cli import main

    main(["info", "--preset", "jamba-v0.1", "--quantize", "int8", "--skip-mamba", "--device-memory", "80GB",
          "--json"])
    report = json.loads(capsys.readouterr().out)
    fit = report["fit"]
    assert 50e9 < report["weight_bytes"]["total"] < 60e9  # 52B parameters, mostly in one byte each
    assert fit["kv_bytes_per_token"] == 4 * 2 * 8 * 128 * 2  # 4 attention layers, 8 K/V heads of 128, bf16
    assert 120_000 < fit["max_context"] < 160_000
    main(["info", "--preset", "jamba-v0.1", "--quantize", "int8", "--skip-mamba", "--device-memory", "80GB"])
    out = capsys.readouterr().out
    assert "largest context" in out and "activation allowance" in out
    bf16 = quant_weight_total("bf16")
    assert bf16 > 100e9  # in 16 bits the weights alone exceed the GPU
    main(["info", "--preset", "jamba-v0.1", "--device-memory", "80GB"])  # was "-N GiB / 114,688 B = 0 tokens"
    assert capsys.readouterr().out.splitlines()[-1].startswith("no context fits: the weights and state are ")
    with pytest.raises(SystemExit, match="memory size"):
        main(["info", "--preset", "tiny", "--device-memory", "eighty"])


def quant_weight_total(dtype: str) -> int:
    from openjamba.config import get_preset
    from openjamba.info import weight_bytes

    return weight_bytes(get_preset("jamba-v0.1"), None, dtype)["total"]


def test_bench_quantized_preset():
    from openjamba.bench import run_bench
    from openjamba.config import get_preset

    report = run_bench(get_preset("tiny"), "tiny", contexts=(40,), phases=("prefill", "decode"), threads=1,
                       repeats=1, decode_tokens=2, progress=False, quantize="int4")
    row = report["rows"][0]
    assert report["quantize"] == "int4" and "errors" not in row and row["decode_ms"] > 0
    assert row["load_peak_mem_bytes"] >= row["model_mem_bytes"] > 0
    with pytest.raises(ValueError, match="unknown quantization"):
        run_bench(get_preset("tiny"), "tiny", quantize="int2", progress=False)


def test_chat_and_serve_load_quantized(tmp_path):
    """`serve` and `chat` share `serve.server.load`: --quantize reaches the model, and the engine generates."""
    from openjamba.cli import build_parser
    from openjamba.serve.server import load

    _checkpoint_with_tokenizer(tmp_path)
    for verb in ("serve", "chat"):
        args = build_parser().parse_args([verb, "--model", str(tmp_path), "--quantize", "int8", "--threads", "1"])
        model, tokenizer, engine = load(args)
        assert model.quantization["method"] == "int8"
    ids = torch.tensor([tokenizer.encode("def f(")])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
