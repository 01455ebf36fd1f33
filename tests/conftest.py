"""Test setup: 8 emulated CPU devices, configured before jax is imported anywhere."""

import os
import shutil
import tempfile

from autoshard.launch import with_device_count  # (imports no jax)

_FLAGS = os.environ.get("XLA_FLAGS", "").split()
# XLA:CPU compiles the tests' small programs at LLVM -O0 (unless the caller chose a level): compiling them is most of
# the suite's time (the whole suite on 2 cores, `-n 2`: 589 s at XLA's default level, 490 s at -O0).
# The level is LLVM's alone: the HLO XLA partitions, schedules and assigns buffers for, which the tests read back
# (collectives, bytes, memory, FLOPs), is the same program; run times grow (elementwise code unoptimised) but stay
# small, and values may differ from -O2's in the last bits, the same way in a test's reference and parallel runs
# (no further from each other: tests/test_parallel.py's MoE test measures both levels).
# (The docs' blocks run in processes of their own, setting XLA_FLAGS as written; tests/test_docs.py adds the level.)
if not any(f.startswith("--xla_backend_optimization_level") for f in _FLAGS):
    _FLAGS.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = with_device_count(" ".join(_FLAGS), 8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (the tiny models' train steps on the same meshes), in this process and in
# the subprocesses they start: jax's persistent compilation cache compiles each once per session. The folder is new
# for every session (the xdist workers and the subprocesses inherit the controller's), so a run is never served by
# an earlier run's programs; a cache the caller set is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoshard-test-jax-cache-")
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

assert len(jax.devices()) == 8, "tests need 8 emulated devices: jax was imported before conftest set XLA_FLAGS"


LONGEST_FIRST = ["test_pipeline.py", "test_pipeline_compiled.py", "test_zoo.py", "test_checkpoint.py", "test_resume.py",
                 "test_cli.py", "test_planner.py", "test_launch.py", "test_planner_pipeline.py", "test_predictions.py",
                 "test_sequence.py", "test_docs.py", "test_planner_seq_expert.py"]
"""The files that take longest (a full run's --durations), about longest first: they start first and the short files
fill in at the end, so that the workers of `-n 2 --dist loadfile` finish together (xdist would otherwise order the
files by their number of tests, which starts files of a few long tests, such as the compiled pipelines', last). Files
that compile a program another file compiles too run after it: the persistent cache serves them (test_inspect.py's
steps are test_predictions.py's, test_launch.py's one-device run is test_cli.py's)."""


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the files in collection order
        config.option.loadscopereorder = False


SWEEP = {
    "test_pipeline.py::test_pipeline_matches_single_device[pipe=4,data=2-zb-h1-8-1-None-none]":
        "the split backward runs in the zb case; zb-h1's deferred-W tables in test_schedule_zb.py",
    "test_pipeline.py::test_pipeline_matches_single_device[pipe=4,fsdp=2-gpipe-2-1-None-full]":
        "backward ticks that recompute the forward: the 1f1b recompute case",
    "test_staging_rng.py::test_dropout_masks_are_per_microbatch_and_layer_and_backwards_reuse_them[gpipe-True-1]":
        "masks a recomputing backward must redraw: the 1f1b case (a stash keeps them, as here)",
    "test_planner_seq_expert.py::test_encoder_decoder_exchanges_per_attention_match_compiled[ulysses]":
        "the ring case, and Ulysses' exchange priced against XLA in test_predicted_exchange_and_total_...",
    "test_predictions.py::test_communication_matches_compiled[gpt-tiny-planner:tensor=2]":
        "the planner's own plan: the gpt-tiny-planner case; tensor=2 in the rule cases",
    "test_predictions.py::test_memory_matches_compiled[gpt-tiny-planner:tensor=2]": "as above",
    "test_predictions.py::test_communication_matches_compiled[mlp-data=8]": "mlp-planner:tensor=4, gpt-tiny-data=8",
    "test_predictions.py::test_memory_matches_compiled[mlp-data=8]": "as above",
    "test_sequence.py::test_matches_dense_and_bytes[ulysses-seq4-h4kv4]": "ulysses-data2-seq4-h4kv4",
    "test_sequence.py::test_matches_dense_and_bytes[ring-data2-seq4-h4kv4]": "ring-seq4-h4kv2, ulysses-data2-seq4",
    "test_sequence.py::test_matches_dense_and_bytes[ring-seq4-h4kv2-noncausal]": "test_chunked_..[ring-..-noncausal]",
    "test_sequence.py::test_window_matches_dense_and_bytes[ring-seq4-window6]": "ring-seq2-window2-keymask",
    "test_sequence.py::test_key_mask_matches_dense[noncausal-ring]": "causal-ring; non-causal ring chunks",
    "test_sequence.py::test_softcap_and_cross_attention_match_dense[ring-T8-keymask]": "ring-T5, ulysses-T8",
    "test_sequence.py::test_chunked_matches_dense[ulysses-seq2-h4kv4-noncausal]": "ulysses-seq2-h4kv2",
    "test_pipeline.py::test_pipeline_with_sequence_parallelism[pipe=2,seq=2,tensor=2-ulysses-gpipe]":
        "the ring case (seq manual in the executor); Ulysses in a pipe shard_map: test_sequence's nested case",
    "test_zoo.py::test_every_plan_trains_like_one_device[encoder-tensor]": "gqa/linen_lm/cnn-tensor; verify below",
    "test_zoo.py::test_verify_matches_the_compiled_step[encoder-tensor]": "the benchmark verifies every plan",
    "test_zoo.py::test_the_memory_peak_simulated_from_the_schedule_is_xlas[encoder-tensor]":
        "the other 11 zoo plans (it would train and verify the plan swept above)",
    "test_zoo.py::test_seq_beside_tensor_is_laid_out_as_priced[encoder]": "the gqa and linen_lm cases (same layouts)",
    "test_attention_rewrite.py::test_seq_parallel_trains_like_one_device[padded_flax-ulysses]":
        "padded_flax-ring; Ulysses with key masks: padded_jaxnn-ulysses",
}
"""Further cases of parametrized checks (file::test[id]: the kept cases that cover the same code), left out of `make
test` to keep it within 10 minutes on 2 cores and run by `make test-sweep` (runs/benchmarks/test_sweep.md): each
passed when it was moved here."""


@pytest.hookimpl(tryfirst=True)  # (before `-m` deselects by marker)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: each file's tests keep their order)
    names = {f"{item.path.name}::{item.name}": item for item in items}
    for name in SWEEP.keys() & names.keys():
        names[name].add_marker(pytest.mark.sweep)
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:  # the whole suite: every entry still names a test
        stale = sorted(SWEEP.keys() - names.keys())
        if stale:
            raise pytest.UsageError(f"tests/conftest.py SWEEP names tests that no longer exist: {stale}")


def pytest_unconfigure(config):
    """The session's compilation cache goes with the process that made it (the controller, or a lone pytest)."""
    if "_OWN_CACHE" in globals():
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def token_batch():
    """A fixed [16, 64] next-token batch of byte tokens."""
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 256, size=(16, 65)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> str:
    """A small fixed corpus file (200 KB of the standard library's source) for the command-line tests."""
    from autoshard import data

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_bytes(b"".join(f.read_bytes() for f in data.stdlib_files(200_000)))
    return str(path)
