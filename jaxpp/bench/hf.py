"""transformers `generate` on the same checkpoint and prompts, for a ratio in the same run."""

from __future__ import annotations

import time
from pathlib import Path

from jaxpp.bench.workloads import Request


class HFRunner:
    """transformers `generate` on the same checkpoint: greedy, batched with left padding and an
    attention mask, `max(output_len)` new tokens per batch (eos ignored, as in the jaxpp run)."""

    def __init__(
        self,
        model_dir: Path,
        dtype: str,
        attn: str,
        device: str = "auto",
        threads: int | None = None,
    ):
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), attn_implementation=attn
        )
        model.generation_config.eos_token_id = None  # ignore_eos
        self.model = model.to(device).eval()

    def generate_batch(self, batch: list[Request]) -> list[list[int]]:
        import torch  # noqa: PLC0415

        width = max(len(r.prompt) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        new = max(r.output_len for r in batch)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                eos_token_id=None,
                pad_token_id=0,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return [out[i, width : width + r.output_len].tolist() for i, r in enumerate(batch)]

    def run_pass(self, batches: list[list[Request]]) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        tokens = []
        for batch in batches:
            tokens += self.generate_batch(batch)
        return time.perf_counter() - start, tokens
