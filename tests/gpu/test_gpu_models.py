"""The H3 layer and the 125M LMs with `conv_impl="auto"` (what training picks on the device) against
`conv_impl="reference"` (the FFT oracle path), in fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from hippo.pretrain.models import H3, HippoLM
from tests.kernels.test_flashconv_triton import UNIT_ROUNDOFF
from tests.kernels.test_h3_core import assert_layer_auto_matches_reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _set_impl(model: torch.nn.Module, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, H3):
            m.conv_impl = impl


def test_h3_layer_auto_matches_reference_fp32(target):
    """The CPU test's check and tolerances, on the device at the tier's length."""
    torch.manual_seed(0)
    layer = H3(64, 64, layer_idx=0).to(target.device)
    u = torch.randn(2, target.layer_len, 64, device=target.device, requires_grad=True)
    assert_layer_auto_matches_reference(layer, u)


@pytest.mark.parametrize("name", ["h3", "hybrid", "transformer"])
def test_lm_auto_matches_reference_fp32_and_bf16_autocast(target, name):
    """Logits of the shipped 125M config (tiny in the dry run): fp32 auto vs fp32 reference within
    1e-4 normwise; bf16 autocast auto vs the fp32 reference within 30 bf16 roundings (the core's 18
    plus 12 of the autocast projections, each u = 2^-8 RMS u/sqrt(3), in quadrature, x3 margin:
    the same derivation as `h3_bound`), and the SSM dynamics parameters stay fp32."""
    cfg = target.model_config(name)
    torch.manual_seed(0)
    model = HippoLM(cfg).to(target.device).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, target.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(target.device)
    with torch.no_grad():
        _set_impl(model, "reference")
        ref = model(ids).float()
        _set_impl(model, "auto")
        fp32 = model(ids).float()
        with torch.autocast(target.device.type, dtype=torch.bfloat16):
            bf16 = model(ids).float()
    bf16_bound = 3.0 * (30 * UNIT_ROUNDOFF["bf16"] ** 2 / 3.0) ** 0.5
    errors = {"fp32": _rel(fp32, ref), "bf16": _rel(bf16, ref)}
    print(name, "logit rel. errors auto vs reference:", errors, "bf16 bound", bf16_bound)
    assert errors["fp32"] <= 1e-4 and errors["bf16"] <= bf16_bound, errors
    ssm = [p for n, p in model.named_parameters() if ".diag_ssm." in n or ".shift_ssm." in n]
    assert all(p.dtype == torch.float32 for p in ssm)
