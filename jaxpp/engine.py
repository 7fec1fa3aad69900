"""`LLM`: load a model onto the mesh, batch requests into shape buckets, run the pipeline.

A generate call sorts requests by prompt length and serves them in waves of at most
`max_num_seqs` sequences. A wave is padded to a shape bucket — batch to a multiple of
dp x micro-batches times a power of two, prompt length and cache length to the next size in
16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x powers of two) — so the programs compile once
per bucket, never per prompt. Each wave: one GPipe prefill (which also
samples every sequence's first token), then decode-ring calls of `decode_chunk` tokens each until
every sequence is done. The host only looks at the device between calls (to apply stop strings).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpp.checkpoint import Checkpoint, load_state
from jaxpp.config import ModelConfig, SamplingParams, generation_defaults
from jaxpp.model import Transformer, rope_inv_freq
from jaxpp.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput

# `layer_partition` is also an argument name of LLM, hence the alias.
from jaxpp.partition import layer_grid
from jaxpp.partition import layer_partition as split_layers
from jaxpp.pipeline import (
    ROW,
    SCHEDULE,
    TRACE_TICKS,
    DecodeState,
    KVCache,
    Pipeline,
    PipelineShape,
    RunStats,
    empty_cache,
    host_array,
)
from jaxpp.sampling import SamplerMode, SamplerRows, sampler_rows
from jaxpp.sharding import make_mesh, padded_vocab

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _pow2_at_least(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _size_bucket(n: int, minimum: int = 16) -> int:
    """The smallest of 2^k and 1.5 * 2^k that is >= n: at most 33% padding (a power of two
    wastes up to 50%), two compiled shapes per octave. Decode reads the whole cache every tick,
    so its length is bandwidth: 192 instead of 256 for a 64 + 128 token request."""
    p = _pow2_at_least(n, minimum)
    three_quarters = p * 3 // 4
    return three_quarters if three_quarters >= max(n, minimum) else p


class LLM:
    """A decoder-only model split into pipeline stages over dp x pp x tp devices.

    `model` is a local Hugging Face directory (config.json, *.safetensors, tokenizer files).
    `dtype` None keeps the checkpoint's dtype. The first dp*pp*tp devices are used.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        dtype: str | None = None,
        pp: int = 1,
        tp: int = 1,
        dp: int = 1,
        layer_partition: str | Sequence[int] | None = None,
        num_microbatches: int | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        max_num_seqs: int = 256,
        decode_chunk: int = 32,
    ):
        self.model_dir = Path(model)
        self.config = cfg = ModelConfig.from_dir(self.model_dir)
        checkpoint = Checkpoint(self.model_dir)
        dtype_name = dtype or cfg.dtype
        if dtype_name not in DTYPES:
            raise ValueError(
                f"dtype={dtype_name!r} is not supported: expected one of {list(DTYPES)}"
            )
        self.dtype = DTYPES[dtype_name]
        self.mesh = make_mesh(dp, pp, tp)
        self.dp, self.pp, self.tp = dp, pp, tp
        kv_heads = self._check_tensor_parallel(cfg, tp)
        self.partition = split_layers(cfg.num_layers, pp, layer_partition)
        grid, _ = layer_grid(self.partition)
        self.microbatches = num_microbatches or pp
        if not isinstance(self.microbatches, int) or self.microbatches < pp:
            raise ValueError(
                f"num_microbatches={num_microbatches!r} is invalid: the decode ring needs at "
                f"least one micro-batch per stage (>= pp={pp})"
            )
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if not isinstance(self.max_model_len, int) or self.max_model_len < 2:
            raise ValueError(f"max_model_len={max_model_len!r} is invalid: expected an int >= 2")
        self.max_num_seqs = max_num_seqs
        self.decode_chunk = decode_chunk
        self._seed_rng = np.random.default_rng(seed)
        self._request_counter = 0

        vocab = padded_vocab(cfg.vocab_size, self.mesh)
        windows = np.where(grid >= 0, np.array(cfg.sliding_windows + (0,))[grid], 0)
        abstract = nnx.eval_shape(
            lambda: Transformer(cfg, pp, grid.shape[1], vocab, kv_heads, self.dtype)
        )
        graphdef, abstract_state = nnx.split(abstract)
        layer_graphdef, _ = nnx.split(abstract.layers[0])
        kv_replicas = kv_heads // cfg.num_kv_heads
        self.state = load_state(
            abstract_state, cfg, checkpoint, self.mesh, grid, kv_replicas, windows
        )
        self.kv_heads = kv_heads
        self.layers_per_stage = grid.shape[1]
        self.pipeline = Pipeline(
            self.mesh,
            graphdef,
            layer_graphdef,
            self.state,
            rope_inv_freq(cfg),
            self.dtype,
            PipelineShape(pp, self.microbatches, cfg.vocab_size),
        )
        self._tokenizer = None
        self.generation_defaults = generation_defaults(self.model_dir)
        self.last_run_stats: dict = {}
        self._cache: KVCache | None = None

    @property
    def tokenizer(self):
        """The model dir's tokenizer (transformers), loaded on first use; None if it has none."""
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.model_dir)
        return self._tokenizer

    @staticmethod
    def _check_tensor_parallel(cfg: ModelConfig, tp: int) -> int:
        """Validate the tp split; return how many KV heads are stored (replicated if < tp)."""
        if cfg.num_heads % tp:
            raise ValueError(
                f"tp={tp} is invalid: num_attention_heads={cfg.num_heads} is not divisible by it"
            )
        for name, size in (
            ("intermediate_size", cfg.intermediate_size),
            ("moe_intermediate_size", cfg.moe_intermediate_size),
            ("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size),
        ):
            if size % tp:
                raise ValueError(f"tp={tp} is invalid: {name}={size} is not divisible by it")
        if cfg.num_kv_heads % tp == 0:
            return cfg.num_kv_heads
        if tp % cfg.num_kv_heads == 0:
            return tp
        raise ValueError(
            f"tp={tp} is invalid: num_key_value_heads={cfg.num_kv_heads} must divide tp "
            "or be divisible by it"
        )

    # --- logits --------------------------------------------------------------------------------

    def logits(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Float32 logits [len(seq), vocab_size] at every position of each sequence."""
        seqs = [self._check_ids(s, i) for i, s in enumerate(token_ids)]
        if not seqs:
            return []
        results: list[np.ndarray] = []
        for start in range(0, len(seqs), self.max_num_seqs):
            wave = seqs[start : start + self.max_num_seqs]
            tokens, lengths = self._pad_prompts(wave)
            logits, stats = self.pipeline.prefill(self.state, tokens, lengths, None, None, None)
            self._record_stats(prefill=stats)
            logits = host_array(logits)
            results += [logits[i, : len(s), : self.config.vocab_size] for i, s in enumerate(wave)]
        return results

    def _check_ids(self, seq: Sequence[int], index: int) -> list[int]:
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

    def _batch_bucket(self, n: int) -> int:
        unit = self.dp * self.microbatches
        return unit * _pow2_at_least(math.ceil(n / unit))

    def wave_shape(self, prompt_lens: list[int], budgets: list[int]) -> tuple[int, ...]:
        """(rows, prompt width, cache length, output slots): the shape bucket of one wave."""
        width = _size_bucket(max(prompt_lens))
        longest = max(n + b for n, b in zip(prompt_lens, budgets, strict=True))
        cache_len = max(width, min(_size_bucket(longest), self.max_model_len))
        return self._batch_bucket(len(prompt_lens)), width, cache_len, _pow2_at_least(max(budgets))

    def _pad_prompts(self, seqs: list[list[int]]) -> tuple[jax.Array, jax.Array]:
        rows = self._batch_bucket(len(seqs))
        width = _size_bucket(max(len(s) for s in seqs))
        tokens = np.zeros((rows, width), np.int32)
        lengths = np.ones(rows, np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
            lengths[i] = len(s)
        sharding = jax.sharding.NamedSharding(self.mesh, ROW)
        return jax.device_put(tokens, sharding), jax.device_put(lengths, sharding)

    # --- generate ------------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_finish: Callable[[int, RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions. `on_finish(i, output)` is called as each wave finishes."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        texts, ids = [], []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError(f"{self.model_dir}: no tokenizer files; pass token ids")
                texts.append(prompt)
                ids.append(self._check_ids(self.tokenizer.encode(prompt), i))
            else:
                texts.append(None)
                ids.append(self._check_ids(prompt, i))
        seeds = []
        for p in params:
            drawn = int(self._seed_rng.integers(0, 2**32))
            seeds.append(p.seed if p.seed is not None else drawn)
        first_id = self._request_counter
        self._request_counter += len(prompts)

        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        results: list[RequestOutput | None] = [None] * len(prompts)
        for start in range(0, len(order), self.max_num_seqs):
            wave = order[start : start + self.max_num_seqs]
            outputs = self._generate_wave(
                [ids[i] for i in wave], [params[i] for i in wave], [seeds[i] for i in wave]
            )
            for i, out in zip(wave, outputs, strict=True):
                out.request_id = str(first_id + i)
                out.prompt = texts[i]
                results[i] = out
                if on_finish is not None:
                    on_finish(i, out)
        return results

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

    def chat_prompt(self, messages: Sequence[dict]) -> str:
        """The prompt text the tokenizer's chat template makes of `messages`."""
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
            list(messages), tokenize=False, add_generation_prompt=True
        )

    def default_sampling_params(self) -> SamplingParams:
        """vLLM's defaults, overridden by what the model's generation_config.json recommends."""
        return SamplingParams(**self.generation_defaults)

    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(
                f"sampling_params has {len(params)} entries for {n} prompts: expected one each"
            )
        return params

    def _generate_wave(
        self, prompts: list[list[int]], params: list[SamplingParams], seeds: list[int]
    ) -> list[RequestOutput]:
        start = time.perf_counter()
        # Never run past max_model_len: the last token needs no cache slot, hence the +1.
        budgets = [
            min(p.max_tokens, self.max_model_len - len(s) + 1)
            for s, p in zip(prompts, params, strict=True)
        ]
        tokens, lengths = self._pad_prompts(prompts)
        rows, _, cache_len, max_new = self.wave_shape([len(s) for s in prompts], budgets)
        mode = SamplerMode.of(params)
        capped = [
            p if p.max_tokens == b else _replace_max(p, b)
            for p, b in zip(params, budgets, strict=True)
        ]
        rows_host = sampler_rows(capped, seeds, self.config.eos_token_ids, rows)
        sampler = SamplerRows(
            *(jax.device_put(a, jax.sharding.NamedSharding(self.mesh, ROW)) for a in rows_host)
        )

        cache = self._take_cache(rows, cache_len)
        cache, first, seen, prefill_stats = self.pipeline.prefill(
            self.state, tokens, lengths, cache, sampler, mode
        )
        first_tokens = host_array(first.tokens)
        ttft = time.perf_counter() - start

        d = self._decode_state(
            cache, first, first_tokens, seen, lengths, rows_host, max_new, mode, len(prompts)
        )
        decode_start = time.perf_counter()
        has_stop_strings = any(p.stop for p in params)
        while not host_array(d.done).all():
            ring_ticks = self.decode_chunk * self.microbatches + self.pp - 1
            tick_end = jnp.int32(int(host_array(d.tick)) + ring_ticks)
            d = self.pipeline.decode(self.state, d, sampler, tick_end, mode)
            if has_stop_strings:
                d = self._apply_stop_strings(d, params)
        decode_time = time.perf_counter() - decode_start
        self._cache = d.cache
        self._record_stats(prefill=prefill_stats, decode=d.stats)

        generated = host_array(d.generated)
        out_tokens = host_array(d.out_tokens)
        logprob = host_array(d.out_logprob)
        top_ids, top_lp = host_array(d.top_ids), host_array(d.top_logprobs)
        total_new = int(generated[: len(prompts)].sum())
        metrics = RequestMetrics(
            time_to_first_token=ttft,
            decode_time=decode_time,
            decode_tokens_per_s=(total_new - len(prompts)) / decode_time if decode_time else 0.0,
            pipeline=dict(self.last_run_stats),
        )
        outputs = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            n = int(generated[i])
            completion = self._completion(
                list(out_tokens[i, :n]),
                p,
                logprob[i, :n],
                top_ids[i, :n],
                top_lp[i, :n],
            )
            outputs.append(RequestOutput("", None, prompt, [completion], True, metrics))
        return outputs

    def _take_cache(self, rows: int, cache_len: int) -> KVCache:
        """The previous wave's cache when the bucket matches (no new allocation), else zeros."""
        hd = self.config.head_dim
        cache, self._cache = self._cache, None
        if cache is not None and cache.v[0].shape == (self.pp, rows, self.kv_heads, cache_len, hd):
            return cache
        return empty_cache(
            self.mesh,
            self.pp,
            self.layers_per_stage,
            rows,
            cache_len,
            self.kv_heads,
            hd,
            self.dtype,
        )

    def _decode_state(
        self, cache, first, first_tokens, seen, lengths, rows_host, max_new, mode, real_rows: int
    ):
        rows = first_tokens.shape[0]
        row_sharding = jax.sharding.NamedSharding(self.mesh, ROW)

        def put(a):
            return jax.device_put(a, row_sharding)

        stop_hit = (first_tokens[:, None] == rows_host.stop_ids).any(-1) & (
            rows_host.min_tokens < 1
        )
        done = stop_hit | (rows_host.max_tokens <= 1) | (np.arange(rows) >= real_rows)
        n_top = mode.logprobs
        out_tokens = np.zeros((rows, max_new), np.int32)
        out_tokens[:, 0] = first_tokens
        out_lp = np.zeros((rows, max_new), np.float32)
        top_ids = np.zeros((rows, max_new, n_top), np.int32)
        top_lp = np.zeros((rows, max_new, n_top), np.float32)
        if mode.full_vocab:
            out_lp[:, 0] = host_array(first.logprob)
            top_ids[:, 0] = host_array(first.top_ids)
            top_lp[:, 0] = host_array(first.top_logprobs)
        seen_host = host_array(seen)
        counts = np.zeros(seen_host.shape, np.int32)
        if mode.penalties:
            counts[np.arange(rows), first_tokens] += 1
            seen_host = seen_host.copy()
            seen_host[np.arange(rows), first_tokens] = True
        mb = rows // self.dp // self.microbatches
        in_flight = jax.device_put(
            np.zeros((self.pp, mb * self.dp, 1, self.config.hidden_size), self.dtype),
            jax.sharding.NamedSharding(self.mesh, jax.P("stage", "data")),
        )

        def zero():  # separate buffers: every field of the state is donated
            return jax.device_put(np.int32(0), jax.sharding.NamedSharding(self.mesh, jax.P()))

        return DecodeState(
            cache=cache,
            in_flight=in_flight,
            tick=zero(),
            next_token=put(first_tokens),
            position=lengths,
            generated=put(np.ones(rows, np.int32)),
            done=put(done),
            out_tokens=put(out_tokens),
            out_logprob=put(out_lp),
            top_ids=put(top_ids),
            top_logprobs=put(top_lp),
            counts=put(counts),
            seen=put(seen_host),
            stats=RunStats(
                zero(),
                zero(),
                jax.device_put(
                    np.full((TRACE_TICKS, self.pp), -1, np.int32),
                    jax.sharding.NamedSharding(self.mesh, SCHEDULE),
                ),
            ),
        )

    def _apply_stop_strings(self, d: DecodeState, params) -> DecodeState:
        done = host_array(d.done).copy()
        generated = host_array(d.generated)
        out_tokens = host_array(d.out_tokens)
        changed = False
        for i, p in enumerate(params):
            if p.stop and not done[i]:
                text = self._decode_text(list(out_tokens[i, : generated[i]]), p)
                if any(s in text for s in p.stop):
                    done[i] = changed = True
        if not changed:
            return d
        return d._replace(done=jax.device_put(done, jax.sharding.NamedSharding(self.mesh, ROW)))

    def _decode_text(self, token_ids: list[int], p: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=p.skip_special_tokens)

    def _completion(
        self, token_ids, p: SamplingParams, logprob, top_ids, top_lp
    ) -> CompletionOutput:
        token_ids = [int(t) for t in token_ids]
        stop_ids = set(p.stop_token_ids) | (
            set() if p.ignore_eos else set(self.config.eos_token_ids)
        )
        finish, reason = "length", None
        if token_ids and token_ids[-1] in stop_ids and len(token_ids) > p.min_tokens:
            # EOS / a stop token ended it: vLLM keeps the token in token_ids.
            finish, reason = "stop", token_ids[-1]
        text = self._decode_text(token_ids, p)
        hits = [(text.find(s), s) for s in p.stop if s in text]
        if hits:
            _, stop = min(hits)
            # Keep the tokens up to the one that completed the stop string, as vLLM does.
            n = next(
                n
                for n in range(1, len(token_ids) + 1)
                if stop in self._decode_text(token_ids[:n], p)
            )
            token_ids = token_ids[:n]
            text = self._decode_text(token_ids, p)
            text, finish, reason = text[: text.find(stop)], "stop", stop
        logprobs = None
        if p.logprobs is not None:
            logprobs = []
            for j, tok in enumerate(token_ids):
                entry = {tok: Logprob(float(logprob[j]), None, self._piece(tok))}
                for rank, (tid, lp) in enumerate(
                    zip(top_ids[j][: p.logprobs], top_lp[j][: p.logprobs], strict=True), 1
                ):
                    if int(tid) == tok:
                        entry[tok].rank = rank
                    entry.setdefault(int(tid), Logprob(float(lp), rank, self._piece(int(tid))))
                logprobs.append(entry)
        cumulative = float(np.sum(logprob)) if p.logprobs is not None else None
        return CompletionOutput(0, text, token_ids, finish, reason, cumulative, logprobs)

    def _piece(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    # --- introspection -------------------------------------------------------------------------

    def _record_stats(self, prefill: RunStats | None = None, decode: RunStats | None = None):
        stats = {"stages": self.pp, "microbatches": self.microbatches}
        for name, s in (("prefill", prefill), ("decode", decode)):
            if s is not None:
                ticks, busy = int(host_array(s.ticks)), int(host_array(s.busy))
                stats[f"{name}_ticks"] = ticks
                stats[f"{name}_busy_stage_ticks"] = busy
                stats[f"{name}_bubble_fraction"] = 1 - busy / (ticks * self.pp) if ticks else 0.0
                # schedule[t][s]: the micro-batch stage s ran at tick t (-1: idle); the decode
                # ring records its first TRACE_TICKS ticks.
                stats[f"{name}_schedule"] = host_array(s.schedule)[:ticks].tolist()
        self.last_run_stats = stats

    def device_memory(self) -> list[dict]:
        """Bytes of parameters and KV cache held by each device, read from the shards."""
        usage: dict[int, dict] = {
            d.id: {"device": d.id, "params": 0, "kv_cache": 0} for d in self.mesh.devices.flat
        }
        for leaf in jax.tree.leaves(self.state):
            for shard in leaf.addressable_shards:
                usage[shard.device.id]["params"] += shard.data.nbytes
        if self._cache is not None:
            for leaf in jax.tree.leaves(self._cache):
                for shard in leaf.addressable_shards:
                    usage[shard.device.id]["kv_cache"] += shard.data.nbytes
        return list(usage.values())


def _replace_max(p: SamplingParams, max_tokens: int) -> SamplingParams:
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(p, max_tokens=max_tokens, min_tokens=min(p.min_tokens, max_tokens))


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    # jaxpp needs only transformers' tokenizers: silence its "PyTorch was not found" advice.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer  # noqa: PLC0415 - slow import, only when needed

    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
