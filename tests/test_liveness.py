"""`autoshard.liveness`: the compiled step's memory peak simulated from its schedule, on hand-written HLO whose peak
is worked out by hand (the figures against XLA's own temporaries are tests/test_inspect.py's and tests/test_zoo.py's).
"""

import pytest

from autoshard.hlo import parse_hlo
from autoshard.liveness import peak_live_set

pytestmark = pytest.mark.smoke  # HLO text only: cheap, and the module must work on the oldest supported jax too

# f32[256] is 1 KiB, f32[512] 2 KiB, f32[4,256] 4 KiB.
STRAIGHT = """HloModule m, is_scheduled=true

ENTRY %main (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0), metadata={op_name="params['w']"}
  %a = f32[256]{0} exponential(%p), metadata={op_name="jit(step)/jvp()/exp"}
  %b = f32[512]{0} concatenate(%a, %p), dimensions={0}, metadata={op_name="jit(step)/jvp()/concatenate"}
  %v = f32[2,256]{1,0} bitcast(%b)
  %c = f32[256]{0} reduce(%v, %p), dimensions={0}, to_apply=%add, metadata={op_name="jit(step)/transpose(jvp())/r"}
  %d = f32[256]{0} add(%c, %a), metadata={op_name="jit(step)/transpose(jvp())/add"}
  ROOT %e = f32[256]{0} negate(%d)
}
"""


def test_a_buffer_lives_from_its_op_to_its_last_use_and_views_allocate_nothing():
    peak = peak_live_set(parse_hlo(STRAIGHT))
    # at %c: a (1 KiB, read again by %d), b (2 KiB, alive through its view %v, read by %c) and c itself (1 KiB);
    # the parameter is an argument, not a temporary
    assert peak.temp_bytes == 4096 and peak.at == "c"
    assert {b.name: b.nbytes for b in peak.buffers} == {"a": 1024, "b": 2048, "c": 1024}
    assert peak.by_kind() == {"forward values": 3072, "backward values": 1024}


def test_an_elementwise_op_takes_over_an_operand_dying_there():
    text = """HloModule m, is_scheduled=true

ENTRY %main (p: f32[256]) -> f32[256] {
  %p = f32[256]{0} parameter(0)
  %a = f32[256]{0} exponential(%p)
  %b = f32[256]{0} exponential(%a)
  %c = f32[256]{0} add(%b, %a)
  ROOT %e = f32[256]{0} negate(%c)
}
"""
    # a and b die at %c, which XLA may write into one of them: 2 KiB at most (3 KiB if it allocated anew)
    assert peak_live_set(parse_hlo(text)).temp_bytes == 2048


LOOP = """HloModule m, is_scheduled=true

%body (s: (s32[], f32[4,256])) -> (s32[], f32[4,256]) {
  %s = (s32[], f32[4,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %acc = f32[4,256]{1,0} get-tuple-element(%s), index=1
  %t = f32[256]{0} broadcast(%i), dimensions={}
  %u = f32[512]{0} concatenate(%t, %t), dimensions={0}
  %w = f32[1,256]{1,0} slice(%u), slice={[0:1], [0:256]}
  %z = s32[] constant(0)
  %upd = f32[4,256]{1,0} dynamic-update-slice(%acc, %w, %i, %z)
  ROOT %out = (s32[], f32[4,256]{1,0}) tuple(%i, %upd)
}

%cond (s: (s32[], f32[4,256])) -> pred[] {
  %s = (s32[], f32[4,256]{1,0}) parameter(0)
  ROOT %k = pred[] constant(true)
}

ENTRY %main (p: f32[4,256]) -> f32[4,256] {
  %p = f32[4,256]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = f32[4,256]{1,0} copy(%p), metadata={op_name="broadcast.1"}
  %st = (s32[], f32[4,256]{1,0}) tuple(%zero, %init)
  %loop = (s32[], f32[4,256]{1,0}) while(%st), condition=%cond, body=%body, metadata={op_name="jit(step)/jvp()/while"}
  ROOT %r = f32[4,256]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_a_loop_adds_its_body_peak_and_its_state_is_named_by_the_loop():
    peak = peak_live_set(parse_hlo(LOOP))
    # the body: t (1 KiB) and u (2 KiB) at u, then u and w (1 KiB): 3 KiB; the in-place update allocates nothing.
    # The entry: the loop state (4 KiB) while the body runs.
    assert peak.at == "loop" and peak.body_bytes == 3072 and peak.temp_bytes == 7168
    (state,) = peak.buffers
    assert state.name == "init" and state.kind == "forward values"  # named by its loop, not "broadcast.1"
    assert peak.by_kind() == {"forward values": 4096, "in a loop or branch body": 3072}


def test_a_memory_miss_shows_what_each_side_is_made_of():
    from autoshard.comparison import compare
    from autoshard.verification import Verification

    predicted = {"memory_bytes_per_device": 3000.0, "comm_bytes": {},
                 "memory_breakdown": {"activations": 1000.0, "backward working set": 2048.0}}
    peak = peak_live_set(parse_hlo(STRAIGHT))
    compiled = {"memory_bytes_per_device": 4096.0, "comm_bytes": {},
                "memory_peak": {"temp_bytes": peak.temp_bytes, "at": peak.at, "by_kind": peak.by_kind()}}
    lines = str(Verification(compare(predicted, compiled), compiled, predicted)).splitlines()
    assert lines[-3] == "memory predicted: activations 1000 B, backward working set 2 KiB"
    assert lines[-2] == ("compiled temporaries at the peak (simulated from the schedule): 4 KiB: forward values "
                         "3 KiB, backward values 1 KiB")
    assert lines[-1].startswith("FAIL")
    compiled["memory_bytes_per_device"] = 3100.0  # within tolerance: the table alone
    assert str(Verification(compare(predicted, compiled), compiled, predicted)).splitlines()[-2].startswith("  ")
