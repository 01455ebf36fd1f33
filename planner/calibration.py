"""The cost model's fitted constants: each with what it stands for, the cases it was fitted on, and where its
error on cases it was not fitted on is reported.

Everything else the planner prices is counted (bytes of values, FLOPs of ops, collectives' ring bytes) or comes
from the cluster description (`planner.cluster`, which `planner.profile.calibrate` replaces with measured figures).
This one is what XLA keeps in memory beyond what the rules count; it was fitted on XLA:CPU programs of small
models on 8 emulated devices. (A layer scan's backward without remat and a pipeline stage's memory are counted
since 2026-12-01: docs/cost-model.md.) A constant refitted must keep its held-out benchmark within the tolerance
`autoshard verify` judges memory by, and the benchmark must be rerun with it.
"""

WORKING_SET = 1.3
"""The backward of one layer holds the cotangent of each of its matmul outputs at once, plus the layout copies XLA
makes of some: 1.3 x the layer's matmul output bytes (`planner.ilp.Problem.value_memory_items`), under full remat
and in straight-line code (a layer scan's backward without remat is counted: one layer's residuals).

Fitted on: the compiled cases of tests/test_predictions.py (gpt-tiny variants, moe-tiny and an MLP; batch 16 x 64),
when it priced them all; it now prices their MLP and full-remat cases. Held out: runs/benchmarks/memory_accuracy.md's
full-remat rows (sequence 128, wider and deeper models, bfloat16) and runs/benchmarks/model_zoo.md (the zoo of
tests/zoo.py: Python-loop and unrolled models, whose working set is one block's and whose kept ZeRO-3 gathers are
counted apart, `Problem.kept_weight_memory`)."""
