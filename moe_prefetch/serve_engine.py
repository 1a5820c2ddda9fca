"""The model side of `python -m moe_prefetch.serve`: prompts to token ids, one generation at a time on
a worker thread, a bounded FIFO of requests waiting for the model, and the text each generation may
show (stop strings cut it; a tail that could still become a stop string is held back).

Batch 1 is the use case of an offloaded MoE: a second sequence would want other experts and halve
the cache for both, so requests take turns. The worker runs transformers' own `generate`; a
StoppingCriteria sees every new token, decodes the text, and ends the generation when a stop string
appears or the client has gone.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .runtime import stats
from .serve_api import COMPLETION_DEFAULT_MAX_TOKENS, ApiError, SamplingParams, shutting_down

log = logging.getLogger("moe_prefetch.serve")
_END = object()  # the last item of a job's event queue
STATS_EVERY_S = 1.0  # how often a running generation publishes its counters for /metrics


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run fn(*args) on the event loop, from the worker thread."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the server stopped, nobody waits for this job
        pass


class TextGate:
    """How much of the generated text may be shown so far: all of it before the first stop string,
    less a tail that is the start of a stop string (or an incomplete UTF-8 character, which byte-level
    tokenizers decode as U+FFFD until its last byte arrives)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.shown = 0  # characters of the text already handed out
        self.stopped = False  # a stop string appeared

    def update(self, text: str) -> str:
        """The newly showable text, given the whole generated text so far."""
        if self.stopped:
            return ""
        # no stop string starts in shown text (its start would have been held back), so search from
        # just before the shown part only: the scan stays short however long the text grows
        start = max(0, self.shown - self.longest)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(text) - self._held_tail(text)
        return self._advance(text, end)

    def flush(self, text: str) -> str:
        """The rest of the text once generation is over (nothing more can complete a stop string)."""
        delta = self.update(text)
        return delta if self.stopped else delta + self._advance(text, len(text))

    def _advance(self, text: str, end: int) -> str:
        delta = text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return delta

    def _held_tail(self, text: str) -> int:
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held


@dataclass
class Job:
    """One request's generation. The worker thread fills it in; the event loop reads `events`."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # text deltas, then _END
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", or None when cancelled
    error: BaseException | None = None
    future: Future | None = None

    def cancel(self) -> None:
        """Stop generating after the current token (the client went away)."""
        self.cancelled.set()

    def emit(self, item) -> None:  # called on the worker thread
        _call_in_loop(self.loop, self.events.put_nowait, item)


class _JobCriteria(StoppingCriteria):
    """Called by generate after every new token: decodes, hands showable text to the job, and stops
    the generation on a stop string or a cancelled job."""

    def __init__(self, engine: Engine, job: Job, gate: TextGate):
        self.engine, self.job, self.gate = engine, job, gate
        self.ids: list[int] = []

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.ids.append(int(input_ids[0, -1]))
        # the whole text, decoded anew: pieces decoded one by one lose tokenizers' spacing rules and
        # split multi-byte characters; at a few thousand tokens this costs well under a millisecond
        delta = self.gate.update(self.engine.decode(self.ids))
        if delta:
            self.job.emit(delta)
        self.engine.publish_stats(force=False)
        done = self.gate.stopped or self.job.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """The loaded model, its tokenizer and the turn-taking around them."""

    def __init__(self, model, tokenizer, model_id: str, max_context: int, max_queue: int):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.max_context, self.max_queue = max_context, max_queue
        self.device = model.moe_runtime.device
        self.vocab_size = int(model.config.vocab_size)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # Rust tokenizers refuse concurrent use that changes their settings ("Already borrowed"):
        # the event loop encodes while the worker decodes, so one lock covers both
        self._tok_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-generate")
        self._turn = asyncio.Lock()  # FIFO: asyncio wakes waiters in arrival order
        self.waiting = 0
        self.current: Job | None = None
        self.closing = False  # set by shutdown(): no new generations
        self._stats, self._stats_at = stats(model), time.monotonic()

    # ---- prompts -------------------------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                               param="prompt", code="invalid_value")
            return list(prompt)
        with self._tok_lock:  # the same call as `python -m moe_prefetch.run`, so greedy output matches it
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenisation", param="prompt", code="invalid_value")
        return ids

    def encode_chat(self, messages: tuple[dict, ...]) -> list[int]:
        if not self.has_chat_template:
            raise ApiError(400, f"the model '{self.model_id}' has no chat template, so it cannot serve "
                           "/v1/chat/completions; use /v1/completions with a plain prompt",
                           param="messages", code="no_chat_template")
        from jinja2.exceptions import TemplateError

        try:
            with self._tok_lock:
                ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                                         return_dict=True)["input_ids"]
        except TemplateError as e:  # e.g. "roles must alternate user/assistant": the messages' fault
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages",
                           code="invalid_messages") from None
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def max_new_tokens(self, n_prompt: int, params: SamplingParams, chat: bool) -> int:
        """Tokens to generate: the request's max_tokens if prompt + max_tokens fits the context;
        by default 16 for completions (OpenAI's default) and the rest of the context for chat."""
        room = self.max_context - n_prompt
        if room < 1:
            raise ApiError(400, f"the prompt is {n_prompt} tokens but this server's context is {self.max_context} "
                           "tokens (prompt and completion together)", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        if params.max_tokens is None:
            return room if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
        if params.max_tokens > room:
            raise ApiError(400, f"max_tokens is {params.max_tokens} but the prompt is {n_prompt} tokens and this "
                           f"server's context is {self.max_context}: at most {room} new tokens fit",
                           param="max_completion_tokens" if chat else "max_tokens", code="context_length_exceeded")
        return params.max_tokens

    # ---- taking turns ---------------------------------------------------------------------------------

    async def start(self, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int,
                    client_gone: Callable[[], Awaitable[bool]] | None = None) -> Job | None:
        """Wait for the model in the FIFO queue (a 429 when it is full), then start generating on
        the worker thread. None when `client_gone()` says the client left while it waited.
        The model is released when the job ends, whatever happens to its caller."""
        self._refuse_if_closing()
        if self._turn.locked() and self.waiting >= self.max_queue:
            raise ApiError(429, f"the server is busy: one generation is running and {self.waiting} "
                           f"request(s) are waiting (--max-queue {self.max_queue}); retry later",
                           type="rate_limit_error", code="queue_full")
        self.waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self.waiting -= 1
        try:
            self._refuse_if_closing()
            if client_gone is not None and await client_gone():
                self._turn.release()
                return None
            job = Job(prompt_ids, params, max_new_tokens, asyncio.get_running_loop())
            self.current = job
            job.future = self._worker.submit(self._generate, job)
        except BaseException:
            self._turn.release()
            raise
        # release from the worker's completion, not from the request handler: a handler cancelled by
        # a disconnect must not let the next request onto a model that is still generating
        job.future.add_done_callback(lambda _: _call_in_loop(job.loop, self._finished, job))
        return job

    def _finished(self, job: Job) -> None:
        """On the event loop once the worker is done with `job`: after every delta it emitted."""
        future = job.future
        if not future.cancelled() and future.exception() is not None:
            job.error = future.exception()
            log.error("generation failed", exc_info=job.error)
        job.events.put_nowait(_END)
        if self.current is job:
            self.current = None
        self._turn.release()

    async def text(self, job: Job) -> AsyncIterator[str]:
        """The job's text deltas as they come; raises the worker's error at the end, if any.
        Leaving early (a cancelled consumer) cancels the job."""
        try:
            while (item := await job.events.get()) is not _END:
                yield item
        finally:
            if job.finish_reason is None:
                job.cancel()
        if job.error is not None:
            raise job.error

    def stats(self) -> dict:
        """The runtime counters (moe_prefetch.stats) for /metrics. They are read on the compute thread
        while a generation runs (the counters are not meant for concurrent readers: on CUDA reading them
        drains the compute stream's timing events), so a busy model reports its last snapshot."""
        if not self.busy:
            self._stats = stats(self.model)
        return self._stats

    def publish_stats(self, force: bool) -> None:  # on the worker thread
        if force or time.monotonic() - self._stats_at >= STATS_EVERY_S:
            self._stats, self._stats_at = stats(self.model), time.monotonic()

    def _refuse_if_closing(self) -> None:
        if self.closing:
            raise shutting_down()

    @property
    def busy(self) -> bool:
        return self._turn.locked()

    def shutdown(self) -> None:
        """Begin stopping: the running generation ends after its current token, queued and new requests
        get a 503. Only sets flags, so a signal handler may call it."""
        self.closing = True
        if self.current is not None:
            self.current.cancel()

    def close(self) -> None:
        """Stop the running generation (if any) and the worker thread."""
        if self.current is not None:
            self.current.cancel()
        self._worker.shutdown(wait=True, cancel_futures=True)

    # ---- the worker thread ------------------------------------------------------------------------

    def _generate(self, job: Job) -> None:
        """Runs on the worker thread; an exception reaches the client as a 500 (see _finished)."""
        if job.cancelled.is_set():
            return
        gate = TextGate(job.params.stop)
        criteria = _JobCriteria(self, job, gate)
        p = job.params
        gen = dict(max_new_tokens=job.max_new_tokens, pad_token_id=self.pad_id,
                   stopping_criteria=StoppingCriteriaList([criteria]))
        if p.greedy:  # the same settings as `python -m moe_prefetch.run` without --do-sample
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:  # OpenAI has no top-k: 0 switches off the model's default one
            gen.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=0)
        # generate samples from torch's global RNG; only this thread uses it, one job at a time
        if p.seed is not None:
            torch.manual_seed(p.seed)
        else:
            torch.seed()
        ids = torch.tensor([job.prompt_ids], device=self.device)  # [1, T]
        try:
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **gen)  # [1, T + new]
        finally:
            self.publish_stats(force=True)
        new_ids = out[0, len(job.prompt_ids):].tolist()
        job.completion_tokens = len(new_ids)
        if job.cancelled.is_set() and not gate.stopped:
            return  # nobody is listening; finish_reason stays None
        tail = gate.flush(self.decode(new_ids))
        if tail:
            job.emit(tail)
        job.finish_reason = "stop" if gate.stopped or (new_ids and new_ids[-1] in self.eos_ids) else "length"
