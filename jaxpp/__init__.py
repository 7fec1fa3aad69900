"""jaxpp: pipeline-parallel LLM inference on JAX — GPipe prefill and a circular decode ring,
each one jitted shard_map program over a ("data", "stage", "tensor") mesh."""

from pathlib import Path

from jaxpp.checkpoint import CheckpointError
from jaxpp.config import ModelConfig, SamplingParams
from jaxpp.engine import LLM
from jaxpp.outputs import CompletionOutput, Logprob, RequestOutput
from jaxpp.partition import layer_partition

# A small Llama trained on Python source that ships with the package (docs/demo_model.md).
DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"

__all__ = [
    "DEMO_MODEL",
    "LLM",
    "CheckpointError",
    "CompletionOutput",
    "Logprob",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "layer_partition",
]
