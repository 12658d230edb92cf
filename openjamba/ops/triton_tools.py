"""Tools for the Triton kernels: an ahead-of-time compile check that needs no GPU, and a CUDA benchmark.

    python -m openjamba.ops.triton_tools compile [--arch 90] [--state 16 64]   # registers and spills per kernel
    python -m openjamba.ops.triton_tools bench [--batch 8 ...]   # CUDA only: time and effective HBM bandwidth

Each prints a table, then one JSON line for scripts.

`compile` runs Triton's real code generator and ptxas (bundled with the triton wheel) for the given GPU target,
so it catches what the CPU interpreter cannot: compiled-mode typing rules, and register pressure (registers and
spills as `ptxas -v` reports them). It does not run anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time

import torch
import triton

from ..runtime import SHORT_DTYPES, parse_dtype
from . import triton_kernels as tk

# Pointer arguments that carry activations (in the I/O dtype); every other pointer is fp32 state or a partial sum.
ACTIVATION_POINTERS = {
    "u_ptr", "delta_ptr", "z_ptr", "B_ptr", "C_ptr", "y_ptr", "dy_ptr", "du_ptr", "ddelta_ptr", "dz_ptr",
}


def _signature(kernel, io_type: str) -> dict[str, str]:
    """Triton signature of a kernel as the launchers call it: all flags on, activations in `io_type`."""
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = io_type if p.name in ACTIVATION_POINTERS else "*fp32"
        else:
            sig[p.name] = "i32"
    return sig


def ptxas_path(arch: int = 90) -> str | None:
    """The ptxas Triton itself uses for this architecture (bundled with the wheel), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except Exception:  # no NVIDIA backend in this triton build, or an API that moved
        return None
    return path if path and os.path.exists(path) else None


def _resource_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spills as `ptxas -v` reports them for the PTX Triton generated; empty without ptxas."""
    ptxas = ptxas_path(arch)
    if ptxas is None:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        report = subprocess.run([ptxas, f"-arch={gpu}", "-v", f.name, "-o", os.devnull], capture_output=True,
                                text=True).stderr
    fields = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
              "spill_loads": r"(\d+) bytes spill loads"}
    return {name: int(m.group(1)) for name, pattern in fields.items() if (m := re.search(pattern, report))}


def compile_report(
    arch: int = 90, state: int = 16, io_types: tuple[str, ...] = ("*bf16", "*fp32"), block_d: int | None = None,
    chunk: int = tk.CHUNK, num_warps: int = tk.NUM_WARPS,
) -> list[dict]:
    """Compile the three kernels for sm_<arch> (default: the production settings), once with every optional input
    present (the mixer's case, the one whose registers matter) and once with none; one row per compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_d = block_d or tk.default_block_d(state)
    tiles = dict(BLOCK_D=block_d, BLOCK_N=tk._block_n(state))
    rows = []
    for io_type in io_types:
        for inputs in ("all", "none"):
            on = inputs == "all"
            flags = dict(HAS_D=on, HAS_Z=on, HAS_BIAS=on, SOFTPLUS=on)
            kernels = {
                "scan_fwd": (tk._scan_fwd_kernel, dict(CHUNK=chunk, HAS_H0=on, SAVE_CKPT=on, **tiles, **flags)),
                "scan_bwd": (tk._scan_bwd_kernel, dict(CHUNK=chunk, HAS_DHT=on, **tiles, **flags,
                                                        ATOMIC_DBC=tk.atomic_dbc(state, block_d))),
                "state_update": (tk._state_update_kernel, dict(**tiles, **flags)),
            }
            for name, (kernel, constexprs) in kernels.items():
                start = time.perf_counter()
                source = ASTSource(kernel, _signature(kernel, io_type), constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                          options=dict(num_warps=num_warps))
                rows.append(dict(kernel=name, io=io_type.lstrip("*"), optional_inputs=inputs, arch=arch, state=state,
                                 **tiles, num_warps=num_warps, seconds=round(time.perf_counter() - start, 2),
                                 **_resource_usage(compiled.asm["ptx"], arch)))
    return rows


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def benchmark(
    batch: int = 8, length: int = 2048, channels: int = 8192, state: int = 16, dtype: torch.dtype = torch.bfloat16,
    backward: bool = True,
) -> dict:
    """Forward (no grad) and backward time of `triton_kernels.selective_scan` on the current CUDA device.

    Effective bandwidth counts only the bytes an ideal fused kernel must move: forward reads u, delta, z, B, C and
    writes y; backward reads u, delta, z, dy, B, C and writes du, ddelta, dz, dB, dC. (Checkpoints, the backward
    scratch and the dB/dC partial sums are extra traffic the figure does not credit.) A, D and the bias are
    negligible. Inputs are laid out as the mixer produces them: u and z are halves of one in_proj output.
    fwd_bwd_peak_extra_mb: memory one forward + backward adds on top of the inputs (y, dy, checkpoints, the
    backward scratch, partial sums, gradients).
    """
    ok, why = tk.is_available()
    if not ok:
        raise RuntimeError(f"the benchmark needs the compiled kernels on a CUDA device: {why}")
    device = torch.device("cuda")
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=dt)

    u, z = randn(batch, length, 2 * channels).chunk(2, dim=-1)
    inputs = dict(u=u, delta=randn(batch, length, channels) - 3, B=randn(batch, length, state),
                  C=randn(batch, length, state), z=z, D=randn(channels, dt=torch.float32),
                  A=-torch.arange(1, state + 1, device=device, dtype=torch.float32).repeat(channels, 1),
                  delta_bias=randn(channels, dt=torch.float32))
    result = dict(batch=batch, length=length, channels=channels, state=state, dtype=str(dtype).split(".")[-1],
                  device=torch.cuda.get_device_name(device))
    streamed = [inputs[k] for k in ("u", "delta", "z", "B", "C")]

    with torch.no_grad():
        y = tk.selective_scan(**inputs, delta_softplus=True)
        fwd_ms = triton.testing.do_bench(lambda: tk.selective_scan(**inputs, delta_softplus=True))
    fwd_bytes = _nbytes(*streamed, y)
    result.update(fwd_ms=round(fwd_ms, 4), fwd_gbps=round(fwd_bytes / fwd_ms / 1e6, 1))

    if backward:
        leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}  # u, z stay strided views
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        y = tk.selective_scan(**leaves, delta_softplus=True)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, list(leaves.values()), dy, retain_graph=True)
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20  # before do_bench's L2-flush buffer
        del grads
        bwd_ms = triton.testing.do_bench(lambda: torch.autograd.grad(y, list(leaves.values()), dy, retain_graph=True))
        bwd_bytes = 2 * _nbytes(*streamed) + _nbytes(dy)  # read the inputs and dy, write a gradient per input
        result.update(bwd_ms=round(bwd_ms, 4), bwd_gbps=round(bwd_bytes / bwd_ms / 1e6, 1),
                      fwd_bwd_peak_extra_mb=round(peak_mb, 1))
    return result


def _print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    widths = {k: max(len(k), *(len(str(row.get(k, ""))) for row in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for row in rows:
        print("  ".join(str(row.get(k, "")).ljust(widths[k]) for k in keys))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m openjamba.ops.triton_tools", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help="compile the kernels for a GPU target (no GPU needed)")
    comp.add_argument("--arch", type=int, default=90, help="compute capability as an int: 90 = H100")
    comp.add_argument("--state", type=int, nargs="+", default=[16], help="one or more state sizes")
    comp.add_argument("--block-d", type=int, default=None, help="default: what the launchers use for this state size")
    comp.add_argument("--chunk", type=int, default=tk.CHUNK)
    comp.add_argument("--num-warps", type=int, default=tk.NUM_WARPS)
    comp.add_argument("--io", nargs="+", default=["bf16", "fp32"], help="activation dtypes (Triton names)")
    bench = sub.add_parser("bench", help="time the scan on the CUDA device")
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--length", type=int, default=2048)
    bench.add_argument("--channels", type=int, default=8192)
    bench.add_argument("--state", type=int, default=16)
    bench.add_argument("--dtype", choices=SHORT_DTYPES, default="bf16")
    bench.add_argument("--no-backward", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "compile":
        rows = [row for state in args.state for row in compile_report(
            args.arch, state, tuple(f"*{io}" for io in args.io), args.block_d, args.chunk, args.num_warps)]
    else:
        dtype = parse_dtype(args.dtype)
        try:
            rows = [benchmark(args.batch, args.length, args.channels, args.state, dtype, not args.no_backward)]
        except RuntimeError as err:  # no CUDA device here: one line, not a traceback
            raise SystemExit(f"{parser.prog} bench: error: {err}") from None
    _print_table(rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
