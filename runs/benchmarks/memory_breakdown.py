"""Memory of straight-line steps, part by part: what the planner predicts against what the compiled step holds at its
peak (`autoshard.liveness`), on the zoo's models (tests/zoo.py, the cases the straight-line rules were measured on)
and on models the rules were not measured on (held out: tests/test_repeated_blocks.py's Python-loop LM, with 4
identical blocks and with 3 blocks of different widths; tests/test_attention_rewrite.py's encoder-decoder and its
padded-queries LM).

Reproduce (from the repository root; a few minutes on 2 CPU cores):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python runs/benchmarks/memory_breakdown.py

Writes runs/benchmarks/memory_breakdown.json and runs/benchmarks/memory_breakdown.md next to this file.

Per model, the meshes free (`cluster="cpu:8"`), tensor (`{"tensor": 2}`), fsdp (`data=2,fsdp=4`), seq
(`{"seq": 2, "data": 4}`) and seq_tensor (`{"seq": 2, "data": 2, "tensor": 2}`), the rest searched. Each plan's
trainer is judged by `autoshard.verify`; its parts are: forward (predicted: activations and ring / Ulysses attention
residuals; compiled: forward values live at the peak), backward (predicted: the backward working set, the attention
transient and convolution copies; compiled: backward values and what a loop or branch body holds there), weight
copies (predicted: ZeRO-3 gathers kept for the backward; compiled: copies of arguments live at the peak). The
gradients are predicted with the parameters (less what is written over freed activations) and compiled among the
backward values, so the parts need not add up; `sim / XLA` is the simulated peak of the temporaries over XLA's.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import autoshard  # noqa: E402
import test_repeated_blocks as loop_lm  # noqa: E402
import zoo  # noqa: E402
from planner.errors import AutoshardError  # noqa: E402
from test_attention_rewrite import ENCDEC, PADDED  # noqa: E402

MESHES = {"free": None, "tensor": {"tensor": 2}, "fsdp": {"data": 2, "fsdp": 4}, "seq": {"seq": 2, "data": 4},
          "seq_tensor": {"seq": 2, "data": 2, "tensor": 2}}
FORWARD = ("activations", "ring attention residuals", "ulysses attention residuals")
BACKWARD = ("backward working set", "ring attention transient", "ulysses attention transient",
            "convolution layout copies")
COPIES = ("weight copies kept for the backward", "gathered weights kept for the backward")


class LoopLM(zoo.ZooModel):
    """tests/test_repeated_blocks.py's model through `loss_fn` (its blocks a Python loop), on [16, 32] tokens."""

    def plan(self, batch, **kwargs):
        return autoshard.plan(self.factory, batch, loss_fn=loop_lm.token_loss, **kwargs)

    def parallelize(self, plan):
        return autoshard.parallelize(self.factory(), self.optimizer(), plan, loss_fn=loop_lm.token_loss)


def _tokens() -> dict[str, np.ndarray]:
    toks = np.random.default_rng(0).integers(0, loop_lm.VOCAB, size=(16, 33)).astype(np.int32)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


HELD_OUT = {"loop_lm4": LoopLM("loop_lm4", _tokens, lambda: optax.adam(1e-3), factory=loop_lm.factory(4)),
            "loop_lm3_widths": LoopLM("loop_lm3_widths", _tokens, lambda: optax.adam(1e-3),
                                      factory=loop_lm.factory(3, [32, 48, 64])),
            "encdec": ENCDEC, "padded_queries": PADDED["flax"]}


def _sum(parts: dict[str, float], keys: tuple[str, ...]) -> float:
    return sum(parts.get(k, 0.0) for k in keys)


def run_case(model: zoo.ZooModel, mesh: dict | None) -> dict:
    batch = model.batch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = model.plan(batch, cluster="cpu:8", **({"mesh": mesh} if mesh else {}))
    except AutoshardError as e:
        return {"error": str(e)}
    result = autoshard.verify(model.parallelize(plan), batch)
    pred, comp = result.predicted, result.compiled
    parts, kinds = pred.get("memory_breakdown") or {}, comp["memory_peak"]["by_kind"]
    return {"mesh": plan.mesh_string(), "predicted": pred["memory_bytes_per_device"],
            "compiled": comp["memory_bytes_per_device"], "ok": result.rows[0].ok,
            "forward": [_sum(parts, FORWARD), kinds.get("forward values", 0.0)],
            "backward": [_sum(parts, BACKWARD), kinds.get("backward values", 0.0)
                         + kinds.get("in a loop or branch body", 0.0)],
            "weight copies": [_sum(parts, COPIES), kinds.get("argument copies", 0.0)],
            "simulated temp": comp["memory_peak"]["temp_bytes"], "xla temp": comp["memory"]["temp"],
            "predicted parts": parts, "compiled parts": kinds}


def _kib(x: float) -> str:
    return f"{x / 1024:.1f}"


def write_markdown(results: dict, meta: dict) -> str:
    lines = ["# Memory of straight-line steps, part by part", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}; jax {meta['jax']}; {meta['date']}; {meta['total_seconds']:.0f} s.", "",
             "Parts in KiB per device, predicted / compiled at the simulated peak (see the script's docstring for "
             "what each part holds). error = (predicted - compiled) / compiled of the whole step.", ""]
    for group, rows in results.items():
        lines += [f"## {group}", "", "| model | plan | mesh | predicted | compiled | error | verify | forward "
                  "| backward | weight copies | sim / XLA temp |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (model, plan), r in rows.items():
            if "error" in r:
                lines.append(f"| {model} | {plan} | refused: {r['error'][:90]} |" + " |" * 8)
                continue
            err = r["predicted"] / r["compiled"] - 1
            pair = lambda k: f"{_kib(r[k][0])} / {_kib(r[k][1])}"  # noqa: E731
            lines.append(f"| {model} | {plan} | {r['mesh']} | {_kib(r['predicted'])} | {_kib(r['compiled'])} "
                         f"| {err:+.1%} | {'PASS' if r['ok'] else 'FAIL'} | {pair('forward')} | {pair('backward')} "
                         f"| {pair('weight copies')} | {r['simulated temp'] / r['xla temp'] - 1:+.1%} |")
        errs = [r["predicted"] / r["compiled"] - 1 for r in rows.values() if "error" not in r]
        lines += ["", f"{len(errs)} plans; memory error from {min(errs):+.1%} to {max(errs):+.1%}; "
                  f"{sum(abs(e) > 0.10 for e in errs)} outside verify's 10%.", ""]
    lines += ["## Reading", "", *meta["notes"], ""]
    return "\n".join(lines)


NOTES = [
    "- The zoo's plans are all within verify's 10%; the held-out models' are not: the rules for straight-line code "
    "(residuals XLA stores, `WORKING_SET` x one block's matmul outputs, the gradients written over freed activations) "
    "were measured on the zoo and do not carry over to them.",
    "- Weight copies (counted since 2026-12-02, `Problem.kept_weight_memory`): XLA:CPU keeps a transposed copy of each "
    "3-D projection kernel (DenseGeneral, einsum weights such as [d, heads, head_dim]) from the start of the step to "
    "the backward, for the input gradient's matmul; a ZeRO-3 weight's kept gather is that copy. The predicted part "
    "equals the compiled argument copies on the 18 plans where they are the only copies kept (10 held out, to 0.1 KiB); where a "
    "ZeRO-3 gather is kept instead the count is up to 8 KiB over. It took gqa / seq_tensor from -10.5% to "
    "-5.2% and the encoder-decoder's and padded-queries LM's seq plans further over (their working set, below).",
    "- Forward: the planner assumes a cheap elementwise value (a norm's scaled output, an activation's output) is "
    "recomputed in the backward from what it was computed from (`Problem._stored`); XLA keeps it where it was "
    "written out for a matmul in the forward. On gqa / seq_tensor that is about 72 KiB (5 norm outputs, 2 MLP "
    "activations). Counting them (tried 2026-12-02) put the zoo's straight-line plans up to 16% over, the working "
    "set having been fitted with them missing.",
    "- Backward: the held-out single-block models (encdec, padded_queries) have no numbered blocks, so their working "
    "set is every matmul output of the step (`Problem._largest_block`), where XLA holds a few cotangents at a time.",
    "- A prototype (2026-12-02, not committed) with the forward rule above and, for the working set of straight-line "
    "code, the backward of the step's largest matmul (its output's and its non-weight inputs' cotangents) in place of "
    "1.3 x a block's matmul outputs, put 33 of the 35 transformer plans of both groups within 10% (-10.0% to +10.4%) "
    "but the CNN's three plans at -12% to -20%: their peak is in the forward, at the first BatchNorm's "
    "intermediates, which no rule here models.",
    "- The fix these point to is one model, not more constants: the step's liveness simulated over the traced graph "
    "(which residuals are still to be read, which cotangents are live, which gradients are written; the forward's "
    "peak too), the peak taken over its steps; `autoshard.liveness` gives the compiled side of each part to check "
    "it against.",
]


def main() -> None:
    assert len(jax.devices()) == 8, "needs 8 emulated devices: set XLA_FLAGS before jax is imported"
    t = time.perf_counter()
    results: dict[str, dict] = {"The zoo (measured on)": {}, "Held out": {}}
    for group, models in (("The zoo (measured on)", zoo.MODELS), ("Held out", HELD_OUT)):
        for name, model in models.items():
            for plan_name, mesh in MESHES.items():
                results[group][name, plan_name] = r = run_case(model, mesh)
                print(name, plan_name, r.get("error") or f"{r['predicted'] / r['compiled'] - 1:+.1%}", flush=True)
    meta = {"command": "XLA_FLAGS=--xla_force_host_platform_device_count=8 python runs/benchmarks/memory_breakdown.py",
            "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), 8 emulated devices",
            "jax": jax.__version__, "date": datetime.date.today().isoformat(),
            "total_seconds": time.perf_counter() - t, "notes": NOTES}
    flat = {group: {f"{m}/{p}": r for (m, p), r in rows.items()} for group, rows in results.items()}
    (HERE / "memory_breakdown.json").write_text(json.dumps({"meta": meta, "results": flat}, indent=1) + "\n")
    (HERE / "memory_breakdown.md").write_text(write_markdown(results, meta))
    print(f"wrote {HERE / 'memory_breakdown.md'} in {meta['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
