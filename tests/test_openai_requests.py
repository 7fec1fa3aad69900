"""OpenAI request bodies -> sequences and sampling params (jaxpp/cli/formats.py), without an
engine: the demo model's real tokenizer and chat template over a context of 64 tokens. What
the server and the batch CLI agree on, and where they differ (the server refuses a max_tokens
past the context, the CLI lowers it)."""

from types import SimpleNamespace

import pytest

import jaxpp
from jaxpp.cli.errors import CONTEXT_LENGTH_EXCEEDED, RequestError
from jaxpp.cli.formats import CHAT_ROLES, RequestBuilder
from jaxpp.cli.limits import Limits
from jaxpp.engine import load_tokenizer

CONTEXT = 64


@pytest.fixture(scope="module")
def llm():
    tokenizer = load_tokenizer(jaxpp.DEMO_MODEL)
    return SimpleNamespace(
        tokenizer=tokenizer,
        max_model_len=CONTEXT,
        config=SimpleNamespace(vocab_size=len(tokenizer)),
        chat_prompt=lambda messages, tools=None: tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        ),
    )


def _builder(llm, server: bool) -> RequestBuilder:
    return RequestBuilder(llm, {"max_tokens": 16}, 0, "demo_model", Limits(), streaming=server)


def _job(llm, body: dict, server: bool = True, url: str = "/v1/completions"):
    return _builder(llm, server).openai({"url": url, "body": body}, 0, "id")


def _refusal(llm, body: dict, server: bool = True, url: str = "/v1/completions") -> RequestError:
    with pytest.raises(RequestError) as info:
        _job(llm, body, server, url)
    return info.value


def test_max_tokens_past_the_context_is_refused_by_the_server_and_lowered_by_the_cli(llm):
    prompt = list(range(10, 60))  # 50 tokens: 14 left
    err = _refusal(llm, {"prompt": prompt, "max_tokens": 20})
    assert err.code == CONTEXT_LENGTH_EXCEEDED
    assert str(err) == (
        "'max_tokens' or 'max_completion_tokens' is too large: 20. This model's maximum "
        "context length is 64 tokens and your request has 50 input tokens (20 > 64 - 50)."
    )
    assert _job(llm, {"prompt": prompt, "max_tokens": 14}).seqs[0].params.max_tokens == 14
    # Unset, the default (16) is lowered to the room left, as vLLM does; the CLI lowers both.
    assert _job(llm, {"prompt": prompt}).seqs[0].params.max_tokens == 14
    capped = _job(llm, {"prompt": prompt, "max_tokens": 20}, server=False)
    assert capped.seqs[0].params.max_tokens == 14
    full = _refusal(llm, {"prompt": list(range(10, 10 + CONTEXT))})
    assert "maximum context length is 64 tokens. However, your request has 64 input" in str(full)
    # Scoring a prompt that fills the context generates nothing: it fits.
    scored = _job(llm, {"prompt": list(range(10, 74)), "max_tokens": 0, "echo": True})
    assert scored.seqs[0].params.max_tokens == 0
    chat = _refusal(
        llm, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 999},
        url="/v1/chat/completions",
    )  # fmt: skip
    assert "is too large: 999" in str(chat)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"max_tokens": "ten"}, "max_tokens='ten' is invalid: expected an integer, got str"),
        ({"temperature": "hot"}, "temperature='hot' is invalid: expected a finite number"),
        ({"top_k": 1.5}, "top_k=1.5 is invalid: expected an integer, got float"),
        ({"ignore_eos": "yes"}, "ignore_eos='yes' is invalid: expected a bool"),
        ({"echo": "yes"}, "echo must be a boolean, got 'yes'"),
        ({"best_of": 2}, "best_of=2 is not supported: each choice is one sample"),
        ({"best_of": "1"}, "best_of='1' is not supported"),
        ({"n": 2, "best_of": 3}, "best_of must be null or equal n (2)"),
        ({"max_tokens": 0}, "max_tokens=0 is invalid without prompt_logprobs"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs are not available with stream"),
    ],
)
def test_bad_fields_are_named_with_what_was_expected(llm, body, message):
    assert message in str(_refusal(llm, {"prompt": "def f(x):", **body}))


def test_best_of_null_or_n_is_accepted(llm):
    for body in ({"best_of": None}, {"best_of": 1}, {"n": 3, "best_of": 3}):
        assert len(_job(llm, {"prompt": "x = 1", **body}).seqs) == body.get("n", 1)


def test_chat_roles_are_checked(llm):
    err = _refusal(llm, {"messages": [{"role": "wizard", "content": "hi"}]},
                   url="/v1/chat/completions")  # fmt: skip
    assert "message 0 has role 'wizard': expected one of 'system', 'developer'" in str(err)
    ok = [{"role": r, "content": "hi"} for r in ("system", "user", "assistant", "user")]
    assert _job(llm, {"messages": ok}, url="/v1/chat/completions").seqs
    assert set(CHAT_ROLES) >= {"system", "user", "assistant", "tool"}


def test_echo_asks_the_engine_for_the_prompts_logprobs(llm):
    """lm-eval's loglikelihood body (echo, logprobs 1, max_tokens 1) and the scoring-only one
    (max_tokens 0): the prompt's logprobs are asked for; a prompt sent as token ids is echoed
    as their text."""
    ids = llm.tokenizer.encode("def fibonacci(n):")
    lm_eval = {"prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}  # fmt: skip
    job = _job(llm, lm_eval)
    assert job.echo and job.seqs[0].params.prompt_logprobs == 1
    assert job.prompt_texts == [(llm.tokenizer.decode(ids), llm.tokenizer.decode(ids[:1]))]
    only = _job(llm, {"prompt": "x = 1", "echo": True, "max_tokens": 0})
    assert only.seqs[0].params.prompt_logprobs == 0 and only.seqs[0].params.max_tokens == 0
    assert _job(llm, {"prompt": "x = 1", "logprobs": 1}).seqs[0].params.prompt_logprobs is None
    vllm = _job(llm, {"prompt": "x = 1", "prompt_logprobs": 3})
    assert vllm.show_prompt_logprobs and vllm.seqs[0].params.prompt_logprobs == 3
    over = _refusal(llm, {"prompt": "x", "prompt_logprobs": 50})
    assert "prompt_logprobs=50 is over the limit" in str(over)


def test_streams_ask_for_one_round_calls(llm):
    assert _job(llm, {"prompt": "x", "stream": True}).seqs[0].params.stream
    assert not _job(llm, {"prompt": "x"}).seqs[0].params.stream
