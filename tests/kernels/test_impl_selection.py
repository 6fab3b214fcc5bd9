"""h3_core's path choice (`kernels.h3_core.select_impl`) as a pure function: every branch and
fallback with the capability and dtype as inputs, no GPU and no kernel launch.

"auto" must never pick a path that raises; an explicit "triton" that cannot run must raise
`TritonUnavailableError` with the reason.
"""

from __future__ import annotations

import pytest
import torch

from hippo.kernels import TritonUnavailableError, select_impl
from hippo.kernels.h3_core import _resolve_impl, triton_unsupported

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64

# (capability, dtype, L, device type, other facts) -> what "auto" runs.
AUTO_TABLE = [
    ((9, 0), BF16, 8192, "cuda", {}, "triton"),
    ((8, 0), BF16, 8192, "cuda", {}, "triton"),
    ((8, 6), FP16, 4096, "cuda", {}, "triton"),
    ((8, 0), FP32, 2048, "cuda", {}, "triton"),
    ((9, 0), FP32, 1, "cuda", {}, "triton"),
    ((8, 0), FP32, 6000, "cuda", {}, "torch"),  # issue 13: used to pick triton, whose launcher raised
    ((8, 0), FP32, 2049, "cuda", {}, "torch"),  # fp32 stops at N = 4096 (L = 2048)
    ((9, 0), FP32, 6000, "cuda", {}, "torch"),  # also on sm_90: 3xTF32 spills from N = 8192
    ((9, 0), BF16, 8193, "cuda", {}, "torch"),  # beyond the one-kernel block FFT
    ((7, 5), BF16, 1024, "cuda", {}, "torch"),  # below sm_80
    ((9, 0), FP64, 1024, "cuda", {}, "torch"),  # no fp64 kernels
    ((9, 0), BF16, 1024, "cuda", {"stateful": True}, "torch"),  # prefill state: chunked path
    ((9, 0), BF16, 1024, "cuda", {"triton_installed": False}, "torch"),
    (None, BF16, 1024, "cuda", {}, "torch"),  # capability unknown
    (None, FP32, 1024, "cpu", {}, "torch"),
    (None, FP32, 1024, "cpu", {"interpret": True}, "torch"),  # the interpreter is for tests only
]


@pytest.mark.parametrize("cap,dtype,L,device,facts,want", AUTO_TABLE)
def test_auto_table(cap, dtype, L, device, facts, want):
    assert select_impl(cap, dtype, L, device, **facts) == want


@pytest.mark.parametrize("cap,dtype,L,device,facts,want", AUTO_TABLE)
def test_auto_never_picks_a_path_that_raises(cap, dtype, L, device, facts, want):
    """Whatever "auto" picks, asking for it explicitly runs (no TritonUnavailableError)."""
    picked = select_impl(cap, dtype, L, device, **facts)
    assert select_impl(cap, dtype, L, device, impl=picked, **facts) == picked


@pytest.mark.parametrize(
    "cap,dtype,L,device,facts,match",
    [
        ((8, 0), FP32, 6000, "cuda", {}, "fp32 with L=6000 > 2048"),
        ((9, 0), BF16, 8193, "cuda", {}, "L=8193 > 8192"),
        ((7, 5), BF16, 1024, "cuda", {}, "compute capability 7.5 < 8.0"),
        ((9, 0), FP64, 1024, "cuda", {}, "torch.float64"),
        ((9, 0), BF16, 1024, "cuda", {"stateful": True}, "initial_state"),
        ((9, 0), BF16, 1024, "cuda", {"triton_installed": False}, "not installed"),
        (None, BF16, 1024, "cuda", {}, "capability is unknown"),
        (None, FP32, 1024, "cpu", {}, "not CUDA"),
        (None, FP32, 6000, "cpu", {"interpret": True}, "fp32 with L=6000"),  # same limits interpreted
    ],
)
def test_explicit_triton_that_cannot_run_raises_with_the_reason(cap, dtype, L, device, facts, match):
    with pytest.raises(TritonUnavailableError, match=match) as info:
        select_impl(cap, dtype, L, device, impl="triton", **facts)
    assert info.value.reason == triton_unsupported(cap, dtype, L, device, **facts)
    assert isinstance(info.value, RuntimeError)  # what callers caught before the class existed


def test_explicit_triton_runs_under_the_interpreter_and_on_gpus():
    assert select_impl(None, FP32, 1024, "cpu", impl="triton", interpret=True) == "triton"
    assert select_impl((8, 0), FP32, 2048, "cuda", impl="triton") == "triton"
    assert select_impl((12, 0), BF16, 8192, "cuda", impl="triton") == "triton"


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_explicit_torch_paths_run_anywhere(impl):
    for cap, dtype, L, device in (((7, 0), FP64, 10**5, "cuda"), (None, BF16, 1, "cpu")):
        assert select_impl(cap, dtype, L, device, impl=impl, stateful=True) == impl


def test_unknown_impl_is_a_value_error():
    with pytest.raises(ValueError, match="impl must be one of"):
        select_impl((9, 0), BF16, 1024, "cuda", impl="chunked")  # the config's name, not the kernels'


def test_resolve_reads_this_machines_facts(monkeypatch):
    """The impure wrapper: capability from torch.cuda, TRITON_INTERPRET, triton's presence."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _resolve_impl("auto", cuda, FP32, 6000, False) == "torch"
    assert _resolve_impl("auto", cuda, BF16, 6000, False) == "triton"
    assert _resolve_impl("auto", cpu, BF16, 6000, False) == "torch"
    with pytest.raises(TritonUnavailableError, match="not CUDA"):
        _resolve_impl("triton", cpu, BF16, 1024, False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _resolve_impl("triton", cpu, BF16, 1024, False) == "triton"
    assert _resolve_impl("auto", cpu, BF16, 1024, False) == "torch"
