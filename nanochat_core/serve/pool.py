"""The replica pool: requests queue for a free model replica; each reply is generated on a thread.

A replica serves one request at a time (its KV cache and weights are not shared); the asyncio side
only waits and relays, so the event loop keeps answering /health and accepting streams while every
replica is busy. A replica goes back to the pool from its generating thread when that thread ends,
so a client that disconnects mid-stream cannot hand a still-busy replica to the next request.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import deque
from typing import AsyncIterator

from nanochat_core.serve.generation import Finish, Piece, SamplingParams, fit_prompt, reply_pieces
from nanochat_core.serve.loading import Replica


class PoolBusy(Exception):
    """More requests are waiting than the queue allows."""


class ReplicaPool:
    def __init__(self, replicas: list[Replica], max_queue: int = 256):
        assert replicas, "a pool needs at least one replica"
        self.replicas = replicas
        self.max_queue = max_queue
        self._free: asyncio.Queue[Replica] | None = None
        self.waiting = 0
        self.started = time.time()
        self.requests = 0
        self.completed = 0
        self.failed = 0
        self.cancelled = 0  # replies stopped early because their client went away
        self.tokens = 0
        self.served = [0] * len(replicas)
        self.busy = [False] * len(replicas)
        # (completion tokens, seconds on the replica) of recent replies: the per-stream generation rate
        self.recent: deque[tuple[int, float]] = deque(maxlen=256)

    @property
    def tokenizer(self):
        return self.replicas[0].tokenizer

    @property
    def context_len(self) -> int:
        return self.replicas[0].context_len

    def check(self, messages: list[dict], params: SamplingParams) -> None:
        """Raise ConversationError now, before queueing, for a conversation that cannot be rendered."""
        fit_prompt(self.tokenizer, messages, self.context_len, params.max_tokens)

    def _queue(self) -> asyncio.Queue[Replica]:
        # Created inside the running loop: an asyncio.Queue binds to the loop that first uses it.
        if self._free is None:
            self._free = asyncio.Queue()
            for r in self.replicas:
                self._free.put_nowait(r)
        return self._free

    async def stream(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[Piece | Finish]:
        """Wait for a replica, then relay its reply pieces as they are generated."""
        free = self._queue()
        if self.waiting >= self.max_queue:
            raise PoolBusy(f"{self.waiting} requests are already waiting")
        self.requests += 1
        self.waiting += 1
        try:
            replica = await free.get()
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        self.busy[replica.index] = True

        def work() -> None:
            t0 = time.perf_counter()
            try:
                for item in reply_pieces(replica, messages, params, cancel):
                    if isinstance(item, Finish) and item.reason == "cancelled":
                        self.cancelled += 1
                    elif isinstance(item, Finish):
                        self.recent.append((item.completion_tokens, time.perf_counter() - t0))
                    loop.call_soon_threadsafe(out.put_nowait, item)
                    # Give up the GIL for a moment: a small model decodes in Python-bound steps, and without
                    # this the event loop sends its tokens in one burst at the end instead of as they come.
                    time.sleep(0)
            except BaseException as e:  # relayed to the request; the thread itself must not die silently
                loop.call_soon_threadsafe(out.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(self._release, replica)

        threading.Thread(target=work, name=f"replica-{replica.index}", daemon=True).start()
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    self.failed += 1
                    raise item
                if isinstance(item, Finish):  # counted before yielding: the consumer may stop right here
                    self.completed += 1
                    self.tokens += item.completion_tokens
                    yield item
                    return
                yield item
        finally:
            cancel.set()  # a no-op after Finish; stops the thread when the client went away

    def _release(self, replica: Replica) -> None:
        self.busy[replica.index] = False
        self.served[replica.index] += 1
        self._queue().put_nowait(replica)

    def stats(self) -> dict:
        rates = [n / s for n, s in list(self.recent) if s > 0 and n > 1]
        return {
            "replicas": len(self.replicas),
            "available": sum(not b for b in self.busy),
            "waiting": self.waiting,
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "completion_tokens": self.tokens,
            "uptime_s": round(time.time() - self.started, 1),
            # tokens/s of one stream while it holds its replica (prefill included), median of recent replies
            "stream_tok_s_p50": round(statistics.median(rates), 1) if rates else None,
            "workers": [
                {"index": r.index, "device": str(r.device), "busy": self.busy[r.index],
                 "served": self.served[r.index]}
                for r in self.replicas
            ],
        }
