"""The cost model's fitted constants: each with what it stands for, the cases it was fitted on, and where its
error on cases it was not fitted on is reported.

Everything else the planner prices is counted (bytes of values, FLOPs of ops, collectives' ring bytes) or comes
from the cluster description (`planner.cluster`, which `planner.profile.calibrate` replaces with measured figures).
These three are what XLA keeps in memory beyond what the rules count; they were fitted on XLA:CPU programs of small
models on 8 emulated devices. A constant refitted must keep its held-out benchmark within the tolerance
`autoshard verify` judges memory by, and the benchmark must be rerun with it.
"""

WORKING_SET = 1.3
"""The backward of one layer holds the cotangent of each of its matmul outputs at once, plus the layout copies XLA
makes of some: 1.3 x the layer's matmul output bytes (`planner.ilp.Problem.working_set`).

Fitted on: the compiled cases of tests/test_predictions.py (gpt-tiny variants, moe-tiny and an MLP; batch 16 x 64).
Held out: runs/benchmarks/memory_accuracy.md (sequence 128, wider and deeper models, GQA, full remat, MoE, bfloat16)
and runs/benchmarks/model_zoo.md (the zoo of tests/zoo.py: Python-loop and unrolled models, whose working set is
one block's and whose kept ZeRO-3 gathers are counted apart, `Problem.gathered_memory`)."""

GRAD_COPIES = 5.0
"""Full-size (unsharded over fsdp) copies of a pipeline stage's weights the compiled pipelined step keeps besides
weights and optimizer state at rest: the tick loop's gradient accumulator, the reduced gradient and the optimizer
update's temporaries (`planner.stages`).

Fitted on: gpt-tiny pipelines on 8 CPU devices (pipe 2 and 4, with and without fsdp; GPipe, 1F1B, interleaved),
with WORKING_SET_SHARE, before the executor kept residuals and applied remat. Held out:
runs/benchmarks/memory_accuracy.md (pipeline rows at sequence 128) and runs/benchmarks/pipeline_efficiency.md
(moe-tiny rows)."""

WORKING_SET_SHARE = 0.35
"""Share of the backward residuals (as the intra-op program's rule counts them) that XLA keeps live in a pipeline
stage's recomputing backward (`planner.stages`; the rule over-counts what XLA keeps, see docs/cost-model.md).

Fitted on: as GRAD_COPIES. Held out: as GRAD_COPIES. Under remat "full" (the recomputing path since the executor
applies the plan's remat) it over-predicts gpt-tiny's memory by 27% (runs/benchmarks/pipeline_efficiency.md)."""
