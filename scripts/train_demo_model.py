"""Train the tiny Llama demo model shipped in ``jaxpp/demo_model``.

The model is trained from scratch on CPU, on the Python standard library source
of the running interpreter, so it needs no downloads and finishes in about 20
minutes on one otherwise idle core. It is not meant to be useful, only to be a real,
checked-in Llama checkpoint (with GQA and tied embeddings) whose greedy output
looks like Python, so that the engine's tests and demos can compare against
``transformers`` on something better than random weights.

At the default 650 steps x 16 x 256 tokens (about one epoch) a step takes about
1.8 s on one core. Reproduce the shipped model with:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/train_demo_model.py

Output (in ``--out``): config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json and training_summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# Directories of the standard library that are not ordinary library code: third-party
# packages (not PSF-licensed), the test suites (huge and repetitive), generated codec
# tables and the generated pydoc topic strings.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}
)
MAX_FILE_BYTES = 200_000  # drops a couple of outliers (_pydecimal.py, tkinter/__init__.py)
VAL_EVERY = 40  # every 40th file (in sorted order) is held out for validation
VAL_MAX_SEQUENCES = 64
SAMPLE_PROMPT = "def fibonacci(n):"
MAX_POSITIONS = 1024  # room for prompt + generation beyond the 256-token training context


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("jaxpp/demo_model"))
    parser.add_argument("--steps", type=int, default=650)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--log-every", type=int, default=25)
    return parser.parse_args()


def collect_stdlib_files() -> tuple[Path, list[Path]]:
    """Deterministic (sorted) list of the standard library's own .py files."""
    root = Path(os.__file__).resolve().parent
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append(path)
    return root, files


def read_texts(files: list[Path]) -> list[str]:
    # errors="replace" keeps the file set independent of a stray non-UTF-8 byte.
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is in the base alphabet, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Training sequences start each document with BOS, so prompts must start with it too;
    # letting the tokenizer add it means a plain tokenizer(prompt) matches training.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )


# The model only writes Python: a conversation becomes comment lines, and the reply starts on
# the line after "# assistant:". Any roles in any order are accepted (no raise_exception).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "# {{ message['role'] }}: {{ message['content'] | replace('\\n', '\\n# ') }}\n"
    "{% endfor %}{% if add_generation_prompt %}# assistant:\n{% endif %}"
)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    tokenizer.save_pretrained(out_dir)
    # transformers 5.x records "TokenizersBackend", a class 4.x does not have; the plain
    # fast-tokenizer class loads the same tokenizer.json under both.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def token_stream(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """All documents as one stream: <|bos|> doc <|eos|> <|bos|> doc <|eos|> ..."""
    # The backend tokenizer is used directly because the wrapper warns about every
    # document longer than model_max_length, which is irrelevant before chunking.
    encoded = tokenizer.backend_tokenizer.encode_batch(texts)  # adds <|bos|> (post-processor)
    ids = [tok for doc in encoded for tok in [*doc.ids, tokenizer.eos_token_id]]
    return torch.tensor(ids, dtype=torch.long)


def chunk(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping [n, seq_len] windows; the ragged tail is dropped."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,  # GQA: 4 query heads share each KV head
        head_dim=32,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    generation_config = model.generation_config
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    # Weight decay only on matrices; norms' gains should stay free.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, sequences: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [
        model(input_ids=batch, labels=batch).loss.item() for batch in sequences.split(batch_size)
    ]
    model.train()
    return sum(losses) / len(losses)


def train(
    model: LlamaForCausalLM, train_seqs: torch.Tensor, args: argparse.Namespace
) -> tuple[float, int]:
    """Runs args.steps AdamW steps; returns (mean loss of the last log window, tokens seen)."""
    optimizer = make_optimizer(model, args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.warmup_steps, args.steps)
    )
    # Epoch-wise shuffles of the windows from a dedicated generator, so the batch order
    # depends only on --seed.
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_seqs), generator=generator)
    cursor = 0
    window: list[float] = []
    last_logged = float("nan")
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            order = torch.randperm(len(train_seqs), generator=generator)
            cursor = 0
        batch = train_seqs[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size

        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            last_logged = sum(window) / len(window)
            window = []
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1:5d}/{args.steps}  loss {last_logged:.4f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {elapsed / (step + 1):.2f} s/step",
                flush=True,
            )
    return last_logged, args.steps * args.batch_size * args.seq_len


def print_samples(out_dir: Path, seed: int) -> None:
    """Reloads the saved files (as a user would) and prints greedy and sampled output."""
    # Seeded here so the sampled text depends only on the saved model, not on training.
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    inputs = tokenizer(SAMPLE_PROMPT, return_tensors="pt")
    for label, kwargs in [
        ("greedy", {"do_sample": False}),
        ("temperature 0.8", {"do_sample": True, "temperature": 0.8, "top_k": 0}),
    ]:
        output = model.generate(**inputs, max_new_tokens=80, **kwargs)
        print(f"--- {label} ---\n{tokenizer.decode(output[0], skip_special_tokens=True)}\n")


def main() -> None:
    args = parse_args()
    # The BPE trainer parallelises with rayon unless told not to; keep it to --threads.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall_start = time.perf_counter()

    root, files = collect_stdlib_files()
    texts = read_texts(files)
    train_texts = [t for i, t in enumerate(texts) if i % VAL_EVERY != 0]
    val_texts = [t for i, t in enumerate(texts) if i % VAL_EVERY == 0]
    data_bytes = sum(path.stat().st_size for path in files)
    print(
        f"data: {len(files)} files, {data_bytes:,} bytes from {root} "
        f"({len(val_texts)} files held out for validation)"
    )

    # The tokenizer sees only the training files so validation text stays unseen.
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_seqs = chunk(token_stream(train_texts, tokenizer), args.seq_len)
    val_seqs = chunk(token_stream(val_texts, tokenizer), args.seq_len)[:VAL_MAX_SEQUENCES]
    print(
        f"tokenizer: vocab {len(tokenizer)}; {train_seqs.numel():,} train tokens "
        f"({data_bytes / (train_seqs.numel() + val_seqs.numel()):.2f} bytes/token), "
        f"{val_seqs.numel():,} validation tokens"
    )

    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    print(f"model: {n_params:,} parameters")

    train_start = time.perf_counter()
    train_loss, tokens_seen = train(model, train_seqs, args)
    train_seconds = time.perf_counter() - train_start
    val_loss = mean_loss(model, val_seqs, args.batch_size)
    print(
        f"final train loss {train_loss:.4f}  validation loss {val_loss:.4f}  "
        f"({tokens_seen / train_seqs.numel():.2f} epochs, {train_seconds / 60:.1f} min)"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, args.out)
    model.save_pretrained(args.out, safe_serialization=True)
    # safetensors writes the file 0600; the package data must be readable by everyone.
    (args.out / "model.safetensors").chmod(0o644)
    summary = {
        "data_source": "Python standard library source (.py), PSF License",
        "python_version": platform.python_version(),
        "data_files": len(files),
        "data_bytes": data_bytes,
        "validation_files": len(val_texts),
        "train_tokens": train_seqs.numel(),
        "validation_tokens": val_seqs.numel(),
        "tokenizer_vocab_size": len(tokenizer),
        "parameters": n_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "seed": args.seed,
        "threads": args.threads,
        "tokens_seen": tokens_seen,
        "final_train_loss": round(train_loss, 4),
        "final_validation_loss": round(val_loss, 4),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "torch_version": torch.__version__,
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    size_mb = (args.out / "model.safetensors").stat().st_size / 1e6
    print(f"saved to {args.out} (model.safetensors {size_mb:.1f} MB)")
    print_samples(args.out, args.seed)


if __name__ == "__main__":
    main()
