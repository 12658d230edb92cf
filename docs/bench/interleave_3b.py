"""fp32, int8 and int4 decode of Jamba Reasoning 3B's shape (random weights) in ONE process, interleaved: each round
times a few tokens of each format back to back, with a read-bandwidth probe, so every ratio compares formats
under the same memory conditions (this VM's read rate switches between ~35 and ~65 GB/s from minute to minute).

From the repository root: python docs/bench/interleave_3b.py THREADS ROUNDS TOKENS_PER_ROUND (~17 GB of RAM)."""

import json
import statistics
import sys
import time

import torch

from openjamba.bench.measure import read_bytes_per_s
from openjamba.bench.runners import random_quantized_model
from openjamba.config import get_preset
from openjamba.generate import decode_step, prefill
from openjamba.model import JambaForCausalLM

threads, rounds, per = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
config = get_preset("jamba-reasoning-3b")
torch.manual_seed(0)
with torch.no_grad():
    models = {"fp32": JambaForCausalLM(config).eval()}
    for q in ("int8", "int4"):
        models[q] = random_quantized_model(config, q)
ids = torch.randint(0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
caches, tokens = {}, {}
with torch.no_grad():
    for name, m in models.items():
        caches[name] = m.make_cache(1, 128 + rounds * per + 8)
        tokens[name] = prefill(m, ids, caches[name], 2048).argmax(-1)
        tokens[name] = decode_step(m, tokens[name], caches[name]).argmax(-1)  # warm-up step
    table = []
    for _ in range(rounds):
        row = {"probe_GBs": read_bytes_per_s(torch.device("cpu"), budget_s=0.5) / 1e9}
        for name, m in models.items():
            start = time.perf_counter()
            for _ in range(per):
                tokens[name] = decode_step(m, tokens[name], caches[name]).argmax(-1)
            row[name] = (time.perf_counter() - start) * 1e3 / per
        row["int8_x"], row["int4_x"] = row["fp32"] / row["int8"], row["fp32"] / row["int4"]
        table.append(row)
        print(" ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
summary = {k: statistics.median(r[k] for r in table) for k in table[0]}
print("median:", " ".join(f"{k} {v:.2f}" for k, v in summary.items()))
print(json.dumps({"threads": threads, "rounds": table, "median": summary}))
