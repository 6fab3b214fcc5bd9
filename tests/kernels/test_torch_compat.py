"""Each private PyTorch name Hippo uses (`kernels.torch_compat`) still exists and still means what
Hippo relies on; and no module of the package reaches past `torch_compat` for one. A torch upgrade
that moves one fails here, naming it, instead of deep inside a training run."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
import torch.nn as nn

from hippo.kernels import torch_compat

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("kernels", "pretrain", "parallel", "data_pipeline", "launch")


def test_fft_r2c_and_c2c_are_the_normalizations_the_fft_backwards_use():
    x = torch.randn(3, 20, dtype=torch.float64)
    assert torch.allclose(torch_compat.fft_r2c(x), torch.fft.rfft(x, norm="forward"))
    z = torch.randn(3, 11, dtype=torch.complex128)
    assert torch.allclose(torch_compat.fft_c2c(z), torch.fft.ifft(z, norm="forward"))


def test_eager_view_dispatch_resolves_a_conjugate_view_where_the_key_is_excluded():
    keys = torch._C.DispatchKey
    assert hasattr(torch._C, "_ForceDispatchKeyGuard") and hasattr(torch._C, "_dispatch_tls_local_include_set")
    z = torch.tensor([1.0 + 2.0j], dtype=torch.complex128)
    exclude = torch._C._dispatch_tls_local_exclude_set().add(keys.Conjugate)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        with torch_compat.eager_view_dispatch():
            got = torch.view_as_real(2 * z.conj())
    assert torch.equal(got, torch.tensor([[2.0, -4.0]], dtype=torch.float64))
    with torch_compat.eager_view_dispatch():  # eager: nothing to change
        assert torch.equal(torch.view_as_real(2 * z.conj()), got)


def test_undo_module_compile_returns_a_compiled_module_to_eager_calls():
    m = nn.Linear(3, 2)
    m.compile(backend="eager")
    assert m._compiled_call_impl is not None  # what nn.Module.compile() sets
    torch_compat.undo_module_compile(m)
    assert m._compiled_call_impl is None
    x = torch.randn(4, 3)
    assert torch.equal(m(x), nn.functional.linear(x, m.weight, m.bias))


def test_raise_recompile_limit_only_raises():
    import torch._dynamo.config as config

    before = config.recompile_limit
    assert isinstance(before, int)
    try:
        torch_compat.raise_recompile_limit(before + 7)
        assert config.recompile_limit == before + 7
        torch_compat.raise_recompile_limit(1)
        assert config.recompile_limit == before + 7
    finally:
        config.recompile_limit = before


@pytest.mark.timeout(120)
def test_dynamo_counts_see_a_graph_and_a_break():
    graphs0, breaks0 = torch_compat.dynamo_counts()

    def f(x):
        y = x * 2
        print("", end="")  # a graph break
        return y + 1

    torch.compile(f, backend="eager")(torch.randn(3))
    graphs, breaks = torch_compat.dynamo_counts()
    assert graphs >= graphs0 + 2 and breaks >= breaks0 + 1


def test_no_module_of_the_package_uses_private_torch_names_elsewhere():
    pattern = re.compile(r"torch\._|\._compiled_call_impl\b|torch\.ops\.aten\._")
    offenders = []
    for top in PACKAGE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name == "torch_compat.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line.split("#", 1)[0]):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "private torch names outside kernels/torch_compat.py:\n" + "\n".join(offenders)
