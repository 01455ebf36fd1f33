"""The model protocols (`autoshard.protocols`): the shipped decoder implements them, and a model that does not is
refused with one line naming what it lacks, by the pipeline and by routing traces alike."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import models
from autoshard import protocols
from autoshard.pipeline import check_pipelinable
from autoshard.routing import routing_trace
from planner.errors import AutoshardError, PlanError


class _Plain(nnx.Module):
    """A user model: a loss and nothing else."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Linear(4, 4, rngs=rngs)

    def loss(self, batch):
        return (self.w(batch["x"]) ** 2).mean(), {}


def test_the_decoder_implements_both_protocols():
    model = models.abstract("moe-tiny")
    assert isinstance(model, protocols.StagedModel) and isinstance(model, protocols.MoEModel)
    assert protocols.missing(model, protocols.StagedModel) == protocols.missing(model, protocols.MoEModel) == []
    assert model.aux_loss_weight == model.cfg.aux_loss_weight


def test_a_model_without_the_protocols_gets_one_line_naming_what_it_lacks():
    model = _Plain(nnx.Rngs(0))
    assert protocols.missing(model, protocols.MoEModel) == ["aux_loss_weight", "embed_inputs", "layer_stack"]
    with pytest.raises(PlanError, match=r"_Plain cannot be pipelined: it lacks blocks, embed_inputs, head_loss"):
        check_pipelinable(model)
    with pytest.raises(AutoshardError, match=r"_Plain has no embed_inputs / layer_stack: cannot record its routing"):
        routing_trace(model, [{"x": np.zeros((2, 4), np.float32)}])
