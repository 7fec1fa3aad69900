"""jaxpp: pipeline-parallel LLM inference on JAX — GPipe prefill and a circular decode ring,
each one jitted shard_map program over a ("data", "stage", "tensor") mesh."""

from jaxpp.checkpoint import CheckpointError
from jaxpp.config import ModelConfig, SamplingParams
from jaxpp.engine import LLM
from jaxpp.outputs import CompletionOutput, Logprob, RequestOutput
from jaxpp.partition import layer_partition

__all__ = [
    "LLM",
    "CheckpointError",
    "CompletionOutput",
    "Logprob",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
    "layer_partition",
]
