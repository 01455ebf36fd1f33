"""Bad input is one `error:` line and exit status 2, before any work: seeds, device counts, model-config fields, plan
and cluster files with wrong JSON types or ranges, sequence lengths, checkpoint folders, flag combinations. All
in-process (each case fails before a trainer is built); none leaves a run folder behind. The Python API refuses the
same nonsense with one-line `AutoshardError`s."""

import json
import os

import numpy as np
import pytest

from autoshard import cli, data
from planner.errors import AutoshardError
from checks import assert_one_line_error

TINY = ["--steps", "3", "--batch", "8", "--seq", "32"]


def _plan(**changes) -> dict:
    plan = {"version": 1, "mesh": {"data": 8}, "params": {}, "activations": {}, "remat": "none"}
    plan.update(changes)
    return plan


PLANS = {
    "mesh_list": _plan(mesh=[8]),
    "params_list": _plan(params=[]),
    "remat_sometimes": _plan(remat="sometimes"),
    "version_string": _plan(version="1"),
    "stages_string": _plan(mesh={"pipe": 2, "data": 4}, pipeline={"stages": "abc", "microbatches": 2}),
    "microbatches_string": _plan(mesh={"pipe": 2, "data": 4},
                                 pipeline={"stages": [[0, 1], [1, 2]], "microbatches": "4"}),
    "unknown_activation": _plan(activations={"attn_scores": [None, None, None]}),
    "spec_not_list": _plan(params={"embed": "data"}),
    "sequence_list": _plan(sequence=[]),
    "fractional_axis": _plan(mesh={"data": 2.5}),
    "provenance_string": _plan(provenance="me"),
    "seq4": _plan(mesh={"data": 2, "seq": 4}, sequence={"method": "ring"}),
}
CLUSTERS = {
    "infinite_memory": {"base": "cpu:8", "memory_bytes": float("inf")},
    "bandwidth_string": {"base": "cpu:8", "hbm_bandwidth": "fast"},
    "nan_latency": {"base": "cpu:8", "intra": {"bandwidth": 1e9, "latency": float("nan")}},
}

BAD = {
    # seeds
    "negative seed": (["--seed", "-1"], "between 0 and 2^63-1"),
    "seed of 2^63": (["--seed", str(2**63)], "between 0 and 2^63-1"),
    "seed not a number": (["--seed", "abc"], "expected an integer seed"),
    # devices
    "100000 devices": (["--devices", "100000"], "more devices than the 8 available"),
    "zero devices": (["--devices", "0"], "positive integer"),
    "negative devices": (["--devices", "-3"], "positive integer"),
    # model config fields
    "negative capacity factor": (["--model", "moe-tiny:capacity_factor=-1"], "capacity_factor must be a positive"),
    "negative init std": (["--model", "gpt-tiny:init_std=-5"], "init_std must be a positive"),
    "zero rope theta": (["--model", "gpt-tiny:rope_theta=0"], "rope_theta must be a positive"),
    "negative norm eps": (["--model", "gpt-tiny:norm_eps=-1"], "norm_eps must be a positive"),
    "negative aux loss weight": (["--model", "moe-tiny:aux_loss_weight=-0.5"], "aux_loss_weight must be a non-neg"),
    "zero hidden": (["--model", "gpt-tiny:hidden=0"], "hidden must be positive"),
    "unknown activation function": (["--model", "gpt-tiny:activation=relu"], "activation must be gelu or swiglu"),
    "float64": (["--model", "gpt-tiny:dtype=float64"], "dtype must be float32 or bfloat16"),
    "top_k above experts": (["--model", "moe-tiny:top_k=9"], "top_k=9 must be between 1 and experts=4"),
    "infinite rope theta": (["--model", "gpt-tiny:rope_theta=inf"], "expected a float"),
    "layers not a number": (["--model", "gpt-tiny:layers=two"], "expected a int"),
    "negative experts": (["--model", "gpt-tiny:experts=-2"], "experts must be 0 (dense) or positive"),
    # meshes
    "empty mesh": (["--mesh", ""], "empty mesh"),
    "zero axis": (["--mesh", "data=0"], "must have a positive integer size"),
    "axis twice": (["--mesh", "data=2,data=4"], "given twice"),
    # plan files: JSON types and ranges
    "plan mesh a list": (["--plan", "{d}/mesh_list.json"], "'mesh' must be an object"),
    "plan params a list": (["--plan", "{d}/params_list.json"], "'params' must be an object"),
    "plan remat sometimes": (["--plan", "{d}/remat_sometimes.json"], "unknown remat 'sometimes'"),
    "plan version a string": (["--plan", "{d}/version_string.json"], "'version' must be an integer"),
    "plan stages a string": (["--plan", "{d}/stages_string.json"], "pipeline stages must be a list"),
    "plan microbatches a string": (["--plan", "{d}/microbatches_string.json"], "microbatches must be an integer"),
    "plan unknown activation": (["--plan", "{d}/unknown_activation.json"], "unknown activation 'attn_scores'"),
    "plan spec not a list": (["--plan", "{d}/spec_not_list.json"], "must be a list (one entry per dimension)"),
    "plan sequence a list": (["--plan", "{d}/sequence_list.json"], "'sequence' must be an object or null"),
    "plan fractional axis": (["--plan", "{d}/fractional_axis.json"], "positive integer size, got 2.5"),
    "plan provenance a string": (["--plan", "{d}/provenance_string.json"], "'provenance' must be an object"),
    # sequence length against the plan's seq degree (a plan file and a mesh)
    "seq against a plan's seq=4": (["--plan", "{d}/seq4.json", "--seq", "130"], "which seq=4 does not divide"),
    "seq against --mesh seq=4": (["--mesh", "data=2,seq=4", "--seq", "130"], "which seq=4 does not divide"),
    # cluster files and specs
    "infinite memory_bytes": (["--cluster", "{d}/infinite_memory.json"], "memory_bytes must be an integer"),
    "bandwidth a string": (["--cluster", "{d}/bandwidth_string.json"], "hbm_bandwidth must be a number"),
    "NaN latency": (["--cluster", "{d}/nan_latency.json"], "latency must be finite"),
    "cluster of other size": (["--cluster", "a100-80g:16"], "has 16 devices but 8 are in use"),
    "unknown cluster": (["--cluster", "nope:8"], "unknown cluster 'nope:8'"),
    # checkpoint folders: checked up front
    "checkpoint under a file": (["--checkpoint", "{d}/a_file.txt/ck"], "cannot create checkpoint folder"),
    "checkpoint is a file": (["--checkpoint", "{d}/a_file.txt"], "is a file, not a folder"),
    "checkpoint is a user's folder": (["--checkpoint", "{d}/users"], "not an autoshard checkpoint folder"),
    "resume with nothing to resume": (["--resume", "--no-out"], "--resume needs the run to continue"),
    "resume of weights only": (["--resume", "--checkpoint", "{d}/legacy"], "holds weights only"),
    "resume and restore": (["--resume", "--restore", "x", "--checkpoint", "y"], "pass one of them"),
    "resume without checkpoints": (["--resume", "--no-checkpoint", "--out", "x"], "drop --no-checkpoint"),
    "restore of a user's folder": (["--restore", "{d}/users"], "not an autoshard checkpoint folder"),
    # run folder and flags
    "existing run folder": (["--out", "{d}/users"], "already exists and holds files: pass --resume"),
    "warmup past the end": (["--warmup", "10"], "--warmup 10 is longer than --steps 3"),
    "memory budget with a mesh": (["--mesh", "data=8", "--memory-budget", "1GB"], "--memory-budget is a budget"),
    "remat with a plan file": (["--plan", "{d}/seq4.json", "--remat", "full"], "a --plan file carries its own"),
    "zero memory budget": (["--memory-budget", "0"], "positive size"),
    "NaN learning rate": (["--lr", "nan"], "positive number"),
    "keep zero": (["--keep", "0"], "positive integer"),
    "checkpoint every zero": (["--checkpoint-every", "0"], "positive integer"),
    "eval every zero": (["--eval-every", "0"], "positive integer"),
    "steps as a float": (["--steps", "1e3"], "positive integer"),
    "missing data": (["--data", "{d}/nothing.txt"], "does not exist"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    for name, plan in PLANS.items():
        (d / f"{name}.json").write_text(json.dumps(plan))
    for name, cluster in CLUSTERS.items():
        (d / f"{name}.json").write_text(json.dumps(cluster))
    (d / "a_file.txt").write_text("text")
    (d / "legacy" / "params").mkdir(parents=True)  # the weights-only format of an older autoshard
    (d / "legacy" / "autoshard.json").write_text(json.dumps({"format": 1, "model": "gpt-tiny", "params": {}}))
    (d / "users").mkdir()
    (d / "users" / "thesis.tex").write_text("mine")
    return d


def test_the_table_is_large_enough():
    assert len(BAD) >= 40


@pytest.mark.smoke
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_exit_2(case, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative folder a case might create would land here
    args, message = BAD[case]
    args = [a.format(d=files) for a in args]
    if "--no-out" in args:
        args.remove("--no-out")
    elif "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    code = cli.main(["train", *TINY, *args])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert_one_line_error(err, message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()  # nothing left behind
    assert os.listdir(files / "users") == ["thesis.tex"]  # a user's folder is never written into


def test_the_python_api_refuses_the_same(token_batch):
    import jax

    import autoshard
    import models
    from autoshard.train import make_optimizer

    abstract = models.abstract("gpt-tiny")
    with pytest.raises(AutoshardError, match="remat='sometimes': use None"):
        autoshard.plan(abstract, token_batch, remat="sometimes")
    with pytest.raises(AutoshardError, match="seed must be between 0 and 2"):
        models.factory("gpt-tiny", seed=-1)
    with pytest.raises(AutoshardError, match="seed must be between 0 and 2"):
        data.TextData(np.zeros(100, np.uint8), 2, 8, seed=2**64)
    with pytest.raises(AutoshardError, match="capacity_factor must be a positive"):
        models.ModelConfig(experts=4, capacity_factor=-1.0)
    trainer = autoshard.parallelize(models.factory("gpt-tiny"), make_optimizer(),
                                    autoshard.rule_plan(abstract, "data=1"), devices=jax.devices()[:1])
    bad = {k: v.copy() for k, v in token_batch.items()}
    bad["inputs"][0, 0] = 256
    with pytest.raises(AutoshardError, match=r"token id 256, outside the model's vocabulary \[0, 256\)"):
        trainer.step(bad)
    bad["inputs"][0, 0] = -1
    with pytest.raises(AutoshardError, match="token id -1"):
        trainer.step(bad)
    assert trainer.steps_done == 0  # refused before any update
