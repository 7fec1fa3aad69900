"""Distil a 1-layer draft model from the demo model, for speculative decoding with a draft
model (`speculative_config={"model": OUT, "num_speculative_tokens": k, "draft_window": W}`).

The student shares the demo model's tokenizer (copied, so the vocabulary is the same) and
width, and starts from its embedding, final norm and first layer. It is a Mistral (Llama with
a sliding window) whose window is the engine's `draft_window`: the engine's draft reads only a
row's last W tokens (jaxpp/draft.py), so the student learns to predict from those alone, at
every position of the training sequences. The loss is the KL divergence from the demo model's
next-token distribution (which sees the whole context) to the student's: the drafts the
engine keeps are the ones equal to the demo model's own tokens. Data: the demo model's, the
Python standard library (scripts/train_demo_model.py).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/train_draft_model.py --out /tmp/draft

takes about 9 minutes on one idle core at the default 500 steps of 8 x 256 tokens (1.1 s/step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_model as demo  # noqa: E402 - the demo model's data pipeline, reused

import jaxpp  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, default=jaxpp.DEMO_MODEL)
    parser.add_argument("--window", type=int, default=32, help="the engine's draft_window")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=25)
    return parser.parse_args()


def build_student(teacher: torch.nn.Module, window: int) -> MistralForCausalLM:
    """One layer of the teacher's shape, with a sliding window, initialised from the teacher's
    embedding, first layer and final norm."""
    t = teacher.config
    config = MistralConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_parameters=t.rope_parameters,
        sliding_window=window,
        tie_word_embeddings=True,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id,
    )
    student = MistralForCausalLM(config)
    own = student.state_dict()
    # The same parameter names below `model.`: layer 0, the embedding and the final norm.
    copied = {k: v for k, v in teacher.state_dict().items() if k in own and "layers.0." in k}
    copied |= {
        k: teacher.state_dict()[k] for k in ("model.embed_tokens.weight", "model.norm.weight")
    }
    student.load_state_dict(copied, strict=False)
    student.tie_weights()
    return student


def distil_loss(student, teacher, batch: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged."""
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=batch).logits.float(), dim=-1)
    got = F.log_softmax(student(input_ids=batch).logits.float(), dim=-1)
    return F.kl_div(got, target, log_target=True, reduction="none").sum(-1).mean()


@torch.no_grad()
def agreement(student, teacher, seqs: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy of the student on the data, fraction of positions where its
    greedy token is the teacher's)."""
    student.eval()
    losses, same = [], []
    for batch in seqs.split(batch_size):
        logits = student(input_ids=batch).logits
        losses.append(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).item())
        want = teacher(input_ids=batch).logits.argmax(-1)
        same.append((logits.argmax(-1) == want).float().mean().item())
    student.train()
    return sum(losses) / len(losses), sum(same) / len(same)


def train(student, teacher, seqs: torch.Tensor, args: argparse.Namespace) -> float:
    """args.steps AdamW steps of distillation; returns the mean loss of the last log window."""
    optimizer = demo.make_optimizer(student, args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: demo.lr_factor(step, args.warmup_steps, args.steps)
    )
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(seqs), generator=generator)
    window, last, start = [], float("nan"), time.perf_counter()
    for step in range(args.steps):
        at = (step * args.batch_size) % (len(order) - args.batch_size)
        loss = distil_loss(student, teacher, seqs[order[at : at + args.batch_size]])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            last, window = sum(window) / len(window), []
            per_step = (time.perf_counter() - start) / (step + 1)
            print(f"step {step + 1:4d}/{args.steps}  KL {last:.4f}  {per_step:.2f} s/step",
                  flush=True)  # fmt: skip
    return last


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    _, files = demo.collect_stdlib_files()
    texts = demo.read_texts(files)
    train_texts = [t for i, t in enumerate(texts) if i % demo.VAL_EVERY != 0]
    val_texts = [t for i, t in enumerate(texts) if i % demo.VAL_EVERY == 0]
    seqs = demo.chunk(demo.token_stream(train_texts, tokenizer), args.seq_len)
    val = demo.chunk(demo.token_stream(val_texts, tokenizer), args.seq_len)[:16]
    student = build_student(teacher, args.window)
    before = agreement(student, teacher, val, args.batch_size)
    print(f"start: validation loss {before[0]:.4f}, greedy agreement {before[1]:.3f}")
    kl = train(student, teacher, seqs, args)
    loss, agree = agreement(student, teacher, val, args.batch_size)
    print(f"end: KL {kl:.4f}, validation loss {loss:.4f}, greedy agreement {agree:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(args.out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (args.out / name).write_bytes((args.teacher / name).read_bytes())
    summary = {
        "teacher": str(args.teacher.name),
        "window": args.window,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "final_kl": round(kl, 4),
        "validation_loss_start": round(before[0], 4),
        "validation_loss": round(loss, 4),
        "greedy_agreement_start": round(before[1], 4),
        "greedy_agreement": round(agree, 4),
        "parameters": sum(p.numel() for p in student.parameters()),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
