"""The optimizer skips a step with any non-finite gradient and tells DeepSpeed so."""

import pytest
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


# Every way a tensor's value reaches Python: each is a device->host sync on a GPU.
_SYNCS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


def _count_syncs(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in _SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "nan"])
def test_the_finiteness_check_syncs_the_host_once_per_step_not_per_parameter(monkeypatch, poisoned):
    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(12)]
    for p in params:
        p.grad = torch.full((4,), 0.5)
    if poisoned:
        params[7].grad[2] = float("inf")
    opt = FiniteStepAdamW(params, lr=0.1)
    # AdamW's own update reads its step counters (CPU tensors, no device sync): keep it out of the count.
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: "stepped")
    calls = _count_syncs(monkeypatch)
    result = opt.step()
    assert opt.overflow is poisoned and (result is None) is poisoned
    assert len(calls) == 1, calls
