"""The bound on the engine's attention K/V (`openjamba serve --kv-cache-memory`), counted in tokens of the batch's
grid.

The running batch's K/V share one column axis (cache.py): every row ends at the last column, so the batch holds
rows x columns tokens of K/V per attention layer, columns being its longest row's length. The engine counts every
request in flight as a row of that grid: the rows decoding, the rows joining them, and the prompts being
prefilled at their full length (they join the batch when read). A set of rows `fits` when its grid, with the
next decode step's column, is within the budget:

    rows x (longest row + 1) <= tokens

Admission keeps the grid within it (a prompt that does not fit waits), a decode step that would pass it preempts
the most recently submitted row first, and the allocation follows the same count: a prompt's own cache holds
exactly its tokens and the next step's, and the batch's capacity (which would otherwise grow by doubling) is
bounded by `tokens // rows` columns. So the K/V held, prefill caches included, is at most the budget: the batch's
R rows x tokens // N columns and the other N - R rows' caches of at most longest + 1 <= tokens // N columns each.
A join, a resize or a row leaving copies the batch's K/V one layer's K or V at a time, so it briefly holds one such
tensor more: 1 / (2 x attention layers) of the bound (1/8 for Jamba Mini's 4 attention layers).
"""

from __future__ import annotations

import logging
import sys
import traceback

import torch

from ..cache import HybridCache, RowState
from ..generate import prefill
from .requests import Request

# Of the device memory free after loading: the rest for activations, the allocator and the copy of one layer's K or V
# while the batch is re-allocated (see above).
AUTO_FRACTION = 0.8


def default_kv_cache_bytes(device: str | torch.device, store_bytes: int,
                           fraction: float = AUTO_FRACTION) -> int | None:
    """`--kv-cache-memory auto`: on a CUDA device, `fraction` (`--gpu-memory-utilization`, default `AUTO_FRACTION`)
    of its memory free once the weights are loaded, less the state store's bound (its states live on the device
    too); None (unbounded) elsewhere, or if nothing would be left. On a CPU the memory is the host's, shared with
    everything else the machine runs, so the bound is the operator's to set."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(free * fraction) - store_bytes
    if budget <= 0:
        logging.getLogger("openjamba.serve").warning(
            "--kv-cache-memory auto: %.2f GiB free after loading, less --state-store, leaves nothing for the K/V; "
            "running unbounded (give --kv-cache-memory SIZE or a smaller --state-store)", free / 2**30)
        return None
    return budget


class KVBudget:
    """`max_bytes` of attention K/V for the model's layers in their K/V dtype, as `tokens` of the batch's grid."""

    def __init__(self, model, max_bytes: int, kv_dtype: torch.dtype | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the K/V budget must be positive, got {max_bytes} bytes")
        probe = model.make_cache(1, kv_dtype=kv_dtype)
        columns = probe.kv_capacity()
        self.max_bytes = max_bytes
        self.bytes_per_token = probe.kv_nbytes() // columns if columns else 0  # every attention layer's K and V
        # A model without attention layers holds no K/V: nothing to bound.
        self.tokens = max_bytes // self.bytes_per_token if self.bytes_per_token else sys.maxsize

    def fits(self, rows: int, columns: int) -> bool:
        """Whether `rows` rows whose longest holds `columns` tokens can take one more decode step."""
        return rows == 0 or rows * (columns + 1) <= self.tokens

    @staticmethod
    def need(prompt_tokens: int, max_tokens: int) -> int:
        """The K/V tokens a request's row holds at most: the prompt and all but the last generated token, and the
        prompt's cache has room for one step."""
        return prompt_tokens + max(max_tokens - 1, 1)

    def most_to_generate(self, prompt_tokens: int) -> int:
        """The largest max_tokens a prompt of `prompt_tokens` can run with alone (0: none; `too_long` says why)."""
        return self.tokens - prompt_tokens + 1 if self.need(prompt_tokens, 1) <= self.tokens else 0

    def too_long(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request could never run within the budget even alone (`need` over it), else None."""
        need = self.need(prompt_tokens, max_tokens)
        if need <= self.tokens:
            return None
        # "to generate", not a field name: /v1/responses calls it max_output_tokens
        return (f"the prompt's {prompt_tokens} tokens plus {max_tokens} to generate need up to {need} tokens of "
                f"attention K/V ({need * self.bytes_per_token:,} bytes), more than the server's K/V cache bound of "
                f"{self.tokens} tokens ({self.max_bytes:,} bytes)")

    def capacity(self, rows: int, columns: int, held: int) -> int:
        """The batch's K/V capacity in columns, given `rows` rows in flight, its `columns` in use and `held`
        allocated: room for the next step (growing by doubling as `KVCache.append` does, but never past its share,
        `tokens // rows`), trimmed to that share when rows joined since it grew."""
        limit = max(self.tokens // max(rows, 1), columns + 1)
        if held < columns + 1:
            return min(max(columns + 1, 2 * held), limit)
        return min(held, limit)


class KVBudgeting:
    """The engine's side of the budget (a base of `Engine`, whose state it reads: `kv_budget`, the batch and the
    requests in flight): the admission check, the caches' sizes, and preemption and resumption. Every method is a
    no-op or a yes without a budget."""

    def _grid(self) -> tuple[int, int]:
        """(rows, longest row's tokens) of the requests in flight as the batch will hold them: prompts being
        prefilled count at their full length."""
        lengths = [r.length() for r in self._prefilling] + [cache.seq_len for _, cache in self._joining]
        rows = len(self._running) + len(self._prefilling) + self._joining_count()
        return rows, max(lengths + [self._batch.seq_len if self._batch is not None else 0])

    def _fits(self, request: Request) -> bool:
        """Whether `request` can join the requests in flight within the K/V budget (else it waits)."""
        if self.kv_budget is None:
            return True
        rows, columns = self._grid()
        return self.kv_budget.fits(rows + 1, max(columns, request.length()))

    def _share(self) -> int | None:
        """The most K/V columns the batch may allocate: the budget over the rows in flight (None: unbounded)."""
        return self.kv_budget.tokens // max(self._grid()[0], 1) if self.kv_budget is not None else None

    def _capacity_for(self, columns: int) -> int | None:
        """The capacity of a cache for rows of at most `columns` tokens: exactly those and the next step's under a
        budget, else None (the cache's default headroom)."""
        return columns + 1 if self.kv_budget is not None else None

    def _sized(self, cache: HybridCache, columns: int) -> HybridCache:
        """`cache` (new) with the capacity of `_capacity_for(columns)` under a budget."""
        if self.kv_budget is not None:
            cache.resize_kv(columns + 1)
        return cache

    def _size_batch(self) -> None:
        """Room for the next step in the batch's K/V within its share of the budget (`KVBudget.capacity`)."""
        if self.kv_budget is None or self._batch is None:
            return
        held = self._batch.kv_capacity()
        capacity = self.kv_budget.capacity(self._grid()[0], self._batch.seq_len, held)
        if capacity != held:
            self._batch.resize_kv(capacity)

    def _preempt_to_fit(self) -> None:
        """While the requests in flight would pass the K/V budget at the next step, the most recently submitted row
        (decoding or joining) leaves the batch with its exact state and waits at the front of the queue."""
        if self.kv_budget is None:
            return
        while not self.kv_budget.fits(*self._grid()):
            rows = self._running + [r for requests, _ in self._joining for r in requests]
            if not rows:
                return
            self._preempt(max(rows, key=lambda r: r.id))

    def _preempt(self, request: Request) -> None:
        """Take a running or joining row out with its state (`_state_of`); the request waits first in line."""
        if any(r is request for r in self._running):
            row = next(i for i, r in enumerate(self._running) if r is request)
            request.resume = self._state_of(self._batch, row)
            self._remove_rows([row])
        else:
            requests, cache = next((rs, c) for rs, c in self._joining if any(r is request for r in rs))
            row = next(i for i, r in enumerate(requests) if r is request)
            request.resume = self._state_of(cache, row)
            self._drop_joining(requests, cache, [row])
        self._counters["preemptions_total"] += 1
        with self._lock:
            self._waiting.appendleft(request)

    def _state_of(self, cache: HybridCache, row: int) -> RowState | None:
        """A preempted row's exact state after prompt + output[:-1], in host memory (a GPU's is for the batch);
        None if it cannot be copied out: the request then re-reads its tokens when it resumes."""
        try:
            return cache.row_state(row).to("cpu")
        except Exception as err:  # noqa: BLE001 - the request goes on without it
            traceback.print_exception(err)
            return None

    def _resume(self, request: Request) -> None:
        """A preempted request joins the batch again from its exact state, nothing computed again (its sampler goes
        on where it was); without that state, from its tokens re-read (from the longest stored state they extend),
        all in this iteration: a fallback, not the budget's usual path."""
        tokens = request.prompt + request.output[:-1]  # the last output token is the next step's input
        state, done = request.resume, len(tokens)
        request.resume = None
        try:
            if state is None:
                found = self.store.lookup(tokens) if self.reuse else None
                state = found.state if found is not None else None
                done = found.length if state is not None else 0
            if state is not None:
                cache = HybridCache.from_row_state(self.model, state, kv_dtype=self.kv_dtype,
                                                   capacity=self._capacity_for(len(tokens)))
            else:
                cache = self._sized(self.model.make_cache(1, kv_dtype=self.kv_dtype), len(tokens))
            if done < len(tokens):
                prefill(self.model, torch.tensor([tokens[done:]]), cache, chunk_size=self.prefill_chunk)
        except Exception as err:  # noqa: BLE001 - reported to the request, the engine goes on
            self._fail([request], err)
            return
        self._joining.append(([request], cache))
