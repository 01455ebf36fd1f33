"""`autoshard.analysis.analyze` counts the conditional branches that run, not every branch.

A `lax.switch` whose index is read from a constant table at the loop counter and the device's position runs one
branch per iteration, a different one on each device: a pipeline's per-tick schedule. Each is compiled once
(module fixtures) and its FLOPs per device are checked against a count by hand. The pipeline executor's own step
is checked on the compiled pipeline `tests/test_pipeline.py` already builds (no second pipeline compile here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from autoshard import hlo
from autoshard.analysis import analyze, format_report

# [step, device] -> branch; 14 entries, so `compiled.as_text()` prints the table as `{...}`
TABLE = np.array([[1, 2], [2, 0], [0, 1], [2, 2], [1, 0], [0, 2], [1, 1]], np.int32)
ROWS, D, H = 2, 8, 16  # each device's [ROWS, D] block
BRANCH_FLOPS = [0, 2 * ROWS * D * D, 2 * ROWS * D * H + 2 * ROWS * H * D]  # identity; a @ w; (a @ v) @ v.T


def _branches(w, v):
    return [lambda a: a, lambda a: a @ w, lambda a: (a @ v) @ v.T]


def _compile_switch(index_of):
    """A 2-device shard_map running len(TABLE) steps of a switch whose index is `index_of(step, device, arg)`."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))

    def body(x, w, v, k):
        me = jax.lax.axis_index("x")
        step = lambda t, a: jax.lax.switch(index_of(t, me, k), _branches(w, v), a)  # noqa: E731
        return jax.lax.fori_loop(0, len(TABLE), step, x)

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P(), P(), P()), out_specs=P("x")))
    args = (jnp.ones((2 * ROWS, D)), jnp.ones((D, D)), jnp.ones((D, H)), jnp.zeros((), jnp.int32))
    return analyze(fn.lower(*args).compile(), mesh)


@pytest.fixture(scope="module")
def from_table():
    return _compile_switch(lambda t, me, k: jnp.asarray(TABLE)[t, me])


@pytest.fixture(scope="module")
def from_argument():
    return _compile_switch(lambda t, me, k: k)  # known only when the program runs


def test_a_table_driven_switch_counts_the_branches_each_device_takes(from_table):
    by_hand = [sum(BRANCH_FLOPS[b] for b in TABLE[:, d]) for d in range(2)]
    assert by_hand[0] != by_hand[1]
    assert from_table["flops_per_device"] == sum(by_hand) / 2  # the mean over devices
    assert from_table["flops_by_device"] == by_hand
    assert from_table["branches_exact"] is True
    assert "mean over devices" in format_report(from_table) and "upper bound" not in format_report(from_table)


def test_an_index_known_only_at_run_time_counts_every_branch(from_argument):
    every_branch = len(TABLE) * sum(BRANCH_FLOPS)
    assert from_argument["branches_exact"] is False
    assert from_argument["flops_by_device"] == [every_branch] * 2
    assert "upper bound" in format_report(from_argument)


# A switch as a chain of pred conditionals, the index computed inside the outer branch from its operand:
# v = i + partition, 4 iterations; v == 0 runs one dot, else v < 2 one dot, else two ([2,2] @ [2,2]: 16 FLOPs each).
CHAIN = """HloModule chain, num_partitions=2

%one_dot (a: f32[2,2]) -> f32[2,2] {
  %a = f32[2,2]{1,0} parameter(0)
  ROOT %d.1 = f32[2,2]{1,0} dot(%a, %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%inner_true (t.1: (f32[2,2], s32[])) -> f32[2,2] {
  %t.1 = (f32[2,2]{1,0}, s32[]) parameter(0)
  %x.2 = f32[2,2]{1,0} get-tuple-element(%t.1), index=0
  ROOT %d.2 = f32[2,2]{1,0} dot(%x.2, %x.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%inner_false (t.2: (f32[2,2], s32[])) -> f32[2,2] {
  %t.2 = (f32[2,2]{1,0}, s32[]) parameter(0)
  %x.3 = f32[2,2]{1,0} get-tuple-element(%t.2), index=0
  %d.3 = f32[2,2]{1,0} dot(%x.3, %x.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %d.4 = f32[2,2]{1,0} dot(%d.3, %x.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%outer_false (t.3: (f32[2,2], s32[])) -> f32[2,2] {
  %t.3 = (f32[2,2]{1,0}, s32[]) parameter(0)
  %v.3 = s32[] get-tuple-element(%t.3), index=1
  %two = s32[] constant(2)
  %lt = pred[] compare(%v.3, %two), direction=LT
  ROOT %c.2 = f32[2,2]{1,0} conditional(%lt, %t.3, %t.3), true_computation=%inner_true, false_computation=%inner_false
}

%body (p.1: (s32[], f32[2,2])) -> (s32[], f32[2,2]) {
  %p.1 = (s32[], f32[2,2]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %x.1 = f32[2,2]{1,0} get-tuple-element(%p.1), index=1
  %pid = u32[] partition-id()
  %me = s32[] convert(%pid)
  %v.1 = s32[] add(%i.1, %me)
  %zero = s32[] constant(0)
  %eq = pred[] compare(%v.1, %zero), direction=EQ
  %pair = (f32[2,2]{1,0}, s32[]) tuple(%x.1, %v.1)
  %c.1 = f32[2,2]{1,0} conditional(%eq, %x.1, %pair), true_computation=%one_dot, false_computation=%outer_false
  %one = s32[] constant(1)
  %next = s32[] add(%i.1, %one)
  ROOT %r.1 = (s32[], f32[2,2]{1,0}) tuple(%next, %c.1)
}

%cond (p.2: (s32[], f32[2,2])) -> pred[] {
  %p.2 = (s32[], f32[2,2]{1,0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%p.2), index=0
  %four = s32[] constant(4)
  ROOT %lt.2 = pred[] compare(%i.2, %four), direction=LT
}

ENTRY %main (x.0: f32[2,2]) -> f32[2,2] {
  %x.0 = f32[2,2]{1,0} parameter(0)
  %i.0 = s32[] constant(0)
  %init = (s32[], f32[2,2]{1,0}) tuple(%i.0, %x.0)
  %w = (s32[], f32[2,2]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_induction_variable":\
{"tuple_index":"0"},"known_init_step":{"init":"0","step":"1"},"known_trip_count":{"n":"4"}}
  ROOT %out = f32[2,2]{1,0} get-tuple-element(%w), index=1
}
"""


def test_a_chain_of_pred_conditionals_counts_each_partitions_path():
    mod = hlo.parse_hlo(CHAIN)
    dot = 2 * 2 * 2 * 2
    by_hand = [dot * (1 + 1 + 2 + 2), dot * (1 + 2 + 2 + 2)]  # v = 0, 1, 2, 3 and v = 1, 2, 3, 4
    assert hlo.dot_flops(mod) == sum(by_hand) / 2  # `multiplicities`: the mean over partitions
    per_device, exact = hlo.device_multiplicities(mod)
    assert exact and hlo.dot_flops(mod, per_device).tolist() == by_hand
    assert per_device["inner_false"].tolist() == [2, 3] and per_device["body"].tolist() == [4, 4]
