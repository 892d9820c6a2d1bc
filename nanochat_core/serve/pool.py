"""The replica pool: every replica decodes its requests together, in one batch, on its own thread.

    pool = ReplicaPool(replicas, max_queue=256, max_batch=32)
    async for item in pool.stream(chat_job(...)): ...     # Piece / TextDelta items, then one Finish

A request goes to the replica with the least work and waits in its inbox; between two decode steps the
replica's thread prefills what waits (up to `max_batch` rows) and the new rows join the next step
(engine.BatchDecoder); finished rows leave at once. One replica used to serve one request at a time:
with 20 clients `bench/serve_load.py` measured TTFT p50 0.39 s and 1,371 tokens/s in all, the requests
queued while the model could have decoded them together; batched, 8 ms and 6,947 tokens/s (d2 model,
2-core machine, same bench). The asyncio side only waits and relays, so the event
loop keeps answering /health while replicas work. A request whose client goes away is marked cancelled
and its row leaves at the next step, so nobody's tokens are generated for no one.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from nanochat_core.engine import BatchDecoder, BatchRow
from nanochat_core.serve.generation import Finish, Job
from nanochat_core.serve.loading import Replica

# Rows decoded together per replica. On the 2-core CPU machine a greedy step of the bench's d2 model took
# 0.60 ms at 20 rows against 0.31 ms at one (Python overhead dominates); a d20 row's KV cache is ~210 MB
# in bf16 at 2,048 tokens, so 32 rows (6.7 GB, allocated as the batch grows) fit beside the weights on
# any GPU that trains it.
MAX_BATCH = 32
# Prompt tokens prefilled between two decode steps: new requests join quickly, while a burst of long
# prompts (an evaluation harness sends dozens at once) does not stall the rows already streaming.
PREFILL_TOKENS_PER_STEP = 4096
# A stream's tokens after its first go to the event loop at most this often, several at once when steps
# are faster: every event costs the server and the client alike (JSON, HTTP framing, a parse). With the
# bench's d2 model on the 2-core machine, 5 ms took 20-client throughput from 5,682 to 6,266 tokens/s
# and the client's CPU per token from 112 to 52 us at one client; 200 updates a second still read as
# a smooth stream. First tokens and finished replies go out at once; where a step takes longer than this
# (larger models), every step's tokens go out as they come.
STREAM_INTERVAL_S = 0.005


def claim_cpu_threads(replicas: list[Replica]) -> None:
    """For a server process: CPU replicas share the cores but one, which the event loop keeps.

    The event loop (HTTP, SSE) runs in this process too, and torch's default of one intra-op thread per
    core had its OpenMP threads take the CPU it needed: on the 2-core machine one thread instead of two
    took one stream from 1,127 to 1,619 tokens/s and 20 clients from 3,624 to 5,682 (bench/serve_load.py's
    d2 model). Process-wide, so only entry points call it, never the pool (tests build pools in-process).
    """
    import torch

    cpu = sum(r.device.type == "cpu" for r in replicas)
    if cpu:
        torch.set_num_threads(max(1, ((os.cpu_count() or 1) - 1) // cpu))


class PoolBusy(Exception):
    """More requests are waiting than the queue allows."""


@dataclass(eq=False)
class Ticket:
    """A job on its way through a replica: where its items go, and whether its client is still there."""

    job: Job
    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue
    key: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False  # set from the event loop when the consumer stops
    started: float = 0.0


class Worker:
    """One replica's decode thread: admits waiting jobs, steps the batch, relays each job's items."""

    def __init__(self, pool: "ReplicaPool", replica: Replica, max_batch: int):
        self.pool, self.replica, self.max_batch = pool, replica, max_batch
        self.inbox: deque[Ticket] = deque()
        self.active: dict[int, Ticket] = {}
        self.wake = threading.Condition()
        self.served = 0
        self.cancelled = 0
        self.peak_rows = 0  # the most rows decoded together so far
        self.ended = False  # a reply finished since the last delivery
        self.thread: threading.Thread | None = None

    @property
    def load(self) -> int:
        return len(self.active) + len(self.inbox)

    def submit(self, ticket: Ticket) -> None:
        with self.wake:
            self.inbox.append(ticket)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=f"replica-{self.replica.index}", daemon=True)
                self.thread.start()
            self.wake.notify()

    def _run(self) -> None:
        decoder = BatchDecoder(self.replica.engine, self.max_batch, self.replica.context_len)
        out: dict[Ticket, list] = {}  # items not yet handed to the event loop
        last = 0.0
        while True:
            admitted = self._take()
            try:
                for ticket in admitted:
                    self._admit(decoder, ticket, out)
                if admitted:  # first tokens go out now, not one decode step of every row later (TTFT)
                    last = self._deliver(out)
                self.peak_rows = max(self.peak_rows, len(decoder))
                for e in decoder.step():
                    self._feed(decoder, self.active[e.key], e, out)
                for ticket in [t for t in self.active.values() if t.cancelled]:
                    decoder.remove(ticket.key)
                    self._finish(ticket, out, cancelled=True)
            except Exception as e:  # the batch is lost: every row hears why, the replica starts afresh
                for ticket in list(self.active.values()):
                    out.setdefault(ticket, []).append(e)
                    self._done(ticket)
                decoder = BatchDecoder(self.replica.engine, self.max_batch, self.replica.context_len)
            if self.ended or not self.active or time.perf_counter() - last >= STREAM_INTERVAL_S:
                last = self._deliver(out)
            # Give up the GIL for a moment: a small model decodes in Python-bound steps, and without this
            # the event loop sends its tokens in one burst at the end instead of as they come.
            time.sleep(0)

    def _take(self) -> list[Ticket]:
        """Wait for work; then the waiting jobs that fit in the batch and this step's prefill budget."""
        with self.wake:
            while not self.inbox and not self.active:
                self.wake.wait()
            admitted, budget = [], PREFILL_TOKENS_PER_STEP
            while self.inbox and len(self.active) + len(admitted) < self.max_batch and (budget > 0 or not admitted):
                ticket = self.inbox.popleft()
                budget -= len(ticket.job.prompt)
                admitted.append(ticket)
            self.pool._admitted(len(admitted))
        return admitted

    def _admit(self, decoder: BatchDecoder, ticket: Ticket, out: dict) -> None:
        if ticket.cancelled:  # its client left while it waited
            self.cancelled += 1
            return
        job, p = ticket.job, ticket.job.params
        row = BatchRow(ticket.key, p.max_tokens, p.temperature, p.top_k or None,
                       p.seed if p.seed is not None else 42, job.tools, job.logprobs)
        ticket.started = time.perf_counter()
        self.active[ticket.key] = ticket
        try:
            first, scored = decoder.add(row, job.prompt, job.prompt_logprobs)
        except Exception as e:
            out.setdefault(ticket, []).append(e)
            self._done(ticket)
            return
        out.setdefault(ticket, []).extend(job.output.start(scored))
        if first is None:  # max_tokens 0: the prompt's scores were all it asked for
            self._finish(ticket, out)
        else:
            self._feed(decoder, ticket, first, out)

    def _feed(self, decoder: BatchDecoder, ticket: Ticket, e, out: dict) -> None:
        items, stop = ticket.job.output.feed(e.token, e.logprob, e.top)
        out.setdefault(ticket, []).extend(items)
        if stop or e.done:
            if not e.done:
                decoder.remove(ticket.key)  # a stop string or an end marker the engine does not stop on
            self._finish(ticket, out)

    def _finish(self, ticket: Ticket, out: dict, cancelled: bool = False) -> None:
        items = ticket.job.output.close(cancelled=cancelled)
        finish = items[-1]
        if finish.reason == "cancelled":
            self.cancelled += 1
        elif ticket.started:
            self.pool.recent.append((finish.completion_tokens, time.perf_counter() - ticket.started))
        out.setdefault(ticket, []).extend(items)
        self._done(ticket)

    def _done(self, ticket: Ticket) -> None:
        self.active.pop(ticket.key, None)
        self.served += 1
        self.ended = True  # a finished reply goes out at once: its client may be waiting to send the next

    def _deliver(self, out: dict) -> float:
        """Hand `out` to the event loops, one wake-up per loop (each is a syscall), and empty it."""
        by_loop: dict = {}
        for ticket, items in out.items():
            if items:
                by_loop.setdefault(ticket.loop, []).append((ticket.items, items))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)
        out.clear()
        self.ended = False
        return time.perf_counter()


def _put_all(batch: list) -> None:
    for queue, items in batch:
        queue.put_nowait(items)


class ReplicaPool:
    def __init__(self, replicas: list[Replica], max_queue: int = 256, max_batch: int = MAX_BATCH):
        assert replicas, "a pool needs at least one replica"
        self.replicas = replicas
        self.max_queue, self.max_batch = max_queue, max_batch
        self.workers = [Worker(self, r, max_batch) for r in replicas]
        self._lock = threading.Lock()
        self.waiting = 0  # submitted, not yet prefilled
        self.started = time.time()
        self.requests = 0
        self.completed = 0
        self.failed = 0
        self.tokens = 0
        # (completion tokens, seconds from prefill to finish) of recent replies: the per-stream generation rate
        self.recent: deque[tuple[int, float]] = deque(maxlen=256)

    @property
    def tokenizer(self):
        return self.replicas[0].tokenizer

    @property
    def context_len(self) -> int:
        return self.replicas[0].context_len

    @property
    def cancelled(self) -> int:
        """Replies stopped early because their client went away."""
        return sum(w.cancelled for w in self.workers)

    def _admitted(self, n: int) -> None:
        with self._lock:
            self.waiting -= n

    async def stream(self, job: Job) -> AsyncIterator:
        """Queue `job` on the least busy replica, then relay its items as they are generated."""
        async for batch in self.batches(job):
            for item in batch:
                yield item

    async def batches(self, job: Job) -> AsyncIterator[list]:
        """`stream`, a list at a time: everything that has arrived since the consumer last looked. A
        consumer that falls behind under load gets several steps' tokens at once and can send them as
        one event instead of one each."""
        if self.waiting >= self.max_queue:
            raise PoolBusy(f"{self.waiting} requests are already waiting")
        ticket = Ticket(job, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self.waiting += 1
        self.requests += 1
        min(self.workers, key=lambda w: w.load).submit(ticket)
        try:
            while True:
                batch = await ticket.items.get()
                while not ticket.items.empty():
                    batch = batch + ticket.items.get_nowait()
                for i, item in enumerate(batch):
                    if isinstance(item, BaseException):
                        self.failed += 1
                        if i:
                            yield batch[:i]
                        raise item
                    if isinstance(item, Finish):  # counted before yielding: the consumer may stop right here
                        if item.reason != "cancelled":
                            self.completed += 1
                            self.tokens += item.completion_tokens
                        yield batch[: i + 1]
                        return
                yield batch
        finally:
            ticket.cancelled = True  # a no-op after Finish; the row leaves at the next step otherwise

    def stats(self) -> dict:
        rates = [n / s for n, s in list(self.recent) if s > 0 and n > 1]
        return {
            "replicas": len(self.replicas),
            "available": sum(not w.load for w in self.workers),
            "waiting": self.waiting,
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "completion_tokens": self.tokens,
            "uptime_s": round(time.time() - self.started, 1),
            "max_batch": self.max_batch,
            # tokens/s of one stream from its prefill to its end, median of recent replies
            "stream_tok_s_p50": round(statistics.median(rates), 1) if rates else None,
            "workers": [
                {"index": w.replica.index, "device": str(w.replica.device), "busy": bool(w.load),
                 "rows": len(w.active), "peak_rows": w.peak_rows, "queued": len(w.inbox), "served": w.served}
                for w in self.workers
            ],
        }
