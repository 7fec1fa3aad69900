"""THE engine loop: one thread owns the LLM (it is not thread-safe); HTTP handlers talk to it
only through `submit` and `abort`, which queue commands, and through the events it calls back.

Each turn of the thread: turn the queued commands into a wire list (add a sequence, abort one,
stop), apply it to the engine (`LLM.add_request`, `LLM.abort_request`), step the engine once,
then hand every sequence the text its new tokens make (text.py: held back where it may still
change) and every finished one its completion. With nothing to run it waits on the command
queue (a turn every IDLE_WAKE_S all the same).

    handler ──submit/abort──▶ commands ──▶ [thread: wire list, apply, LLM.step] ──events──▶ handler

With several processes (one engine spread over all of their devices), process 0 runs this loop
and serves HTTP; each turn's wire list is broadcast to the others (`exchange`:
distributed.broadcast_json, plain JSON) before anyone applies it, and they run `follow`: the
same adds and aborts in the same order before the same step, so every host decision stays the
same (distributed.py, rule 2).

    process 0:  take commands ─▶ broadcast ─▶ apply ─▶ step ─▶ stream to clients
    process k:                   receive   ─▶ apply ─▶ step

A sequence is `outstanding` from `submit` until its last event: the server refuses new work
(503) past `max_outstanding`, so a flood of clients queues a bounded number of requests,
never unbounded memory.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from jaxpp.config import SamplingParams
from jaxpp.server.text import TextStream

DELTA, DONE, ERROR = "delta", "done", "error"
ADD, ABORT, STOP = "add", "abort", "stop"  # the commands of the wire list
IDLE_WAKE_S = 0.5  # with nothing to run, how long the loop waits for a command before a turn


@dataclasses.dataclass
class Event:
    kind: str  # DELTA: more text; DONE: the completion; ERROR: the sequence failed
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)  # DELTA: the new tokens
    logprobs: list | None = None  # DELTA: their logprob entries, when the request asked
    completion: Any = None  # jaxpp.CompletionOutput, with DONE
    metrics: Any = None  # jaxpp RequestMetrics, with DONE
    prompt_logprobs: Any = None  # RequestOutput.prompt_logprobs, with DONE
    message: str = ""  # with ERROR: what went wrong, its HTTP status and error code
    status: int = 500
    code: str = "internal_error"


@dataclasses.dataclass
class Handle:
    """One submitted sequence, as the handler holds it."""

    token_ids: list[int]
    params: Any  # jaxpp.SamplingParams
    on_event: Callable[[Event], None]  # called on the engine thread
    request_id: str | None = None  # the engine's, once added
    cancelled: bool = False


class Overloaded(Exception):
    """Too many sequences outstanding: the request is refused, nothing was queued."""


@dataclasses.dataclass
class _Tracked:
    handle: Handle
    stream: TextStream
    tokens: int = 0  # tokens already turned into text
    last_token_time: float | None = None


class EngineLoop:
    def __init__(
        self,
        llm,
        max_outstanding: int,
        observe: Callable[..., None] = lambda *a: None,
        exchange: Callable[[list], list] = lambda wire: wire,
    ):
        """`observe(name, value)` is told of every step and every gap between tokens
        (metrics.py); `exchange` hands each turn's wire list to the other processes
        (distributed.broadcast_json) and returns it."""
        self.llm = llm
        self.exchange = exchange
        self.max_outstanding = max_outstanding
        self.observe = observe
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self.outstanding = 0
        self.accepting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxpp-engine", daemon=True)
        self.failure: str | None = None  # the last step failure's traceback

    # --- the handlers' side ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, handles: list[Handle]) -> None:
        """Queue the sequences of one request, all or none (Overloaded)."""
        with self._lock:
            if not self.accepting:
                raise Overloaded("the server is shutting down")
            if self.outstanding + len(handles) > self.max_outstanding:
                raise Overloaded(
                    f"{self.outstanding} sequences are queued or running, the server takes "
                    f"{self.max_outstanding}"
                )
            self.outstanding += len(handles)
        for handle in handles:
            self._commands.put((ADD, handle))

    def abort(self, handles: list[Handle]) -> None:
        """The client is gone: drop its sequences (their rows and pages are freed at once)."""
        for handle in handles:
            if not handle.cancelled:
                handle.cancelled = True
                self._commands.put((ABORT, handle))

    def drain(self, grace: float) -> None:
        """Stop accepting; let what runs finish for up to `grace` seconds, abort the rest,
        stop the thread."""
        with self._lock:
            self.accepting = False
        deadline = time.monotonic() + grace
        while self.outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
        self._commands.put(("abort_all", None))
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=30)

    # --- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            busy = self.llm.has_unfinished_requests()
            wire, handles = self._take_commands(block=not busy)
            results = apply_commands(self.llm, self.exchange(wire))
            for handle, result in zip(handles, results, strict=True):
                self._added(handle, result)
            if wire and wire[-1] == [STOP]:
                return
            if not self.llm.has_unfinished_requests():
                continue
            try:
                finished = self.llm.step()
            except Exception:  # noqa: BLE001 - every sequence in flight gets an error event
                self.failure = traceback.format_exc()
                self._fail_all("generation failed in the engine; see the server log")
                continue
            now = time.perf_counter()
            self.observe("step", None)
            self._stream_new_tokens(now)
            for out in finished:
                self._finish(out)

    def _take_commands(self, block: bool) -> tuple[list, list[Handle]]:
        """The queued commands as the wire list every process applies (module docstring), and
        the handles of its adds, in order. Waits up to IDLE_WAKE_S for one when `block`."""
        wire: list = []
        adds: list[Handle] = []
        try:
            command = (
                self._commands.get(timeout=IDLE_WAKE_S) if block else self._commands.get_nowait()
            )
        except queue.Empty:
            command = None
        while command is not None:
            kind, handle = command
            if kind == ADD:
                if handle.cancelled:
                    self._settled()
                else:
                    wire.append([ADD, handle.token_ids, wire_params(handle.params)])
                    adds.append(handle)
            elif kind == ABORT and handle.request_id in self._tracked:
                wire.append([ABORT, handle.request_id])
                self._forget(handle.request_id)
            elif kind == "abort_all":
                for request_id in list(self._tracked):
                    wire.append([ABORT, request_id])
                    self._tracked[request_id].handle.on_event(
                        Event(ERROR, message="the server shut down before it finished",
                              status=503, code="unavailable")
                    )  # fmt: skip
                    self._forget(request_id)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = None
        if self._stop.is_set():
            wire.append([STOP])
        return wire, adds

    def _added(self, handle: Handle, result: str | dict) -> None:
        if isinstance(result, dict):  # the engine refused it (too long for the KV pool, ...)
            refusal = f"the engine refused the request: {result['refused']}"
            handle.on_event(Event(ERROR, message=refusal, status=400, code="generation_failed"))
            self._settled()
            return
        handle.request_id = result
        detokenize = lambda ids, p=handle.params: self.llm.detokenize(ids, p)  # noqa: E731
        self._tracked[result] = _Tracked(handle, TextStream(detokenize, handle.params.stop))

    def _stream_new_tokens(self, now: float) -> None:
        grown = {}
        for request_id, tokens in self.llm.running_tokens().items():
            tracked = self._tracked.get(request_id)
            if tracked is not None and len(tokens) > tracked.tokens:
                grown[request_id] = tokens
        starts = {r: self._tracked[r].tokens for r in grown}
        logprobs = self.llm.running_logprobs(starts) if grown else {}
        for request_id, tokens in grown.items():
            tracked = self._tracked[request_id]
            new = tokens[tracked.tokens :]
            if tracked.last_token_time is not None:
                gap = (now - tracked.last_token_time) / len(new)
                for _ in new:
                    self.observe("inter_token", gap)
            tracked.tokens, tracked.last_token_time = len(tokens), now
            # One event per step that gave the sequence tokens, even when all of their text is
            # held back (or the model has no tokenizer): a client sees when tokens come, with
            # their logprobs.
            text = tracked.stream.update(tokens)
            tracked.handle.on_event(Event(DELTA, text, new, logprobs.get(request_id)))

    def _finish(self, out) -> None:
        tracked = self._tracked.get(out.request_id)
        if tracked is None:
            return
        completion = out.outputs[0]
        text = tracked.stream.finish(completion.text)
        event = Event(DONE, text, completion=completion, metrics=out.metrics,
                      prompt_logprobs=out.prompt_logprobs)  # fmt: skip
        tracked.handle.on_event(event)
        self._forget(out.request_id)

    def _fail_all(self, message: str) -> None:
        abort_unfinished(self.llm)
        for request_id in list(self._tracked):
            self._tracked[request_id].handle.on_event(Event(ERROR, message=message))
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        del self._tracked[request_id]
        self._settled()

    def _settled(self) -> None:
        with self._lock:
            self.outstanding -= 1


def wire_params(params: SamplingParams) -> dict:
    return dataclasses.asdict(params)


def apply_commands(llm, wire: list) -> list[str | dict]:
    """Apply one wire list to the engine, as every process does before the same step: the
    request id of each add (the same on every process: the engine numbers them in order), or
    {"refused": why}."""
    results: list[str | dict] = []
    for command in wire:
        if command[0] == ADD:
            try:
                results.append(llm.add_request(command[1], SamplingParams(**command[2])))
            except ValueError as e:
                results.append({"refused": str(e)})
        elif command[0] == ABORT:
            llm.abort_request(command[1])
    return results


def follow(llm, exchange: Callable[[list], list]) -> None:
    """What every process but process 0 runs: receive each wire list, apply it, step the same
    engine, until process 0 says STOP. Its outputs are process 0's to send."""
    while True:
        wire = exchange([])
        apply_commands(llm, wire)
        if wire and wire[-1] == [STOP]:
            return
        if llm.has_unfinished_requests():
            try:
                llm.step()
            except Exception:  # noqa: BLE001 - process 0 failed the same step: abort as it does
                traceback.print_exc()
                abort_unfinished(llm)


def abort_unfinished(llm) -> None:
    """After a failed step: drop every unfinished request (the same ones on every process)."""
    for request_id in list(llm.running_tokens()):
        llm.abort_request(request_id)
