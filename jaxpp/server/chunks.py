"""The server-sent events of one streamed request, in OpenAI's chunk shapes (`text_completion`
or `chat.completion.chunk`).

A chat stream starts with each choice's `{"role": "assistant"}` delta. Then each event of the
engine loop that brings a choice tokens (loop.py: one per engine step, one ring round while a
request streams) is one chunk: the text that is safe to send, and, when the request asked for
logprobs, the logprobs of exactly those tokens (`text_offset` counting on from the chunk
before). A choice's last chunk carries its `finish_reason` and whatever tokens are left. With
`echo` the first chunk of a choice starts with its prompt; with `echo` and `logprobs` a choice
comes in one chunk when it finishes, as its prompt's logprobs are known only then; so does a
chat answer that may hold tool calls (they are read from the whole answer: one delta of
content and tool_calls, tools.stream_delta). With `stream_options.include_usage` a last chunk
of `usage` and no choices follows.
"""

from __future__ import annotations

import json
import time
import uuid

from jaxpp.cli import tools
from jaxpp.cli.formats import Job
from jaxpp.cli.records import echoed, openai_logprobs


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class StreamChunks:
    def __init__(self, job: Job):
        self.job = job
        self.chat = job.kind == "chat"
        self.head = {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": job.model,
        }
        self.sent = [0] * len(job.seqs)  # tokens each choice has sent
        self.offsets = [0] * len(job.seqs)  # text_offset of each choice's next token
        tool_calls = self.chat and job.tools is not None and job.tools.mode != "none"
        # Each choice in one last chunk:
        self.whole = (job.echo and job.logprobs is not None) or tool_calls
        self.tool_calls = tool_calls

    def roles(self) -> list[str]:
        """A chat stream's first chunks: each choice's assistant role."""
        if not self.chat:
            return []
        return [
            sse(
                {
                    **self.head,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )  # fmt: skip
            for i in range(len(self.job.seqs))
        ]

    def delta(self, index: int, event) -> str | None:
        """The chunk of a DELTA event (loop.Event), or None while the choice waits to be sent
        whole."""
        if self.whole:
            return None
        return self._chunk(index, self._echo(index) + event.text, event.token_ids,
                           event.logprobs or [])  # fmt: skip

    def last(self, index: int, event) -> str:
        """The chunk of a DONE event: the rest of the choice, and its finish_reason."""
        c = event.completion
        if self.whole:
            text, token_ids, entries, first = echoed(self.job, index)
            delta, finish = None, c.finish_reason
            if self.tool_calls:
                delta, finish = tools.stream_delta(self.job.tools, text, finish)
            return self._chunk(index, text, token_ids, entries, finish, first, delta)
        done = self.sent[index]
        return self._chunk(index, self._echo(index) + event.text, c.token_ids[done:],
                           (c.logprobs or [])[done:], c.finish_reason)  # fmt: skip

    def usage(self) -> str:
        generated = sum(len(c.token_ids) for c in self.job.results)
        prompt = self.job.prompt_tokens
        usage = {"prompt_tokens": prompt, "completion_tokens": generated,
                 "total_tokens": prompt + generated}  # fmt: skip
        return sse({**self.head, "choices": [], "usage": usage})

    def _echo(self, index: int) -> str:
        """The prompt text a choice's first chunk starts with (echo), else ''."""
        if not self.job.echo or self.sent[index]:
            return ""
        return self.job.prompt_texts[self.job.seqs[index].prompt_index][0]

    def _chunk(self, index, text, token_ids, entries, finish=None, first="", delta=None) -> str:
        logprobs = openai_logprobs(self.job.logprobs, token_ids, entries, self.offsets[index],
                                   first)  # fmt: skip
        if logprobs is not None and not self.chat:
            self.offsets[index] += sum(len(t) for t in logprobs["tokens"])
        self.sent[index] += len(token_ids)
        choice = {"index": index}
        if delta is not None:
            choice["delta"] = delta
        elif self.chat:
            choice["delta"] = {"content": text} if text or finish is None else {}
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish
        usage = {"usage": None} if self.job.include_usage else {}
        return sse({**self.head, "choices": [choice], **usage})
