"""`train.precision=bf16` keeps the SSM dynamics in fp32 (issue 13), checked inside real engines.

DeepSpeed's bf16 mode casts every parameter to bf16. For the SSM dynamics that loses the
training signal: `A_imag` ~ pi n reaches ~97, where bf16 values are 0.5 apart, and `log_dt` ~ -4.6
keeps dt only to ~3%, so updates of ~1e-3 per step are rounded away. The parameters tagged with
`mark_ssm_dynamics` stay fp32 tensors in the running engine (gradients from autograd in fp32, the
optimizer's fp32 master equal to them, updates kept below bf16's resolution), the SSM kernels are
fed exactly those values, and every other parameter is bf16 as before. (Not checked, because not
so: DeepSpeed's gradient buffers are bf16 for all parameters, so these gradients reach the master
rounded to bf16; see `parallel.deepspeed_compat.ssm_dynamics_kept_in_fp32`.)

One worker process (`mixed_precision_worker.py`) builds the engines of the three optimizer paths a
bf16 run can take and reports on all of them: ZeRO-0 (pipeline engine, DeepSpeed's BF16
optimizer), ZeRO-1 (pipeline engine, its ZeRO optimizer) and ZeRO-2 (plain engine). bf16 matmuls
run ~400x slower than fp32 on these CPUs: the model is the 4-layer d_model=32 one, 16 tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from hippo.pretrain.models.h3 import H3
from hippo.pretrain.models.ssm import is_ssm_dynamics
from tests.helpers import ROOT, torchrun

WORKER = str(ROOT / "tests/parallel/mixed_precision_worker.py")
ZERO_STAGES = [0, 1, 2]
OPTIMIZERS = {0: "BF16_Optimizer", 1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer"}
LOSS_STEPS = 30


def run_worker(tmp_path, *args: str) -> dict:
    torchrun(0, [WORKER, "--out", str(tmp_path), *args])  # one rank, no launcher
    return json.loads((tmp_path / "rank0.json").read_text())


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[int, dict]:
    """Three bf16 engines (one per ZeRO stage), 3 steps each: ~12 s, mostly start-up."""
    report = run_worker(tmp_path_factory.mktemp("mixed_precision"), *[a for z in ZERO_STAGES for a in ("--zero", str(z))])
    return {int(z): case for z, case in report["precision_cases"].items()}


@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_ssm_dynamics_are_fp32_in_a_bf16_engine_and_the_rest_bf16(cases, zero):
    c = cases[zero]
    assert c["optimizer"] == OPTIMIZERS[zero]
    assert c["n_ssm"] == 15  # 3 H3 layers x (shift B, log_dt, log_A_real, A_imag, diagonal B)
    assert c["ssm_dtypes"] == ["float32"], c
    assert c["other_dtypes"] == ["bfloat16"], c
    # Each backward's gradients (as autograd computes them), the master copy and Adam state: fp32.
    assert c["ssm_grad_dtypes"] == ["float32"], c
    assert c["master_dtypes"] == ["float32"] and c["adam_state_dtypes"] == ["float32"], c
    # The module runs on the master values themselves, not on a rounded copy of them.
    assert c["master_minus_param"] == 0.0, c
    # The kernels get fp32 SSM parameters, and exactly the master values.
    assert c["kernel_input_dtypes"] == {"discretize_diagonal": ["float32"], "h3_core": ["float32"]}, c
    assert c["discretize_minus_master"] == 0.0 and c["h3_core_shift_B_minus_master"] == 0.0, c


@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_updates_finer_than_bf16_resolution_are_kept(cases, zero):
    c = cases[zero]
    # After 3 steps (lr ~1e-3) nearly every SSM value moved, to values bf16 cannot hold.
    assert c["moved_fraction"] > 0.9 and c["off_bf16_grid_fraction"] > 0.9, c
    # A_imag reaches ~97 (bf16 spacing 0.5 there): each entry moved by far less than that.
    assert c["a_imag_max"] > 90 and c["a_imag_moved_fraction"] > 0.9 and c["a_imag_max_move"] < 0.05, c


@pytest.mark.parametrize("conv_impl", ["chunked", "reference"])
def test_an_h3_layer_runs_on_fp32_dynamics_with_bf16_weights(conv_impl):
    """The layer as a bf16 engine holds it. The reference path builds the shift taps the way the
    Triton path (the default on GPUs) does, by a convolution that needs one dtype: the layer
    hands the kernels its SSM parameters in fp32."""
    torch.manual_seed(0)
    layer = H3(16, 64, layer_idx=0, conv_impl=conv_impl)
    reference = H3(16, 64, layer_idx=0, conv_impl=conv_impl)
    for p in layer.parameters():
        if not is_ssm_dynamics(p):
            p.data = p.data.bfloat16()
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    u = torch.randn(2, 8, 16).bfloat16()
    y = layer(u)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert all(p.grad.dtype == p.dtype for p in layer.parameters())
    want = reference(u.float())
    assert (y.float() - want).abs().max() <= 3e-2 * want.abs().max()


def test_an_optimizer_group_mixing_ssm_dynamics_with_other_parameters_is_refused():
    """DeepSpeed flattens each group into one tensor: a mixed one would turn its bf16 members fp32."""
    from hippo.parallel.deepspeed_compat import ssm_dynamics_kept_in_fp32

    layer = H3(16, 64, layer_idx=0)
    with pytest.raises(ValueError, match="mixes SSM-dynamics parameters"):
        with ssm_dynamics_kept_in_fp32(layer, torch.optim.AdamW(layer.parameters())):
            pass


@pytest.mark.slow
def test_a_bf16_run_lowers_the_loss_like_the_fp32_run(tmp_path):
    """30 steps on one fixed batch (memorization), fp32 and bf16 from the same initialization:
    the bf16 run lowers the loss by at least 90% of what the fp32 run does. ~15 s."""
    runs = run_worker(tmp_path, "--loss-steps", str(LOSS_STEPS))["loss_runs"]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert len(fp32) == len(bf16) == LOSS_STEPS
    assert fp32[0] == pytest.approx(bf16[0], rel=1e-2)  # same model, same batch
    fp32_drop, bf16_drop = fp32[0] - fp32[-1], bf16[0] - bf16[-1]
    assert fp32_drop > 0.25 * fp32[0], fp32  # substantial: a quarter of the initial loss
    assert bf16_drop >= 0.9 * fp32_drop, (fp32_drop, bf16_drop, bf16)
