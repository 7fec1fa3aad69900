"""Shared test setup: offline Hugging Face, 8 simulated CPU devices, exact float32 matmuls,
and session-scoped tiny random checkpoints (see hf_fixtures.py)."""

import os

# Must happen before jax (or transformers) is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# The suite is compile-bound (tiny models, a few dozen step programs per module): LLVM's
# optimisation of each program costs more than it saves. Off, -n 2 took 450 s against
# 565-603 s, every test unchanged (XLA's CPU backend is not fast-math at any level: no float
# op is reordered). Subprocesses (CLI, launcher, multihost workers) inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# A persistent compilation cache: engines built twice with the same shapes (same model through
# another config schema, a sharded copy, ...) compile once.  Per session by default;
# JAXPP_TEST_COMPILATION_CACHE=<dir> keeps it across runs, =0 turns it off.
_cache_dir = os.environ.get("JAXPP_TEST_COMPILATION_CACHE")
if _cache_dir != "0":
    if not _cache_dir:
        import atexit
        import shutil
        import tempfile

        _cache_dir = tempfile.mkdtemp(prefix="jaxpp-test-xla-cache-")
        atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
        # pytest-xdist's workers start after this: they inherit the directory, not a new one.
        os.environ["JAXPP_TEST_COMPILATION_CACHE"] = _cache_dir
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # The CLI and launcher tests run engines in subprocesses: they share the cache too.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import gc  # noqa: E402

import hf_fixtures  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_engines_after_each_module():
    """Engines hold reference cycles (flax modules), so CPython frees them only at a full
    collection, which allocation counts rarely trigger: each holds a KV pool (1 GiB on a CPU by
    default), and a module's dozen of them would otherwise add up to several GiB per worker."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory):
    """One directory per session holding every tiny checkpoint (and the shared tokenizer)."""
    return tmp_path_factory.mktemp("hf_models")


@pytest.fixture(scope="session")
def hf_model(hf_root):
    """hf_model(family, name=None, **overrides) -> Path, built once per session per name."""

    def build(family: str, name: str | None = None, **overrides):
        return hf_fixtures.build_model_dir(hf_root, family, name=name, **overrides)

    return build


@pytest.fixture(scope="session")
def tokenizer_dir(hf_root):
    return hf_fixtures.build_tokenizer_dir(hf_root)
