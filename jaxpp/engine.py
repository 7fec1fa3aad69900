"""`LLM`: load a model onto the mesh and serve requests through the continuous-batching ring.

The facade over the host half (scheduler.py: queue, token budget, preemption, finishing;
kv_pages.py: which pages hold each sequence's KV) and the device half (pipeline.py: one ring
call of K ticks; attention.py: attention over the pages).
`step()` is the whole serving loop:

    plan call n+1 (scheduler) -> dispatch it (async) -> read call n's log -> hand back finished

so the host's bookkeeping for one call overlaps the device's work on the next, and the device
always has a call queued. `generate`, `chat` and `logits` add their requests and step until
they are done; `add_request` + `step` serve a stream (the CLI, the trace benchmark).

The KV cache is a pool of pages of `block_size` positions per layer slot and stage, sized by
`kv_cache_memory` and allocated once; sequences take pages as they grow. The programs are a
fixed set (programs.py: a forward program per token bucket, a sample program per sampler mode),
never one per request or per length; `warmup()` compiles them before anything is served.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxpp.config import (
    EngineConfig,
    ModelConfig,
    SamplingParams,
    generation_defaults,
    with_quantization,
)
from jaxpp.distributed import check_same, smallest, to_host
from jaxpp.draft import load_draft
from jaxpp.grammar import EXCEPTIONS_PER_STATE, Compiler, GrammarPool, VocabLayout
from jaxpp.kv_pages import PagePool
from jaxpp.layout import (
    abstract_model,
    default_kv_budget,
    kv_bytes_per_page,
    make_layout,
    page_count,
    pipeline_shape,
    row_count,
)
from jaxpp.loading import load_params, model_identity
from jaxpp.model import rope_inv_freq
from jaxpp.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxpp.pipeline import ROW, Pipeline, Ring, RowControl, empty_log, empty_penalties, empty_ring
from jaxpp.programs import (
    GREEDY,
    GREEDY_GRAMMAR,
    GREEDY_VERIFY,
    SAMPLING,
    SAMPLING_GRAMMAR,
    SAMPLING_VERIFY,
    Programs,
)
from jaxpp.sampling import SamplerMode, SamplerRows
from jaxpp.scheduler import Call, Request, Scheduler, SlotLayout
from jaxpp.sharding import make_mesh

TICKS_AHEAD = 8  # ticks the host enqueues ahead of the device at most (LLM._pace)


class LLM:
    """A decoder-only model split into pipeline stages over dp x pp x tp devices.

    `model` is a local Hugging Face directory (config.json, *.safetensors, tokenizer files).
    `dtype` None keeps the checkpoint's dtype. The first dp*pp*tp devices are used. FP8
    checkpoints load as FP8; `quantization="fp8"` quantizes a float one on load (docs/fp8.md).

    Serving: up to `max_num_seqs` sequences at once (default 256), their KV in pages of
    `block_size` positions from a pool of `kv_cache_memory` bytes per device (default: 90% of
    an accelerator's free memory after the weights, 1 GiB per CPU process); a sequence may grow
    to `max_model_len` positions (default: the model's). Each tick a micro-batch carries at most
    `max_num_batched_tokens` tokens (default 2048 on a CPU, 8192 on accelerators): its decode
    tokens, then prompt tokens of as many requests as fit. While nothing waits, a call runs
    `decode_chunk` rounds of the ring (one token per decoding sequence each). With
    `enable_prefix_caching` (the default, as in vLLM) a prompt that starts like an earlier
    one reuses the KV pages of their common full pages instead of computing them again.
    Programs compile the first time a call needs them; `warmup()` compiles every one greedy
    and seeded traffic can meet first (a server does, before it says it is ready).
    `grammar_states`: the device pool for structured outputs' automata (grammar.py), in states
    (each a bitmask of the vocabulary: vocab/8 bytes, split over the vocab-parallel devices)
    and grammar.EXCEPTIONS_PER_STATE transition exceptions per state (8 bytes each).
    """

    def __init__(self, model: str | Path, config: EngineConfig | None = None, **settings):
        """`config`, or the settings as keywords (EngineConfig's fields: pp=2, dtype=...)."""
        if config is None:
            config = EngineConfig(**settings)
        elif settings:
            raise ValueError(f"LLM takes a config or settings, not both: {sorted(settings)}")
        self.engine_config = config
        self.model_dir = Path(model)
        # Processes of one job must agree before any of them loads (or waits in a collective).
        check_same(
            model=model_identity(self.model_dir),
            layout=repr(config.layout_fields()),
            serving=repr(config),
        )
        self.config = cfg = with_quantization(
            ModelConfig.from_dir(self.model_dir), config.quantization
        )
        self.mesh = make_mesh(config.dp, config.pp, config.tp)
        # The static shapes, shared with `jaxpp plan` (layout.py).
        self.model_layout = lay = make_layout(cfg, config, self.mesh.devices.flat[0].platform)
        self.dp, self.pp, self.tp = config.dp, config.pp, config.tp
        self.dtype = lay.dtype
        self.partition = lay.partition
        self.microbatches = lay.microbatches
        self.max_model_len = lay.max_model_len
        self.block_size = lay.block_size
        self.enable_prefix_caching = config.enable_prefix_caching
        self.max_num_batched_tokens = lay.token_budget
        self.decode_chunk = config.decode_chunk
        self.kv_heads = lay.kv_heads
        self.layers_per_stage = lay.layers_per_stage
        self.vocab_padded = lay.vocab_padded
        self._seed_rng = np.random.default_rng(config.seed)
        self._serial = 0
        self._load_and_build(lay)
        self._control: RowControl | None = None
        self._tables = None
        self._in_flight: tuple[Call, object, list] | None = None
        self._ahead: deque = deque()  # a marker of each tick enqueued and maybe not done
        self._requests: dict[int, tuple[str | None, list[int]]] = {}  # id -> (text, ids)
        self._unclaimed: list[RequestOutput] = []
        # Device idle time between calls, an upper bound: the host polls whether the call in
        # flight is done and adds the time since it last saw it running.
        self.device_idle_s = 0.0
        self._running_seen = 0.0
        self._tokenizer = None
        self.generation_defaults = generation_defaults(self.model_dir)
        self.last_run_stats: dict = {}
        # Prompts asked for n > 1 samples: first sample's serial -> each sample's output.
        self._groups: dict[int, dict[int, RequestOutput | None]] = {}
        self._group_of: dict[int, int] = {}  # a sample's serial -> its group

    def _load_and_build(self, lay) -> None:
        """This process's shards of the weights, the ring's programs and state, the KV page
        pool, the scheduler and the device pool of structured outputs' automata."""
        cfg, config = self.config, self.engine_config
        abstract = abstract_model(lay)
        graphdef, abstract_state = nnx.split(abstract)
        layer_graphdef, _ = nnx.split(abstract.layers[0])
        kv_replicas = lay.kv_heads // cfg.num_kv_heads
        self.state, self.load_stats = load_params(
            self.model_dir, abstract_state, cfg, self.mesh, lay.grid, kv_replicas, lay.windows
        )
        speculative = config.speculative_config
        self.draft, self.draft_state = None, ()  # the draft model proposing drafts (draft.py)
        if speculative is not None and speculative.method == "draft_model":
            self.draft, self.draft_state = load_draft(speculative, lay, self.mesh)
        self.max_num_seqs = row_count(lay, config.max_num_seqs)
        budget = config.kv_cache_memory or smallest(_default_kv_budget(self.mesh, self.state))
        pages = page_count(lay, budget)
        self.shape = pipeline_shape(lay, self.max_num_seqs, pages, config.decode_chunk, speculative)
        self.layout = SlotLayout(config.dp, self.microbatches, self.shape.rows)
        self.pipeline = Pipeline(
            self.mesh, graphdef, layer_graphdef, self.state, rope_inv_freq(cfg), self.dtype,
            self.shape, filled=lay.grid >= 0, draft=self.draft,
        )  # fmt: skip
        self.programs = Programs(self.pipeline)
        self.ring = self._empty_ring(penalties=False)
        pool = PagePool(
            config.dp, pages, lay.block_size, self.microbatches * self.shape.rows,
            lay.pages_per_seq, prefix_caching=config.enable_prefix_caching,
        )  # fmt: skip
        self.scheduler = Scheduler(
            self.layout, pool, lay.token_budget, config.pp, config.decode_chunk,
            cfg.eos_token_ids, stop_check=self._stop_string_hit, drafts=self.shape.drafts,
            verify_limit=speculative.disable_by_batch_size if speculative else None,
        )  # fmt: skip
        # Structured outputs: constraint -> automaton (host), and the device pool holding them.
        shards = config.pp * config.tp
        self.vocab_layout = VocabLayout(cfg.vocab_size, shards, lay.vocab_padded // shards)
        self._grammar_compiler: Compiler | None = None
        states = config.grammar_states
        self.grammar_pool = GrammarPool(
            self.mesh, self.vocab_layout, states, EXCEPTIONS_PER_STATE * states
        )
        self._grammar_users: dict[int, str] = {}  # serial -> the automaton it holds in the pool

    @property
    def tokenizer(self):
        """The model dir's tokenizer (transformers), loaded on first use; None if it has none."""
        if self._tokenizer is None:
            # False: looked and found none (a server asks for every token it streams).
            found = load_tokenizer(self.model_dir)
            self._tokenizer = False if found is None else found
        return None if self._tokenizer is False else self._tokenizer

    @property
    def grammar_compiler(self) -> Compiler:
        """Structured-output constraint -> automaton for this model's vocabulary (cached; safe to
        call from another thread, as a server's request handlers do)."""
        if self._grammar_compiler is None:
            self._grammar_compiler = Compiler(self.tokenizer, self.vocab_layout)
        return self._grammar_compiler

    @property
    def kv_pages(self) -> int:
        """KV pages per pipeline replica (each holds block_size positions of every layer)."""
        return self.shape.pages

    def kv_bytes_per_page(self) -> int:
        """KV bytes one page takes on each device of its replica."""
        return kv_bytes_per_page(self.model_layout)

    def _empty_ring(self, penalties: bool = False) -> Ring:
        return empty_ring(
            self.mesh,
            self.shape,
            self.pipeline.slots,
            self.dp,
            self.kv_heads,
            self.config.head_dim,
            self.config.hidden_size,
            self.vocab_padded,
            penalties,
            self.dtype,
        )

    # --- requests in -----------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | None = None,
    ) -> str:
        """Queue one request; its output comes back from `step()` when it finishes. Returns
        its request id."""
        params = self._params_list(sampling_params, 1)[0]
        text, ids = self._encode(prompt, 0)
        return str(self._add_samples(ids, params, text))

    def _add_samples(self, ids: list[int], params: SamplingParams, text: str | None) -> int:
        """Queue params.n samples of one prompt (one request each: they share the prompt's
        pages through the prefix cache); returns the serial their joint output comes under."""
        if params.n == 1:
            return self._add(ids, params, text).id
        samples = [
            self._add(ids, dataclasses.replace(params, n=1, seed=_nth_seed(params.seed, j)), text)
            for j in range(params.n)
        ]
        group = samples[0].id
        self._groups[group] = {r.id: None for r in samples}
        for r in samples:
            self._group_of[r.id] = group
        return group

    def _add(
        self, ids: list[int], params: SamplingParams, text: str | None, score: bool = False
    ) -> Request:
        drawn = int(self._seed_rng.integers(0, 2**32))
        score = score or params.max_tokens == 0  # scores its prompt, generates nothing
        # Never run past max_model_len: the last token needs no cache slot, hence the +1.
        budget = min(params.max_tokens, self.max_model_len - len(ids) + 1)
        if budget != params.max_tokens:
            params = dataclasses.replace(
                params, max_tokens=budget, min_tokens=min(params.min_tokens, budget)
            )
        self._check_fits(len(ids), 1 if score else params.max_tokens)
        request = Request(
            id=self._serial,
            prompt=ids,
            params=params,
            seed=params.seed if params.seed is not None else drawn,
            arrival=time.perf_counter(),
            score=score,
        )
        if params.structured_outputs is not None:
            self._hold_automaton(request)
        self._serial += 1
        self._requests[request.id] = (text, ids)
        self.scheduler.add(request)
        return request

    def _hold_automaton(self, request: Request) -> None:
        """Compile (or find) the request's constraint and place its automaton in the device
        pool, before the request is queued: a constraint that cannot be served is its own
        ValueError."""
        automaton = self.grammar_compiler.compile(request.params.structured_outputs)
        request.automaton = automaton
        request.grammar_base = self.grammar_pool.acquire(automaton)
        self._grammar_users[request.id] = automaton.key

    def _release_automaton(self, serial: int) -> None:
        key = self._grammar_users.pop(serial, None)
        if key is not None:
            self.grammar_pool.release(key)

    def _check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """A request the KV pool can never hold, even alone, is refused (any other waits for
        pages, or preempts younger requests, and always completes)."""
        need = prompt_len + max_tokens - 1
        pool = self.shape.pages * self.block_size
        if need > pool:
            raise ValueError(
                f"a request of {prompt_len} prompt tokens + max_tokens={max_tokens} needs up to "
                f"{need} KV positions but the pool holds {pool} ({self.shape.pages} pages of "
                f"{self.block_size}); lower max_tokens or raise kv_cache_memory"
            )

    def _encode(self, prompt, index: int) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir}: no tokenizer files; pass token ids")
            return prompt, self._check_ids(self.tokenizer.encode(prompt), index)
        return None, self._check_ids(prompt, index)

    def _check_ids(self, seq: Sequence[int], index: int) -> list[int]:
        if isinstance(seq, str | bytes) or not isinstance(seq, Sequence | np.ndarray):
            raise ValueError(
                f"prompt {index} must be a string or a list of token ids, got {type(seq).__name__}"
            )
        wrong = [t for t in seq if isinstance(t, bool) or not isinstance(t, int | np.integer)]
        if wrong:
            raise ValueError(f"prompt {index} has a non-integer token id {wrong[0]!r}")
        ids = [int(t) for t in seq]
        if not ids:
            raise ValueError(f"prompt {index} is empty: expected at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {index} has token id {bad[0]} outside the vocabulary "
                f"[0, {self.config.vocab_size})"
            )
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens, longer than max_model_len="
                f"{self.max_model_len}"
            )
        return ids

    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            self._check_against_model(sampling_params, "sampling_params")
            return [sampling_params] * n
        if isinstance(sampling_params, dict | str | bytes) or not isinstance(
            sampling_params, Sequence
        ):
            raise ValueError(
                "sampling_params must be a SamplingParams or a list of them, got "
                f"{type(sampling_params).__name__}"
            )
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(
                f"sampling_params has {len(params)} entries for {n} prompts: expected one each"
            )
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(
                    f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}"
                )
            self._check_against_model(p, f"sampling_params[{i}]")
        return params

    def _check_against_model(self, p: SamplingParams, name: str) -> None:
        """What SamplingParams cannot know alone: the vocabulary bounds its ids and logprobs."""
        vocab = self.config.vocab_size
        for field in ("logprobs", "prompt_logprobs"):
            if (getattr(p, field) or 0) > vocab:
                raise ValueError(
                    f"{name}.{field}={getattr(p, field)} is above the vocabulary ({vocab})"
                )
        bad = [t for t in p.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"{name}.stop_token_ids has {bad[0]}, outside the vocabulary [0, {vocab})"
            )

    def default_sampling_params(self) -> SamplingParams:
        """vLLM's defaults, overridden by what the model's generation_config.json recommends."""
        return SamplingParams(**self.generation_defaults)

    # --- the serving loop --------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.unfinished or self._in_flight is not None

    @property
    def num_waiting_requests(self) -> int:
        """Requests queued for a row and pages (not yet admitted, or preempted)."""
        return len(self.scheduler.waiting)

    def running_logprobs(self, starts: dict[str, int]) -> dict[str, list[dict[int, Logprob]]]:
        """For each unfinished request named in `starts` (request id -> a token index) that
        asked for logprobs, the entries of its tokens from that index on, as
        CompletionOutput.logprobs has them: what a server streams with each token's text."""
        scheduler = self.scheduler
        return {
            str(r.id): [self._logprob_entry(r, j) for j in range(starts[str(r.id)], len(r.tokens))]
            for r in (*scheduler.running, *scheduler.waiting)
            if r.params.logprobs is not None and str(r.id) in starts
        }

    def running_tokens(self) -> dict[str, list[int]]:
        """Tokens each unfinished request has sampled so far, as far as the logs have told the
        host (a preempted request keeps its own): what a server streams before the end. The
        lists are the engine's own; read them, do not change them."""
        scheduler = self.scheduler
        return {str(r.id): r.tokens for r in (*scheduler.running, *scheduler.waiting)}

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (the pages no request holds become blank)."""
        self.scheduler.pool.forget_prefixes()

    def abort_request(self, request_id: str) -> None:
        """Forget a request: dropped if queued, withdrawn from its slot if running; no output
        comes back for it. Unknown or finished ids are ignored."""
        serial = int(request_id)
        serials = set(self._groups.pop(serial, None) or {serial})
        self.scheduler.abort(serials)
        for s in serials:
            self._requests.pop(s, None)
            self._group_of.pop(s, None)
            self._release_automaton(s)

    def step(self) -> list[RequestOutput]:
        """Plan and dispatch the next ring call, then read the previous call's log: returns the
        requests that finished there (possibly none)."""
        if self._unclaimed:
            done, self._unclaimed = self._unclaimed, []
            return done
        call = self.scheduler.schedule()
        if self._in_flight is not None:
            self._poll(self._in_flight[1])
        dispatched = self._dispatch(call) if call is not None else None
        self._running_seen = time.perf_counter()
        finished = []
        if self._in_flight is not None:
            previous, log, collected = self._in_flight
            finished = self.scheduler.update(previous, to_host(log), to_host(collected))
        self._in_flight = (call, *dispatched) if call is not None else None
        stats = self.scheduler.stats.as_dict() if finished else {}
        outputs = self._join_samples([self._output(r, stats) for r in finished])
        if dispatched is not None:
            self._poll(dispatched[0])
        return outputs

    def _poll(self, log) -> None:
        now = time.perf_counter()
        if log.tags.is_ready():
            self.device_idle_s += now - self._running_seen
        self._running_seen = now

    def _dispatch(self, call: Call):
        """Enqueue every tick of the call (a forward and a sample program each) without waiting
        for any; returns the call's log and, for a collecting call, each tick's logits."""
        put = self._upload(call)
        penalties = self.ring.penalties
        if call.mode.penalties and penalties.counts.shape[1] == 0:
            penalties = empty_penalties(self.mesh, penalties.counts.shape[0], self.vocab_padded)
        log = empty_log(self.mesh, self.shape, self.dp, call.mode.logprobs, call.start_tick)
        stages, rows, _, automata, page_tokens = self.ring
        ctl, uploaded, collected = self._control, {}, []
        for batch in call.batches:
            if id(batch) not in uploaded:
                uploaded[id(batch)] = jax.tree.map(put, batch)
            batch = uploaded[id(batch)]
            if call.mode.penalties:  # the prompt tokens entering are seen by their rows
                penalties = self.programs.count(penalties, ctl.prompt_len, batch)
            args = (self.state, stages, rows, ctl.tag, self._tables, batch, log, page_tokens,
                    ctl.last_position, self.draft_state)  # fmt: skip
            stages, leaving, log, page_tokens, *more = self.programs.forward(
                call.collect, call.mode.verify, *args
            )
            collected += more
            rows, log, penalties, automata = self._sample(
                call.mode, rows, leaving, log, penalties, automata
            )
            self._pace(leaving.tick)
        self.ring = Ring(stages, rows, penalties, automata, page_tokens)
        return log, collected

    def _sample(self, mode, rows, leaving, log, penalties, automata):
        """One tick's sample program: a penalties mode also takes and updates the penalty
        counts, a grammar mode the rows' automata (and reads the pool's tables); returns
        (rows, log, penalties, automata)."""
        extra = (penalties,) if mode.penalties else ()
        if mode.grammar:
            extra += (automata, self.grammar_pool.allocate())
        rows, log, *updated = self.programs.sample(
            mode, self.state, rows, self._control, leaving, log, *extra
        )
        if mode.penalties:
            penalties = updated.pop(0)
        if mode.grammar:
            automata = updated.pop(0)
        return rows, log, penalties, automata

    def _pace(self, done) -> None:
        """Keep at most TICKS_AHEAD ticks enqueued: wait for the oldest when there are more.
        XLA:CPU runs a multi-device program's per-device work on a pool of one thread per
        device, and a device takes at most 32 programs in flight; past that the pool's
        threads block on the limit while the work that would free it waits for a thread (seen
        as a 40 s collective timeout at dp=2 x pp=2 x tp=2). A window of 8 ticks keeps
        accelerators fed too."""
        self._ahead.append(done)
        while len(self._ahead) > TICKS_AHEAD:
            self._ahead.popleft().block_until_ready()

    def _upload(self, call: Call) -> Callable:
        """The call's row control and block tables, when they changed, onto the devices;
        returns the function that puts a row-sharded host array there."""
        sharding = jax.sharding.NamedSharding(self.mesh, ROW)

        def put(a):
            return jax.device_put(a, sharding)

        if call.control is not None:
            c = call.control
            self._control = RowControl(
                put(c["tag"]),
                SamplerRows(**{k: put(v) for k, v in c["sampler"].items()}),
                put(c["prompt_len"]),
                put(c["generated0"]),
                put(c["grammar_start"]),
                put(c["last_position"]),
            )
        if call.tables is not None:
            self._tables = put(call.tables)
        return put

    def _run(self, ids: list[int], on_finish: Callable | None) -> dict[int, RequestOutput]:
        """Step until the requests `ids` are done; others finishing meanwhile are kept for
        the next `step()`."""
        self.scheduler.reset_stats()
        index = {serial: i for i, serial in enumerate(ids)}
        done: dict[int, RequestOutput] = {}
        try:
            while len(done) < len(index):
                for out in self.step():
                    serial = int(out.request_id)
                    if serial not in index:
                        self._unclaimed.append(out)
                        continue
                    done[serial] = out
                    if on_finish is not None:
                        on_finish(index[serial], out)
        except BaseException:
            for serial in set(index) - set(done):
                self.abort_request(str(serial))
            raise
        self.last_run_stats = self.scheduler.stats.as_dict()
        return done

    def warmup(self, log: Callable[[str], None] | None = None) -> int:
        """Compile every program greedy and seeded traffic can meet, constrained or not: the
        forward program of each token bucket and the greedy and sampling sample programs, each
        also in its grammar mode (structured outputs; the device pool of automata is allocated
        for it), in its verify mode (a speculating engine), and the penalties mode when the
        model's generation defaults penalise every request, by running idle ticks (nothing is
        in flight when it runs). Returns how many programs were compiled; `log(line)` hears a
        progress line per program and the total."""
        if self.has_unfinished_requests():
            raise RuntimeError("warmup() needs an engine with no requests in flight")
        before, start = self.compiled_programs, time.perf_counter()
        buckets = self.scheduler.buckets.sizes
        modes = (GREEDY, SAMPLING, GREEDY_GRAMMAR, SAMPLING_GRAMMAR)
        if self.shape.drafts:
            modes += (GREEDY_VERIFY, SAMPLING_VERIFY)
        every = (GREEDY,)  # modes whose programs (the forward's, the penalty count's) each
        # bucket compiles anew; a call that verifies runs the forward's proposing twin
        every += (GREEDY_VERIFY,) if self.shape.drafts else ()
        defaults = self.default_sampling_params()
        if defaults.penalized:  # the model's generation_config.json asks every request for it
            mode = SamplerMode.of([defaults])
            modes += (mode, dataclasses.replace(mode, grammar=True))
            every += (mode,)
        for i, bucket in enumerate(buckets):
            for mode in modes if i == 0 else every:
                call = self.scheduler.idle_call(bucket)  # one tick of the ring each
                call.mode = mode
                self._dispatch(call)
            if log is not None:
                log(f"warm-up: {bucket}-token tick compiled ({i + 1}/{len(buckets)}, "
                    f"{time.perf_counter() - start:.1f} s)")  # fmt: skip
        jax.block_until_ready(self.ring)
        compiled = self.compiled_programs - before
        if log is not None:
            log(f"warm-up: {compiled} programs in {time.perf_counter() - start:.1f} s")
        return compiled

    # --- batch APIs --------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_finish: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions, in input order. `on_finish(i, output)` is called for each
        request as soon as it finishes."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        serials = [
            self._add_samples(ids, p, text) for (text, ids), p in zip(encoded, params, strict=True)
        ]
        done = self._run(serials, on_finish)
        return [done[serial] for serial in serials]

    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_finish: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [self.chat_prompt(c) for c in conversations]
        # The template already holds any BOS: encode without adding special tokens again.
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

        def finished(i: int, out: RequestOutput) -> None:
            out.prompt = texts[i]
            if on_finish is not None:
                on_finish(i, out)

        outputs = self.generate(ids, sampling_params, finished)
        return outputs

    def chat_prompt(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> str:
        """The prompt text the tokenizer's chat template makes of `messages` (and of `tools`,
        OpenAI's function list, for templates that show them)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_dir}: the tokenizer has no chat template")
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("content"), str)
                or not isinstance(m.get("role"), str)
            ):
                raise ValueError(f"message {i} must be {{'role': str, 'content': str}}, got {m!r}")
        return self.tokenizer.apply_chat_template(
            list(messages), tools=tools, tokenize=False, add_generation_prompt=True
        )

    def logits(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Float32 logits [len(seq), vocab_size] at every position of each sequence, computed
        by the same chunked prefill that serves generate."""
        seqs = [self._check_ids(s, i) for i, s in enumerate(token_ids)]
        params = SamplingParams(max_tokens=1, temperature=0.0)
        requests = [self._add(ids, params, None, score=True) for ids in seqs]
        self._run([r.id for r in requests], None)
        vocab = self.config.vocab_size
        return [
            np.concatenate([r.logits[k] for k in sorted(r.logits)])[:, :vocab] for r in requests
        ]

    # --- outputs -----------------------------------------------------------------------------

    def _output(self, request: Request, stats: dict) -> RequestOutput:
        text, ids = self._requests.pop(request.id)
        self._release_automaton(request.id)
        decode_time = request.finish_time - request.first_token_time
        n = len(request.tokens)
        metrics = RequestMetrics(
            arrival_time=request.arrival,
            first_token_time=request.first_token_time,
            finished_time=request.finish_time,
            time_to_first_token=request.first_token_time - request.arrival,
            decode_time=decode_time,
            decode_tokens_per_s=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            pipeline=stats,
            first_scheduled_time=request.admitted,
        )
        # LLM.logits' requests (score, max_tokens 1) answer with their logits, no completion;
        # a max_tokens=0 request (score) with its empty completion and prompt_logprobs.
        completion = (
            [] if request.score and request.params.max_tokens else [self._completion(request)]
        )
        output = RequestOutput(str(request.id), text, ids, completion, True, metrics)
        if request.params.prompt_logprobs is not None:
            output.prompt_logprobs = self._prompt_logprobs(request)
        return output

    def _prompt_logprobs(self, request: Request) -> list[dict[int, Logprob] | None]:
        """The logprob of each prompt token given the tokens before it (none for the first),
        its rank, and the top prompt_logprobs tokens: log_softmax of the logits LLM.logits
        returns for the same tokens (the same collecting forward), position i - 1 scoring
        token i."""
        top = request.params.prompt_logprobs
        prompt = np.asarray(request.prompt)
        logits = np.concatenate([request.logits[k] for k in sorted(request.logits)])
        logits = logits[: len(prompt) - 1, : self.config.vocab_size].astype(np.float64)
        peak = logits.max(axis=-1, keepdims=True)
        lse = peak + np.log(np.sum(np.exp(logits - peak), axis=-1, keepdims=True))
        logprobs = logits - lse
        chosen = np.take_along_axis(logprobs, prompt[1:, None], axis=-1)[:, 0]
        ranks = 1 + np.sum(logprobs > chosen[:, None], axis=-1)
        best = _top_ids(logprobs, top)
        entries: list[dict[int, Logprob] | None] = [None]
        for i, tok in enumerate(prompt[1:].tolist()):
            entry = {tok: Logprob(float(chosen[i]), int(ranks[i]), self._piece(tok))}
            for rank, t in enumerate(best[i].tolist(), 1):
                entry.setdefault(t, Logprob(float(logprobs[i, t]), rank, self._piece(t)))
            entries.append(entry)
        return entries

    def _stop_string_hit(self, request: Request) -> bool:
        text = self.detokenize(request.tokens, request.params)
        return any(s in text for s in request.params.stop)

    def detokenize(self, token_ids: Sequence[int], p: SamplingParams) -> str:
        """The text of `token_ids` as a completion of `p` shows it (before stop strings)."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=p.skip_special_tokens)

    def _join_samples(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Outputs as the caller sees them: the n samples of one prompt come back together,
        once the last of them is done, as one output of n completions."""
        ready = []
        for out in outputs:
            group = self._group_of.pop(int(out.request_id), None)
            if group is None:
                ready.append(out)
                continue
            parts = self._groups[group]
            parts[int(out.request_id)] = out
            if all(p is not None for p in parts.values()):
                del self._groups[group]
                ready.append(_joined(list(parts.values())))
        return ready

    def _completion(self, request: Request) -> CompletionOutput:
        p = request.params
        token_ids = list(request.tokens)
        stop_ids = set(p.stop_token_ids) | (
            set() if p.ignore_eos else set(self.config.eos_token_ids)
        )
        finish, reason = "length", None
        if token_ids and token_ids[-1] in stop_ids and len(token_ids) > p.min_tokens:
            # EOS / a stop token ended it: vLLM keeps the token in token_ids.
            finish, reason = "stop", token_ids[-1]
        elif request.grammar_complete:  # its constraint is met and allows nothing more
            finish = "stop"
        text = self.detokenize(token_ids, p)
        hits = [(text.find(s), s) for s in p.stop if s in text]
        if hits:
            _, stop = min(hits)
            # Keep the tokens up to the one that completed the stop string, as vLLM does.
            n = next(
                n for n in range(1, len(token_ids) + 1) if stop in self.detokenize(token_ids[:n], p)
            )
            token_ids = token_ids[:n]
            text = self.detokenize(token_ids, p)
            text, finish, reason = text[: text.find(stop)], "stop", stop
        logprobs = cumulative = None
        if p.logprobs is not None:
            logprobs = [self._logprob_entry(request, j) for j in range(len(token_ids))]
            cumulative = float(np.sum(request.logprobs[: len(token_ids)]))
        return CompletionOutput(0, text, token_ids, finish, reason, cumulative, logprobs)

    def _logprob_entry(self, request: Request, j: int) -> dict[int, Logprob]:
        """Generated token j's logprob and the top `logprobs` alternatives (ranked)."""
        tok, n = request.tokens[j], request.params.logprobs
        top_ids, top_lp = request.top[j]
        entry = {tok: Logprob(request.logprobs[j], None, self._piece(tok))}
        for rank, (tid, lp) in enumerate(zip(top_ids[:n], top_lp[:n], strict=True), 1):
            if int(tid) == tok:
                entry[tok].rank = rank
            entry.setdefault(int(tid), Logprob(float(lp), rank, self._piece(int(tid))))
        return entry

    def _piece(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    # --- introspection -----------------------------------------------------------------------

    @property
    def compiled_programs(self) -> int:
        """Step programs compiled so far (a few shapes, never one per request or length)."""
        return self.programs.compiled

    def device_memory(self) -> list[dict]:
        """Bytes of parameters and KV cache held by each device, read from the shards."""
        usage: dict[int, dict] = {
            d.id: {"device": d.id, "params": 0, "kv_cache": 0} for d in self.mesh.devices.flat
        }
        for key, tree in (("params", self.state), ("kv_cache", self.ring.stages.cache)):
            for leaf in jax.tree.leaves(tree):
                for shard in leaf.addressable_shards:
                    usage[shard.device.id][key] += shard.data.nbytes
        return list(usage.values())


def _nth_seed(seed: int | None, j: int) -> int | None:
    return None if seed is None else seed + j


def _joined(parts: list[RequestOutput]) -> RequestOutput:
    """One output of the samples' completions (index j: sample j); its times span them all."""
    first, metrics = parts[0], [p.metrics for p in parts]
    completions = [dataclasses.replace(p.outputs[0], index=j) for j, p in enumerate(parts)]
    start = min(m.first_token_time for m in metrics)
    end = max(m.finished_time for m in metrics)
    later = sum(len(c.token_ids) - 1 for c in completions)
    joint = RequestMetrics(
        arrival_time=first.metrics.arrival_time,
        first_token_time=start,
        finished_time=end,
        time_to_first_token=start - first.metrics.arrival_time,
        decode_time=end - start,
        decode_tokens_per_s=later / (end - start) if end > start else 0.0,
        pipeline=metrics[-1].pipeline,
        first_scheduled_time=min(m.first_scheduled_time for m in metrics),
    )
    return dataclasses.replace(first, outputs=completions, metrics=joint)


def _top_ids(logprobs: np.ndarray, top: int) -> np.ndarray:
    """The ids of each row's `top` largest entries, largest first (a partition, then a sort of
    those only: not a sort of the vocabulary per position)."""
    if top == 0:
        return np.zeros((len(logprobs), 0), np.int64)
    best = np.argpartition(-logprobs, top - 1, axis=-1)[:, :top]
    order = np.argsort(-np.take_along_axis(logprobs, best, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(best, order, axis=-1)


def _default_kv_budget(mesh, state) -> int:
    """layout.default_kv_budget with what this process's first device reports of its memory
    (shared by the process's devices)."""
    device = mesh.local_devices[0]
    stats = (device.memory_stats() if device.platform != "cpu" else None) or {}
    return default_kv_budget(
        device.platform,
        len(mesh.local_devices),
        stats.get("bytes_limit"),
        stats.get("bytes_in_use", 0),
    )


def load_tokenizer(model_dir: Path):
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    # jaxpp needs only transformers' tokenizers: silence its "PyTorch was not found" advice.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer  # noqa: PLC0415 - slow import, only when needed

    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)


__all__ = ["LLM"]
