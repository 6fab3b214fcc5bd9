"""The optimizer skips a step with any non-finite gradient and tells DeepSpeed so."""

import torch

from hippo.parallel.engine import FiniteStepAdamW


def test_non_finite_gradient_skips_the_step_and_sets_overflow():
    w = torch.nn.Parameter(torch.ones(3))
    opt = FiniteStepAdamW([w], lr=0.1)
    w.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert opt.overflow and torch.equal(w.detach(), torch.ones(3)) and not opt.state
    w.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert not opt.overflow and (w.detach() < 1).all()
