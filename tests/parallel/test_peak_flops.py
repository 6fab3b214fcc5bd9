"""`train.peak_flops: 0` detects the GPU's dense bf16 peak from the name CUDA reports."""

from __future__ import annotations

import pytest
import torch

from hippo.parallel.runtime import PEAK_BF16_FLOPS, detected_peak_flops, peak_flops_of


@pytest.mark.parametrize("name,flops", [
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H200", 989e12),
])
def test_the_datasheet_peaks_of_the_common_training_gpus(name, flops):
    assert peak_flops_of(name) == flops


@pytest.mark.parametrize("variant,family", [
    ("NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3"),  # a variant must not take its family's row
    ("NVIDIA H100 NVL", "NVIDIA H100 80GB HBM3"),
    ("NVIDIA H200 NVL", "NVIDIA H200"),
    ("NVIDIA L40", "NVIDIA L40S"),
    ("NVIDIA L4", "NVIDIA L40S"),
])
def test_a_variant_is_told_from_its_family(variant, family):
    assert 0 < peak_flops_of(variant) < peak_flops_of(family)


def test_names_that_contain_another_gpus_name_do_not_match_it():
    assert peak_flops_of("NVIDIA A10") != peak_flops_of("NVIDIA A100-SXM4-40GB")
    assert peak_flops_of("NVIDIA GH200 480GB") == peak_flops_of("NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize("name", ["Tesla V100-SXM2-32GB", "NVIDIA A10G", "NVIDIA GeForce GTX 1080", ""])
def test_an_unknown_device_has_no_peak_rather_than_a_guess(name):
    assert peak_flops_of(name) == 0.0


def test_every_row_is_reachable():
    """No row is shadowed by an earlier, broader pattern (which would make it dead)."""
    import re

    for i, (pattern, _) in enumerate(PEAK_BF16_FLOPS):
        example = re.sub(r"\\b|\.\*|\\", "", pattern).replace("PCIe", " PCIe")
        assert peak_flops_of(f"NVIDIA {example}") == PEAK_BF16_FLOPS[i][1], pattern


def test_detection_reads_the_cuda_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert detected_peak_flops() == peak_flops_of("NVIDIA H100 80GB HBM3")


def test_detection_without_a_gpu_is_zero_and_asks_cuda_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: pytest.fail("CUDA asked without a GPU"))
    assert detected_peak_flops() == 0.0
