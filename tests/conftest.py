import os
import re
import sys

import pytest
import torch

# Spawned test processes import helpers (tests/distributed.py) from here.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run under Triton's interpreter. triton.jit decides at
# definition time, and Triton reads the variable again at launch, so it is set for the whole
# process before anything imports ringflash.kernels (the reference backend never reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionfinish(session, exitstatus):
    # The multi-GPU modules share one process group for the whole session (under torchrun);
    # it is destroyed once, here.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- the quick subset -------------------------------------------------------------------------
#
# `python -m pytest -q -m quick` runs a few tests of every area in under two minutes on two CPU
# cores: the kernels under the interpreter; ring attention, the SDPA engines' logic, the modules
# and GPT on 2 ranks (one spawn each, which their tests share); layouts; errors; an example under
# torchrun; the docs. Chosen by their run times in a full run and named here, so that the test
# files need no marks (a file may still mark its own tests `quick`). In a name, `*` matches
# anything, parameters included. A GPU test is never quick.
QUICK = {
    "test_kernels.py": [
        "test_attention[Sq77-Sk50-mqa-d80-torch.float32-*]",
        "test_ring_step_positions[striped-*-torch.float32]",
        "test_forward_fold_equals_one_call[causal-torch.float32]",
        "test_backward_accumulates_over_key_blocks[torch.float32]",
        "test_backward_of_empty_rows_is_zero",
        "test_backward_delta",
        "test_default_positions_are_bottom_right",
        "test_fold_keeps_empty_rows_empty",
        "test_merge_matches_reference[*]",
        "test_check_inputs_rejects[*]",
        "test_positions_must_match_lengths",
        "test_interpreter_refuses_bfloat16_and_half_positions",
    ],
    "test_ring.py": ["test_ring_matches_float64[*-2]"],
    "test_layout.py": [
        "test_positions_follow_the_definition[*]",
        "test_shard_assemble_round_trip[*]",
        "test_layout_names",
        "test_unsplittable_lengths_say_the_multiple[*]",
        "test_rank_outside_the_group_is_refused[*]",
        "test_one_rank_takes_any_length[*]",
        "test_one_rank_odd_length_attention",
    ],
    "test_nn.py": [
        "test_mha_sharded_matches_full_sequence[*-2]",
        "test_rotary_uses_global_positions[*-2]",
        "test_device_mesh_group[2]",
        "test_shard_length_errors_on_every_rank[2]",
        "test_single_process_matches_manual[*]",
        "test_rotary_is_relative",
        "test_rotary_cache_and_dtypes",
        "test_ring_attention_module_single_process",
        "test_no_rope_and_bias",
        "test_constructor_errors[*]",
        "test_extra_repr_shows_the_settings",
        "test_forward_errors",
    ],
    "test_errors.py": [
        "test_bad_input_raises_on_every_rank[2]",
        "test_group_without_distributed",
        "test_world_of_one_without_distributed_is_plain_attention",
        "test_softmax_scale_must_be_finite_positive[*]",
        "test_head_dim_zero_is_refused",
        "test_second_order_gradients_are_refused[*]",
        "test_half_given_positions_are_refused",
    ],
    "test_ops.py": [
        "test_flash_attention_reference_backend[*]",
        "test_rows_that_see_no_key",
        "test_reference_blockwise_equals_whole[*]",
    ],
    "test_ring_state.py": ["test_calls_in_any_context_then_training[*-2]"],
    "test_sdpa.py": [
        "test_every_ring_step_decomposes_exactly[2-*]",
        "test_any_increasing_positions_decompose_exactly[*]",
        "test_bottom_right_causal_and_full",
        "test_wide_stripes_are_refused_with_the_engine_that_can",
        "test_last_step_chunks",
        "test_engines_refuse_cpu_tensors_by_name[*]",
        "test_fold_of_overlapping_fragments[*]",
        "test_ring_with_the_engine_logic[2]",
    ],
    "test_models.py": [
        "test_sharded_gpt_matches_full_sequence[*]",
        "test_sharded_gpt_checkpoint_and_compile",
        "test_shard_batch_padding",
        "test_single_process_loss_is_mean_cross_entropy",
        "test_all_labels_ignored_gives_zero_loss",
        "test_config_errors[*]",
        "test_forward_errors",
    ],
    "test_examples.py": ["test_ring_vs_sdpa", "test_example_is_short_and_documented[*]"],
    "test_hf.py": ["test_single_process_matches_eager[docs-cu]", "test_single_process_errors"],
    "test_ulysses.py": ["test_grouped_layout_and_gather_order[*]", "test_hybrid_matches_float64[2x2-*]", "test_bad_splits_raise_on_every_rank[2x2]", "test_gpt_matches_one_process[*]"],
}
_QUICK_RE = {
    file: re.compile("|".join(re.escape(p).replace(r"\*", ".*") for p in patterns))
    for file, patterns in QUICK.items()
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("gpu") or item.get_closest_marker("multigpu"):
            if item.get_closest_marker("quick"):
                raise pytest.UsageError(f"{item.nodeid}: a GPU test cannot be quick (the quick subset runs on CPUs)")
            continue
        pattern = _QUICK_RE.get(item.path.name)
        if pattern is not None and pattern.fullmatch(item.name):
            item.add_marker(pytest.mark.quick)


# -- shards -------------------------------------------------------------------------------------
#
# RINGFLASH_TEST_SHARD=i/n keeps every n-th selected test from the i-th (0-based), so that n
# processes can share a run: the GPU suites spend most of their time compiling kernels, one
# variant after the other in a process, and a GPU machine has many cores
# (`benchmarks/gpu_tests.sh` runs them that way).


def _shard() -> tuple[int, int] | None:
    spec = os.environ.get("RINGFLASH_TEST_SHARD", "").strip()
    if not spec:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise pytest.UsageError(f"RINGFLASH_TEST_SHARD must be i/n with 0 <= i < n; got {spec!r}")
    return int(m.group(1)), int(m.group(2))


class _Shard:
    """A plugin of its own: conftest.py already implements pytest_collection_modifyitems (quick)."""

    def __init__(self, i: int, n: int):
        self.i, self.n = i, n

    @pytest.hookimpl(trylast=True)  # after `-m` and `-k` have deselected theirs
    def pytest_collection_modifyitems(self, config, items):
        keep = [item for j, item in enumerate(items) if j % self.n == self.i]
        dropped = [item for j, item in enumerate(items) if j % self.n != self.i]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_configure(config):
    shard = _shard()
    if shard is not None:
        config.pluginmanager.register(_Shard(*shard), "ringflash-shard")
