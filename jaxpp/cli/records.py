"""Output records: a request's answer line and error line, in the plain and the OpenAI batch
output shapes (docs/cli.md shows both)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from jaxpp.cli import tools
from jaxpp.cli.errors import RequestError
from jaxpp.cli.formats import Job


def error_record(line: int, job_id: Any, err: RequestError, openai: bool) -> dict:
    """The error line of input line `line` (`job_id` None: the line's id could not be read)."""
    if openai:
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": job_id,
            "response": None,
            "error": {"code": err.code, "message": str(err)},
            "line": line,
        }
    return {
        "id": line if job_id is None else job_id,
        "line": line,
        "error": str(err),
        "code": err.code,
    }


def _logprob_entries(entries) -> list[dict | None]:
    return [
        None if entry is None else {str(t): lp.logprob for t, lp in entry.items()}
        for entry in entries or []
    ]


def vllm_prompt_logprobs(entries) -> list[dict | None] | None:
    """RequestOutput.prompt_logprobs as vLLM's `prompt_logprobs` field answers them: per prompt
    token (null for the first), token id -> {logprob, rank, decoded_token}."""
    if entries is None:
        return None
    return [
        None if entry is None else {str(t): dataclasses.asdict(lp) for t, lp in entry.items()}
        for entry in entries
    ]


def echoed(job: Job, index: int) -> tuple[str, list[int], list, str]:
    """Sequence `index`'s text, token ids and logprob entries as its choice shows them, and
    the text of its first token: with `echo`, its prompt's first (the prompt tokens' logprobs
    from RequestOutput.prompt_logprobs, None for the first token)."""
    c = job.results[index]
    if not job.echo:
        return c.text, list(c.token_ids), c.logprobs or [], ""
    seq = job.seqs[index]
    prompt_entries = job.prompt_logprobs[index] or [None] * len(seq.token_ids)
    text, first = job.prompt_texts[seq.prompt_index]
    return (
        text + c.text,
        [*seq.token_ids, *c.token_ids],
        [*prompt_entries, *(c.logprobs or [])],
        first,
    )


def result_record(job: Job) -> dict:
    if job.kind == "plain":
        c = job.results[0]
        record = {
            "id": job.id,
            "prompt": job.prompt,
            "text": c.text,
            "token_ids": list(c.token_ids),
            "finish_reason": c.finish_reason,
            "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": len(c.token_ids)},
        }
        if job.seqs[0].params.logprobs is not None:
            record["logprobs"] = _logprob_entries(c.logprobs)
            record["cumulative_logprob"] = c.cumulative_logprob
        if job.seqs[0].params.prompt_logprobs is not None:
            record["prompt_logprobs"] = _logprob_entries(job.prompt_logprobs[0])
        return record
    choices = []
    for index, c in enumerate(job.results):
        choice: dict[str, Any] = {"index": index}
        text, token_ids, entries, first = echoed(job, index)
        finish = c.finish_reason
        if job.kind == "chat" and job.tools is not None:
            choice["message"], finish = tools.reply(job.tools, text, finish)
        elif job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = openai_logprobs(job.logprobs, token_ids, entries, first=first)
        choice["finish_reason"] = finish
        if job.show_prompt_logprobs and job.kind != "chat":
            choice["prompt_logprobs"] = vllm_prompt_logprobs(job.prompt_logprobs[index])
        choices.append(choice)
    completion_tokens = sum(len(c.token_ids) for c in job.results)
    body = {
        "id": ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens,
        },
    }
    if job.show_prompt_logprobs and job.kind == "chat":  # vLLM: one list, beside the choices
        body["prompt_logprobs"] = vllm_prompt_logprobs(job.prompt_logprobs[0])
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": job.id,
        "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body},
        "error": None,
    }


def openai_logprobs(spec, token_ids, entries, offset: int = 0, first: str = "") -> dict | None:
    """OpenAI's `logprobs` of a choice (or of a streamed chunk: `offset` is the length of the
    text before it) from CompletionOutput.logprobs-style entries, one per token; an entry
    None (an echoed prompt's first token, whose text is `first`) has null logprobs."""
    if spec is None:
        return None
    kind, top = spec

    def piece(tok, lp):
        return lp.decoded_token if lp.decoded_token is not None else str(tok)

    if kind == "chat":
        content = []
        for tok, entry in zip(token_ids, entries, strict=False):
            chosen = entry[tok]
            alts = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
            content.append(
                {
                    "token": piece(tok, chosen),
                    "logprob": chosen.logprob,
                    "bytes": list(piece(tok, chosen).encode()),
                    "top_logprobs": [
                        {
                            "token": piece(t, lp),
                            "logprob": lp.logprob,
                            "bytes": list(piece(t, lp).encode()),
                        }
                        for t, lp in alts
                        if lp.rank is not None
                    ][:top],
                }
            )
        return {"content": content}
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for tok, entry in zip(token_ids, entries, strict=False):
        if entry is None:
            tokens.append(first)
            token_logprobs.append(None)
            tops.append(None)
            offsets.append(offset)
            offset += len(first)
            continue
        chosen = entry[tok]
        tokens.append(piece(tok, chosen))
        token_logprobs.append(chosen.logprob)
        tops.append(
            {
                piece(t, lp): lp.logprob
                for t, lp in entry.items()
                if lp.rank is not None and lp.rank <= top
            }
        )
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
