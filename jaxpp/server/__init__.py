"""`jaxpp serve`: an OpenAI-compatible HTTP server on the continuous-batching engine.

One module per job:

    text.py     the text deltas of a stream (held back where they may still change)
    chunks.py   a streamed request's server-sent events (OpenAI's chunk shapes)
    loop.py     THE engine loop: one thread owns the LLM, requests join it, tokens stream out
    metrics.py  the Prometheus metrics (vLLM's names)
    app.py      the HTTP routes (FastAPI): the OpenAI request and response shapes, errors, auth

Requests are parsed and checked by the same code as the batch CLI's OpenAI lines
(jaxpp/cli/formats.py), and answered in the same shapes (jaxpp/cli/records.py). See
docs/serve.md.
"""
