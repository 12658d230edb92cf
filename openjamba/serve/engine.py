"""The serving engine: one loop in a background thread batching every running request into one decode step.

Each iteration of the loop
  1. applies cancellations (a cancelled row leaves the batch at once, its memory freed),
  2. admits waiting requests while fewer than `max_running` are in flight, each starting from the longest stored
     state its prompt extends (serve/state_store.py), restored when its first chunk runs (several resumed at once
     into one cache: `HybridCache.from_row_states`); a request asking for prompt logprobs starts from nothing and
     is prefilled alone, every position's logits scored (serve/scoring.py); a prompt that extends one being
     prefilled waits until that one's state is stored (the n choices of a prompt are prefilled once); under a
     K/V bound (`kv_cache_bytes`, serve/kv_budget.py) the first in line waits until its row fits, and then, if
     the batch's next column would pass the bound, the most recently submitted rows step out with their exact
     states to the front of the queue (preempted; re-admitted, they rejoin the batch where they left it),
  3. prefills admitted prompts, oldest first, within the iteration's token budget: `step_token_budget` tokens
     (default `prefill_chunk`) less one per running row, the tokens of this iteration's decode step, as vLLM's
     `max_num_batched_tokens` counts them (8 rows decoding under a budget of 512 leave a 504-token chunk), and
     never more than `prefill_chunk`; so a long prompt delays the running streams by one chunk per step, not by
     its whole length (prompts that fit the budget together go through one forward: from
     nothing, left-padded, or from stored states with as many tokens left); a prompt whose prefill is done
     samples its first token at once, and its row joins the running batch at the start of the next iteration
     (`HybridCache.add_rows`: rows keep their own lengths), so the iteration that runs a prompt's last chunk does
     no more than any other: one chunk and one step,
  4. runs one decode step for all running rows, samples all rows in one pass (serve/sampling.py), each with its
     own parameters and generator, and retires the rows that finished.

Events go to each request's `on_event` callback, called from the engine thread: a `TokenEvent` per generated
token (a finishing stop token included), then one `FinishEvent`. After each iteration's events the loop calls the
step listeners (`add_step_listener`), so a consumer that buffers events (the HTTP server's event loop) can wake
once per step rather than once per token. A failure inside a step finishes the requests it touched with reason
"error" and the loop goes on.

The loop runs on a thread of its own with `threads` intra-op threads; whoever loads the model for an engine
should do it on a thread that then exits (`runtime.on_fresh_thread`, which says why) and keep its own thread to
one intra-op thread, as `openjamba serve`, `chat` and `bench-serve` do. The loop also keeps freed memory in the
process (`runtime.hold_freed_memory`).

Sampling is per row: a request's `torch.Generator` (seeded from `seed`, else random) is used only for its own
tokens, so a seeded request samples the same tokens whatever else runs. Rows of one batch are computed together,
and a batched matmul rounds differently in the last bits from a one-row one (fp32 CPU BLAS; on cpu-bench the
logits of 32 batched rows differ from their solo runs by at most 1.4e-6 at a scale of 1.7), so a row's logits
equal its solo logits to rounding, not bitwise: greedy tokens are the same unless the two best candidates tie to
within that rounding (the smallest top-2 gap among those 32 rows was 7e-4). The same holds for reuse on and off,
which changes where the prompt is split into chunks.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from ..cache import HybridCache, RowState
from ..generate import decode_step, prefill
from ..runtime import hold_freed_memory
from .kv_budget import KVBudget, KVBudgeting
from .metrics import LATENCY, Histogram
from .requests import EngineFull, Event, FinishEvent, Iteration, Request, TokenEvent, starts_with
from .sampling import RowSampling, Sampled, SamplingParams, sample_rows
from .scoring import prefill_scored
from .state_store import StateStore

__all__ = ["Engine", "EngineFull", "Event", "FinishEvent", "Iteration", "SamplingParams", "TokenEvent"]


class Engine(KVBudgeting):
    ITERATIONS_KEPT = 4096  # `iterations()`: about 20 s of 5 ms decode steps

    def __init__(
        self,
        model,
        *,
        max_running: int = 32,
        max_waiting: int = 256,
        prefill_chunk: int = 512,
        step_token_budget: int | None = None,
        reuse: bool = True,
        store_bytes: int = 1 << 30,
        max_context: int | None = None,
        eos_token_ids: list[int] | None = None,
        kv_dtype: torch.dtype | None = None,
        kv_cache_bytes: int | None = None,
        threads: int | None = None,
        seed: int | None = None,
    ) -> None:
        """`step_token_budget` (default prefill_chunk): tokens one iteration may process, its decode rows included
        (prefill gets the rest, at most `prefill_chunk`, at least 1: `prefill_tokens`). `store_bytes`: the state
        store's bound. `max_context`: the limit of prompt + max_tokens (default the config's max_position_embeddings).
        `eos_token_ids`: default the config's. `kv_dtype`: as `make_cache`'s. `kv_cache_bytes`: the bound on the
        attention K/V of the requests in flight (serve/kv_budget.py; default None, unbounded). `threads`: the loop
        thread's intra-op threads (default: `torch.get_num_threads()` of the thread creating the engine). `seed`
        (vLLM's `--seed`): requests without a seed take theirs from a stream it seeds, in the order they are
        admitted, so a fresh engine given the same requests in the same order samples the same tokens."""
        threads = threads if threads is not None else torch.get_num_threads()
        for name, value in (("max_running", max_running), ("prefill_chunk", prefill_chunk), ("threads", threads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.model = model
        self.config = model.config
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.step_token_budget = step_token_budget if step_token_budget is not None else prefill_chunk
        self.threads = threads
        self.reuse = reuse
        self._seeds = random.Random(seed) if seed is not None else None
        self.store = StateStore(store_bytes)
        self.max_context = max_context if max_context is not None else self.config.max_position_embeddings
        self.eos_token_ids = list(self.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.kv_dtype = kv_dtype
        self.kv_budget = KVBudget(model, kv_cache_bytes, kv_dtype) if kv_cache_bytes is not None else None

        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._cancels: dict[int, str] = {}  # request id -> the reason it finishes with
        self._abort_all = False
        self._next_id = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_listeners: list[Callable[[], None]] = []
        # Owned by the engine thread:
        self._prefilling: list[Request] = []
        self._running: list[Request] = []  # row i of self._batch is self._running[i]
        self._joining: list[tuple[list[Request], HybridCache]] = []  # prefilled rows joining at the next iteration
        self._batch: HybridCache | None = None
        self._counters = dict(generated_tokens_total=0, prompt_tokens_total=0, cached_prompt_tokens_total=0,
                              queue_time_seconds_sum=0.0, queue_time_seconds_count=0, requests_finished_total=0,
                              requests_failed_total=0, steps_total=0, store_lookups_total=0, store_hits_total=0,
                              preemptions_total=0)
        self._histograms = dict(iteration_seconds=Histogram(), prefill_seconds=Histogram(),
                                decode_step_seconds=Histogram(), time_to_first_token_seconds=Histogram(LATENCY),
                                request_seconds=Histogram(LATENCY))
        self._iterations: deque[Iteration] = deque(maxlen=self.ITERATIONS_KEPT)
        self._prefilled_now = 0  # prompt tokens prefilled in the current iteration
        self._service_seconds = 1.0  # moving average of admission-to-finish time, for Retry-After

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="openjamba-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; requests still in flight finish with reason "cancelled"."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is threading.current_thread():  # stop() from an event callback: the loop ends after it
            return
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._shutdown()
            self._after_step()
        self.store.close()  # the disk tier's queued writes

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ the API the server and chat call
    def submit(
        self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None],
        keep_states_at: Sequence[int] = (),
    ) -> int:
        """Queue a request; its events go to `on_event` (from the engine thread). Returns its id.

        `keep_states_at`: prompt positions (token counts) where the state is worth keeping besides the prompt's
        end, e.g. the end of a chat's system message, so that the next conversation sharing it starts there.
        ValueError for bad input, EngineFull when the waiting queue is full."""
        prompt = self._check(prompt, params)
        keep_at = list(keep_states_at)
        if any(isinstance(n, bool) or not isinstance(n, int) for n in keep_at):
            raise ValueError(f"keep_states_at must be token counts (integers), got {keep_at!r}")
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            if len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"the engine's queue is full ({self.max_waiting} waiting requests)",
                                 retry_after=self._retry_after())
            request = Request(self._next_id, prompt, params, on_event, time.monotonic(),
                               keep_at=keep_at)
            self._next_id += 1
            self._waiting.append(request)
            self._lock.notify_all()
        return request.id

    def is_running(self) -> bool:
        """Whether the loop is serving: started, not stopped, its thread alive."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def cancel(self, request_id: int) -> None:
        """Finish a request with reason "cancelled"; its row leaves the batch before the next step."""
        with self._lock:
            self._cancels.setdefault(request_id, "cancelled")
            self._lock.notify_all()

    def abort_all(self) -> None:
        """Finish every request submitted so far, waiting or in flight, with reason "abort" before the next step (a
        server shutting down ends its streams in order instead of dropping their connections)."""
        with self._lock:
            self._abort_all = True
            self._lock.notify_all()

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[Event]:
        """Submit and yield its events as they come, in the caller's thread (the terminal chat); closing the
        iterator early cancels the request."""
        events: queue.Queue[Event] = queue.Queue()
        request_id = self.submit(prompt, params, events.put)
        finished = False
        try:
            while not finished:
                event = events.get()
                finished = isinstance(event, FinishEvent)
                yield event
        finally:
            if not finished:
                self.cancel(request_id)

    def add_step_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback()` on the engine thread after each iteration of the loop, once its events have been sent
        (and once after the last events when the engine stops): the HTTP server buffers the events of a step and
        wakes its event loop once for all of them. Exceptions from it are ignored."""
        self._step_listeners.append(callback)

    def stats(self) -> dict:
        """Gauges and counters (read without stopping the loop: each value is current, not all at one instant)."""
        with self._lock:
            waiting = len(self._waiting)
        batch = self._batch
        return dict(running=len(self._running) + self._joining_count(), prefilling=len(self._prefilling),
                    waiting=waiting, **self._counters, store_bytes=self.store.nbytes, store_entries=len(self.store),
                    store_max_bytes=self.store.max_bytes, batch_cache_bytes=batch.nbytes() if batch else 0,
                    kv_cache_bytes=self.kv_cache_bytes(),
                    kv_cache_max_bytes=self.kv_budget.max_bytes if self.kv_budget is not None else 0,
                    histograms={name: h.snapshot() for name, h in self._histograms.items()})

    def kv_cache_bytes(self) -> int:
        """Attention K/V allocated for the requests in flight: the batch's, and the caches of the rows joining it and
        of the prompts being prefilled (what `kv_cache_bytes` bounds). Exact when called on the engine's thread (a
        step listener); from another thread, a value of about now."""
        caches = [self._batch] + [cache for _, cache in list(self._joining)] + [r.cache for r in list(self._prefilling)]
        return sum(cache.kv_nbytes() for cache in caches if cache is not None)

    def iterations(self) -> list[Iteration]:
        """The last `ITERATIONS_KEPT` iterations of the loop, oldest first: where the time between two tokens of a
        stream went (bench-serve's interference phase attributes its gaps with them)."""
        return list(self._iterations)

    def export_state(self, tokens: list[int]) -> dict[str, torch.Tensor] | None:
        """The state exactly after `tokens` (safetensors-serialisable), or None if no stored state is a prefix of
        them. A stored prefix is extended to all of `tokens` here, in the caller's thread."""
        if not tokens:
            return None
        found = self.store.lookup(tokens)
        if found.state is None:
            return None
        state = found.state
        if found.length < len(tokens):
            with torch.no_grad():
                cache = HybridCache.from_row_state(self.model, state, kv_dtype=self.kv_dtype)
                rest = torch.tensor(tokens[found.length:], dtype=torch.long)[None]
                logits = prefill(self.model, rest, cache, self.prefill_chunk)
                state = cache.row_state(0, logits[0])
            self.store.put(tokens, state)
        return state.to_dict()

    def import_state(self, tokens: list[int], state: dict[str, torch.Tensor]) -> None:
        """Store a state saved by `export_state` for `tokens`: a later request extending them starts from it."""
        row = RowState.from_dict(state, self.model)
        if row.length != len(tokens):
            raise ValueError(f"the state covers {row.length} tokens, not the {len(tokens)} given")
        if row.logits is None:
            raise ValueError("the state has no logits: not saved by export_state")
        self.store.put(list(tokens), row)

    def _retry_after(self) -> float:
        """Seconds until a place in the queue is likely free: a running request finishes every (its average time
        in the engine) / max_running seconds. At least one second."""
        return max(1.0, round(self._service_seconds / self.max_running, 1))

    # ------------------------------------------------------------------ input checks
    def _check(self, prompt, params: SamplingParams) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("the prompt must be a non-empty list of token ids")
        vocab = self.config.vocab_size
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"token id {t!r} is not in the vocabulary (0..{vocab - 1})")
        params.check(vocab)
        if len(prompt) + params.max_tokens > self.max_context:
            raise ValueError(f"the prompt's {len(prompt)} tokens plus max_tokens {params.max_tokens} exceed the "
                             f"context of {self.max_context} tokens")
        if self.kv_budget is not None and (why := self.kv_budget.too_long(len(prompt), params.max_tokens)):
            raise ValueError(why)  # it would wait forever
        return list(prompt)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        hold_freed_memory()
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stopping and not self._has_work():
                        self._lock.wait()
                    if self._stopping:
                        break
                    cancels, self._cancels = self._cancels, {}
                    if self._abort_all:
                        self._abort_all = False
                        cancels.update((r.id, "abort") for r in self._submitted())
                try:
                    start = time.perf_counter()
                    self._apply_cancels(cancels)
                    self._admit()
                    self._preempt_to_fit()
                    self._join()
                    self._size_batch()
                    before_prefill = time.perf_counter()
                    self._prefilled_now = 0
                    self._prefill_some()
                    before_decode = time.perf_counter()
                    rows = len(self._running)
                    self._decode()
                    self._timed(start, before_prefill, before_decode, rows)
                except Exception as err:  # noqa: BLE001 - a failure outside a step: fail what is in flight, go on
                    requests = self._prefilling + self._running + [r for rs, _ in self._joining for r in rs]
                    self._prefilling, self._running, self._joining, self._batch = [], [], [], None
                    self._fail(requests, err)
                self._after_step()
            self._shutdown()
            self._after_step()
        self.store.close()  # the disk tier's queued writes

    def _after_step(self) -> None:
        for callback in self._step_listeners:
            try:
                callback()
            except Exception:  # noqa: BLE001 - a broken listener must not stop the engine
                pass

    def _timed(self, start: float, before_prefill: float, before_decode: float, rows: int) -> None:
        """Record an iteration's times: the histograms of /metrics and the `iterations()` log."""
        end = time.perf_counter()
        prefill_s, decode_s = before_decode - before_prefill, end - before_decode
        self._histograms["iteration_seconds"].observe(end - start)
        if self._prefilled_now:
            self._histograms["prefill_seconds"].observe(prefill_s)
        if rows:
            self._histograms["decode_step_seconds"].observe(decode_s)
        self._iterations.append(Iteration(start, prefill_s, self._prefilled_now, decode_s, rows, end))

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running or self._joining or self._cancels
                    or self._abort_all)

    def _submitted(self) -> list[Request]:
        """Every request not finished: waiting, being prefilled, joining or decoding."""
        return [*self._waiting, *self._prefilling, *(r for rs, _ in self._joining for r in rs), *self._running]

    def _joining_count(self) -> int:
        return sum(len(requests) for requests, _ in self._joining)

    def _apply_cancels(self, ids: dict[int, str]) -> None:
        """Finish the requests `ids` names with the reason it gives."""
        if not ids:
            return
        with self._lock:
            queued = [r for r in self._waiting if r.id in ids]
            for request in queued:
                self._waiting.remove(request)
        for request in queued + [r for r in self._prefilling if r.id in ids]:
            if request in self._prefilling:
                self._prefilling.remove(request)
            self._finish(request, ids[request.id])
        rows = [i for i, r in enumerate(self._running) if r.id in ids]
        cancelled = [self._running[i] for i in rows]
        self._remove_rows(rows)
        for requests, cache in list(self._joining):
            gone = [i for i, r in enumerate(requests) if r.id in ids]
            cancelled += [requests[i] for i in gone]
            self._drop_joining(requests, cache, gone)
        for request in cancelled:
            self._finish(request, ids[request.id])

    def _drop_joining(self, requests: list[Request], cache: HybridCache, rows: list[int]) -> None:
        """Take rows out of a group waiting to join the batch (the group is gone with its last row)."""
        if not rows:
            return
        requests[:] = [r for i, r in enumerate(requests) if i not in rows]
        if requests:
            cache.remove_rows(rows)
        else:
            self._joining.remove((requests, cache))

    def _admit(self) -> None:
        while len(self._prefilling) + len(self._running) + self._joining_count() < self.max_running:
            with self._lock:
                if not self._waiting or self._follows_a_prefill(self._waiting[0]) or not self._fits(self._waiting[0]):
                    return
                request = self._waiting.popleft()
            if request.output:  # preempted: it rejoins the batch where it left it
                self._resume(request)
                continue
            self._counters["queue_time_seconds_sum"] += time.monotonic() - request.submitted
            self._counters["queue_time_seconds_count"] += 1
            try:
                self._start(request)
            except Exception as err:  # noqa: BLE001 - reported to the request, the engine goes on
                self._fail([request], err)
                continue
            self._prefilling.append(request)

    def _follows_a_prefill(self, request: Request) -> bool:
        """Whether `request`'s prompt extends (or equals) a prompt being prefilled now: admitted once that one has
        stored its state, it reads only what follows, so the n choices of one prompt are prefilled once, not n
        times (at the cost of one iteration for the others)."""
        if not self.reuse or request.params.prompt_logprobs is not None or request.output:  # (output: resuming)
            return False
        prompt = request.prompt
        return any(r.scored is None and len(r.prompt) <= len(prompt) and starts_with(prompt, r.prompt)
                   for r in self._prefilling)

    def _start(self, request: Request) -> None:
        """Its sampler, and the longest stored state its prompt extends (restored when its first chunk runs:
        `_cache_of`, or with others in one pass, `_prefill_together`)."""
        p = request.params
        request.stops = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(self.eos_token_ids))
        request.sampling = RowSampling.start(p, request.prompt, self.config.vocab_size, sorted(request.stops),
                                            self._seeds)
        self._counters["prompt_tokens_total"] += len(request.prompt)
        request.admitted = time.monotonic()
        request.scored = [] if request.params.prompt_logprobs is not None else None  # every position is read
        found = self.store.lookup(request.prompt) if self.reuse and request.scored is None else None
        self._counters["store_lookups_total"] += found is not None
        self._counters["store_hits_total"] += found is not None and found.state is not None
        if found is not None and found.state is not None:
            request.resume = found.state
            request.prefilled = request.cached_tokens = found.length
            request.logits = found.state.logits[None] if found.state.logits is not None else None
            self._counters["cached_prompt_tokens_total"] += found.length
        wanted = set(request.keep_at)
        if found is not None:
            wanted.add(found.shared)  # where this prompt departs from a stored sequence
        request.keep_at = sorted(n for n in wanted if request.prefilled < n < len(request.prompt))

    def _cache_of(self, request: Request) -> HybridCache:
        """The request's one-row cache: made on its first use, from its stored state or empty."""
        if request.cache is None:
            if request.resume is not None:
                request.cache = HybridCache.from_row_state(self.model, request.resume, kv_dtype=self.kv_dtype,
                                                           capacity=self._capacity_for(request.length()))
            else:
                request.cache = self._sized(self.model.make_cache(1, kv_dtype=self.kv_dtype), len(request.prompt))
            request.resume = None
        return request.cache

    def prefill_tokens(self, running: int) -> int:
        """Prompt tokens one iteration prefills while `running` rows decode: the step's budget less their tokens,
        at most `prefill_chunk`, at least 1."""
        return min(self.prefill_chunk, max(self.step_token_budget - running, 1))

    def _prefill_some(self) -> None:
        """Prefill chunks, oldest request first, within this iteration's token budget; move finished prefills on."""
        budget = self.prefill_tokens(len(self._running))
        budget -= self._prefill_together(budget)
        for request in list(self._prefilling):
            if budget <= 0:
                return
            try:
                read = False
                while budget > 0 and request.prefilled < len(request.prompt):
                    end = min(request.prefilled + self.prefill_chunk, request.prefilled + budget, len(request.prompt))
                    end = min([n for n in request.keep_at if n > request.prefilled] + [end])
                    ids = torch.tensor(request.prompt[request.prefilled:end], dtype=torch.long)[None]
                    cache = self._cache_of(request)
                    if request.scored is None:
                        request.logits = prefill(self.model, ids, cache, chunk_size=end - request.prefilled)
                    else:
                        request.logits = prefill_scored(self.model, ids, request.prompt[request.prefilled + 1:end + 1],
                                                        cache, request.params.prompt_logprobs, request.scored)
                    self._prefilled_now += end - request.prefilled
                    budget -= end - request.prefilled
                    request.prefilled, read = end, True
                    if end in request.keep_at:
                        self._keep(request.prompt[:end], request.cache, 0, request.logits[0])
                if request.prefilled == len(request.prompt):
                    self._prefilling.remove(request)
                    cache, request.cache = self._cache_of(request), None
                    self._start_decoding([request], cache, request.logits, keep=read)
            except Exception as err:  # noqa: BLE001
                if request in self._prefilling:
                    self._prefilling.remove(request)
                self._fail([request], err)

    def _prefill_together(self, budget: int) -> int:
        """Prefill the oldest prompts that fit in `budget` all at once, in one forward (many prompts arriving
        together: one pass over the weights, not one each): prompts that start from nothing as a left-padded batch,
        or prompts resumed from stored states (a shared system prompt) with the same number of tokens left, their
        states restored as one cache in one pass (`HybridCache.from_row_states`). Returns the tokens spent (padding
        included), 0 if fewer than two such prompts are first in line."""
        group = self._together(budget)
        if len(group) < 2:
            return 0
        fresh = group[0].prefilled == 0
        width = max(len(r.prompt) - r.prefilled for r in group)
        prompts = [r.prompt for r in group]
        for request in group:
            self._prefilling.remove(request)
        try:
            if fresh:  # (B, width), prompts right-aligned after their padding
                ids = torch.zeros(len(group), width, dtype=torch.long)
                mask = torch.zeros(len(group), width, dtype=torch.long)
                for i, request in enumerate(group):
                    ids[i, width - len(request.prompt):] = torch.tensor(request.prompt)
                    mask[i, width - len(request.prompt):] = 1
                cache = self._sized(self.model.make_cache(len(group), kv_dtype=self.kv_dtype), width)
            else:  # (B, width): every row has `width` tokens left, so no padding goes into a running state
                ids, mask = torch.tensor([r.prompt[r.prefilled:] for r in group]), None
                if all(r.resume is not None for r in group):  # all restored at once: each element written once
                    cache = HybridCache.from_row_states(self.model, [r.resume for r in group], kv_dtype=self.kv_dtype,
                                                        capacity=self._capacity_for(max(map(len, prompts))))
                else:  # some part-way through their own chunks
                    cache = self._cache_of(group[0])
                    for request in group[1:]:
                        cache.add_rows(self._cache_of(request), self._capacity_for(max(map(len, prompts))))
            for request in group:
                request.cache = request.resume = None
            logits = prefill(self.model, ids, cache, chunk_size=width, attention_mask=mask)
            self._prefilled_now += width * len(group)
            for request in group:
                request.prefilled = len(request.prompt)
            self._start_decoding(group, cache, logits, keep=True)
        except Exception as err:  # noqa: BLE001
            self._fail([r for r in group if not r.output], err)  # the others have had their first token
        return width * len(group)

    def _together(self, budget: int) -> list[Request]:
        """The oldest prefilling requests that `_prefill_together` can run as one batch within `budget` tokens."""
        group: list[Request] = []
        width = 0
        for request in self._prefilling:
            rest = len(request.prompt) - request.prefilled
            fresh = request.prefilled == 0
            # Nothing left to read (its stored logits suffice), stops to make, or all its logits wanted (scored):
            if rest == 0 or request.keep_at or request.scored is not None:
                break
            if group and (fresh != (group[0].prefilled == 0) or not fresh and rest != width):
                break
            if max(width, rest) * (len(group) + 1) > budget:
                break
            group.append(request)
            width = max(width, rest)
        return group

    def _start_decoding(self, requests: list[Request], cache: HybridCache, logits: torch.Tensor, keep: bool) -> None:
        """Sample each prompt's first token from its logits (B, V); the rows not finished by it join the batch at the
        next iteration (`_join`). `keep`: store each prompt's state (`cache`'s rows, after the first tokens are sent:
        copying 16 rows' states out takes ~1.5 ms on cpu-bench, which no first token need wait for)."""
        sampled = self._sample(requests, logits)
        done = {}
        for i, (request, token) in enumerate(zip(requests, sampled)):
            reason = self._emit(request, token)
            if reason is not None:
                done[i] = reason
        for i, request in enumerate(requests):
            if keep:
                self._keep(request.prompt, cache, i, logits[i])
            request.logits = None
        if len(done) < len(requests):
            if done:
                cache.remove_rows(list(done))
            self._joining.append(([r for i, r in enumerate(requests) if i not in done], cache))
        for i, reason in done.items():
            self._finish(requests[i], reason)

    def _join(self) -> None:
        """The rows whose prefill finished in the previous iteration join the running batch."""
        joining, self._joining = self._joining, []
        for requests, cache in joining:
            try:
                if self._batch is None:
                    self._batch = cache
                else:
                    self._batch.add_rows(cache, self._share())
            except Exception as err:  # noqa: BLE001 - these rows cannot join; the batch is untouched
                self._fail(requests, err)
                continue
            self._running.extend(requests)

    def _decode(self) -> None:
        if not self._running:
            return
        rows = self._running
        try:
            tokens = torch.tensor([r.output[-1] for r in rows], dtype=torch.long)
            logits = decode_step(self.model, tokens, self._batch)
            self._counters["steps_total"] += 1
            sampled = self._sample(rows, logits)
        except Exception as err:  # noqa: BLE001 - the batch's state is unknown now: every row fails
            self._running, self._batch = [], None
            self._fail(rows, err)
            return
        done = {}
        for i, (request, token) in enumerate(zip(rows, sampled)):
            reason = self._emit(request, token)
            if reason is not None:
                done[i] = reason
        for i in done:  # keep the state after prompt + output[:-1], which is row i now (every token sent first)
            self._keep(rows[i].prompt + rows[i].output[:-1], self._batch, i, logits[i], persist=True)
        self._remove_rows(list(done))  # before the finish events: a finished request holds no memory
        for i, reason in done.items():
            self._finish(rows[i], reason)

    def _remove_rows(self, rows: list[int]) -> None:
        if not rows:
            return
        keep = set(range(len(self._running))) - set(rows)
        self._running = [r for i, r in enumerate(self._running) if i in keep]
        if not self._running:
            self._batch = None
        else:
            self._batch.remove_rows(rows)

    # ------------------------------------------------------------------ sampling and events
    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[Sampled]:
        """One (token, logprob, top logprobs) per row of logits (B, V), all rows in one batched pass."""
        return sample_rows(logits, [r.sampling for r in requests])

    def _emit(self, request: Request, sampled: tuple) -> str | None:
        """Send a token; the finish reason if the request is done with it, else None."""
        token, logprob, top = sampled
        request.output.append(token)
        self._counters["generated_tokens_total"] += 1
        if len(request.output) == 1:
            self._histograms["time_to_first_token_seconds"].observe(time.monotonic() - request.submitted)
        self._send(request, TokenEvent(request.id, token, logprob, top, request.scored, request.cached_tokens))
        request.scored = None  # sent with the first token
        if token in request.stops:
            return "stop"
        if len(request.output) >= request.params.max_tokens:
            return "length"
        return None

    def _keep(self, tokens: list[int], cache: HybridCache, row: int, logits: torch.Tensor, persist=False) -> None:
        if self.reuse:
            self.store.put(tokens, cache.row_state(row, logits), persist)

    def _send(self, request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine: drop its request
            if isinstance(event, TokenEvent):
                self.cancel(request.id)

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        request.cache = request.logits = request.resume = None
        self._counters["requests_finished_total"] += 1
        self._histograms["request_seconds"].observe(time.monotonic() - request.submitted)
        if request.admitted is not None:
            self._service_seconds += 0.1 * (time.monotonic() - request.admitted - self._service_seconds)
        self._send(request, FinishEvent(request.id, reason, len(request.prompt), len(request.output),
                                        request.cached_tokens, error))

    def _fail(self, requests: list[Request], err: Exception) -> None:
        message = f"{type(err).__name__}: {err}"
        traceback.print_exception(err)  # for the operator's log; the client gets the one-line message
        self._counters["requests_failed_total"] += len(requests)
        for request in requests:
            self._finish(request, "error", message)

    def _shutdown(self) -> None:
        with self._lock:
            pending = list(self._waiting)
            self._waiting.clear()
        joining = [r for requests, _ in self._joining for r in requests]
        for request in pending + self._prefilling + joining + self._running:
            self._finish(request, "cancelled", "the engine stopped")
        self._prefilling, self._running, self._joining, self._batch = [], [], [], None
