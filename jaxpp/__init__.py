"""jaxpp: pipeline-parallel LLM inference on JAX: a circular ring of micro-batches through the
stages, continuous batching under a token budget over paged KV, as jitted shard_map programs
over a ("data", "stage", "tensor") mesh."""

from pathlib import Path

from jaxpp.config import EngineConfig, ModelConfig, SamplingParams
from jaxpp.outputs import CompletionOutput, Logprob, RequestOutput
from jaxpp.partition import layer_partition

# A small Llama trained on Python source that ships with the package (docs/demo_model.md).
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"

# Names whose modules import JAX: loaded on first use, so `jaxpp --help` starts instantly.
_LAZY = {
    "LLM": "jaxpp.engine",
    "CheckpointError": "jaxpp.checkpoint",
    "plan": "jaxpp.planner",
    "pipeline_value_and_grad": "jaxpp.training",
    "LoraConfig": "jaxpp.lora",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxpp' has no attribute {name!r}")


__all__ = [
    "DEMO_MODEL",
    "LLM",
    "CheckpointError",
    "CompletionOutput",
    "EngineConfig",
    "Logprob",
    "LoraConfig",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "layer_partition",
    "pipeline_value_and_grad",
    "plan",
]
