"""The authors' released H3 checkpoints in Hippo, and Hippo models back in their layout.

Checkpoints are built here from random weights under the authors' keys (h3-checkpoints.md), in each
form they published. `reference_logits` is a float64 forward of the authors' model written from
their own parameterization (HazyResearch/H3 `h3.py`, `ss_kernel_shift.py`, `ss_kernel_diag.py`;
flash-attention's MHA/Block): direct sums and Toeplitz products, no Hippo code. An import is right
when the imported HippoLM's float32 logits agree with it. Every weight is random (the shift SSM's B
too, not its e1 init; the diagonal SSM's B complex, not 1), so no term of the mapping hides behind
an initial value.
"""

from __future__ import annotations

import math

import pytest
import torch

from hippo.pretrain.cli import main
from hippo.pretrain.config import ConfigError, load_config
from hippo.pretrain.h3_checkpoint import import_h3
from hippo.pretrain.models import HippoLM, ModelConfig

N = 64  # d_state of every released model
ROWS = 264  # the byte tokenizer's 257 tokens padded to a multiple of 8
TOL = 1e-5  # float32 import vs float64 reference, relative to the largest logit (~10 here)
EMB = "backbone.embeddings.word_embeddings.weight"


# ------------------------------------------------------------------- checkpoints, authors' layout
def _h3_mixer(d: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    m = {}
    for name in ("q_proj", "k_proj", "v_proj", "output_linear"):
        m[f"{name}.weight"], m[f"{name}.bias"] = rand(d, d, scale=d**-0.5), rand(d, scale=0.1)
    m["ssm_k_kernel.kernel.B"] = rand(d, N, scale=N**-0.5)
    m["ssm_k_kernel.kernel.C"] = rand(1, d, N, scale=N**-0.5)
    m["ssm_k_D"] = rand(d)
    m["kernel.kernel.log_dt"] = torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
    m["kernel.kernel.inv_A_real"] = math.log(0.5) + rand(d, N // 2, scale=0.5)
    m["kernel.kernel.A_imag"] = math.pi * torch.arange(N // 2).float() + rand(d, N // 2, scale=0.1)
    m["kernel.kernel.B"] = rand(d, N // 2, 2)
    m["kernel.kernel.C"] = rand(1, d, N // 2, 2, scale=0.5**0.5)
    m["D"] = rand(d)
    return m


def _attention(d: int, g: torch.Generator, rotary_dim: int | None) -> dict[str, torch.Tensor]:
    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    m = {"Wqkv.weight": rand(3 * d, d, scale=d**-0.5), "Wqkv.bias": rand(3 * d, scale=0.1),
         "out_proj.weight": rand(d, d, scale=d**-0.5), "out_proj.bias": rand(d, scale=0.1)}
    if rotary_dim:  # flash-attention's RotaryEmbedding buffer, base 10000
        m["rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    return m


def _norm(d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm unlike every other: a LayerNorm in the wrong slot changes the logits."""
    return 1 + 0.3 * torch.randn(d, generator=g), 0.3 * torch.randn(d, generator=g)


def authors_state_dict(d: int = 24, n_layer: int = 3, attn: tuple[int, ...] = (1,), *, rotary_dim: int | None = None,
                       seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """What `SSMLMHeadModel.state_dict()` holds (current layout), random weights."""
    g = torch.Generator().manual_seed(seed)
    sd = {EMB: torch.randn(ROWS, d, generator=g) * 0.5}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        mixer = _attention(d, g, rotary_dim) if i in attn else _h3_mixer(d, g)
        sd.update({f"{p}mixer.{k}": v for k, v in mixer.items()})
        for norm in ("norm1", "norm2"):
            sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"] = _norm(d, g)
        for fc, (rows, cols) in (("fc1", (4 * d, d)), ("fc2", (d, 4 * d))):
            sd[f"{p}mlp.{fc}.weight"] = torch.randn(rows, cols, generator=g) * cols**-0.5
            sd[f"{p}mlp.{fc}.bias"] = torch.randn(rows, generator=g) * 0.1
    sd["backbone.ln_f.weight"], sd["backbone.ln_f.bias"] = _norm(d, g)
    sd = {k: v if k.endswith("inv_freq") else v.to(dtype) for k, v in sd.items()}  # a float32 buffer
    sd["lm_head.weight"] = sd[EMB]  # tied: the same tensor under both names
    return sd


def old_layout(sd: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """The older naming of the same model (h3-checkpoints.md): prefixes `s4seq.encoder.` and
    `embedding.`, and the LayerNorms one slot earlier (old block order mixer -> add -> LN)."""
    slots = ["s4seq.encoder.norm"] + [f"s4seq.encoder.layers.{i}.norm{j}" for i in range(n_layer) for j in (1, 2)]
    current = [f"backbone.layers.{i}.norm{j}" for i in range(n_layer) for j in (1, 2)] + ["backbone.ln_f"]
    old = {}
    for key, value in sd.items():
        if key == "lm_head.weight" or any(key.startswith(c + ".") for c in current):
            continue
        old["embedding.weight" if key == EMB else key.replace("backbone.", "s4seq.encoder.", 1)] = value
    for slot, norm in zip(slots, current):
        old[f"{slot}.weight"], old[f"{slot}.bias"] = sd[f"{norm}.weight"], sd[f"{norm}.bias"]
    return old


def lightning(sd: dict[str, torch.Tensor]) -> dict:
    return {"pytorch-lightning_version": "1.8.6", "epoch": 3, "global_step": 1200,
            "state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "train_metrics.count": torch.tensor(5.0)}}


# ------------------------------------------------------------------ the authors' model, float64
def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _causal_conv(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """y[b, t, c] = sum_{j <= t} taps[c, t - j] x[b, j, c], as a Toeplitz product. x (B, L, d), taps (d, L)."""
    L = x.shape[1]
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]  # t - j
    toeplitz = torch.where(lag >= 0, taps[:, lag.clamp(min=0)], torch.zeros(()))  # (d, L, L)
    return torch.einsum("ctj,bjc->btc", toeplitz, x)


def _ref_h3(u: torch.Tensor, m: dict[str, torch.Tensor]) -> torch.Tensor:
    L, d = u.shape[1], u.shape[2]
    q, k, v = (u @ m[f"{n}.weight"].T + m[f"{n}.bias"] for n in ("q_proj", "k_proj", "v_proj"))
    # Shift SSM: the filter is the cross-correlation of C with B, N taps.
    Bs, Cs = m["ssm_k_kernel.kernel.B"], m["ssm_k_kernel.kernel.C"][0]
    shift = torch.zeros(d, L, dtype=u.dtype)
    for lag in range(min(L, N)):
        shift[:, lag] = (Bs[:, : N - lag] * Cs[:, lag:]).sum(-1)
    k = _causal_conv(k, shift) + m["ssm_k_D"] * k
    # Diagonal SSM, bilinear: K[l] = 2 Re sum_n C_n B_n dt / (1 - dt A_n / 2) dA_n^l.
    dt = torch.exp(m["kernel.kernel.log_dt"])[:, None]
    A = torch.complex(-torch.exp(m["kernel.kernel.inv_A_real"]), m["kernel.kernel.A_imag"])
    B = torch.complex(m["kernel.kernel.B"][..., 0], m["kernel.kernel.B"][..., 1])
    C = torch.complex(m["kernel.kernel.C"][0, ..., 0], m["kernel.kernel.C"][0, ..., 1])
    dA = (1 + dt * A / 2) / (1 - dt * A / 2)
    weight = C * B * dt / (1 - dt * A / 2)
    powers = dA[..., None] ** torch.arange(L, dtype=torch.float64)  # (d, N/2, L)
    diag = 2 * (weight[..., None] * powers).sum(1).real
    kv = k * v
    s = _causal_conv(kv, diag) + m["D"] * kv
    return (q * s) @ m["output_linear.weight"].T + m["output_linear.bias"]


def _ref_attention(u: torch.Tensor, m: dict[str, torch.Tensor], n_head: int) -> torch.Tensor:
    Bsz, L, d = u.shape
    hd = d // n_head
    qkv = (u @ m["Wqkv.weight"].T + m["Wqkv.bias"]).view(Bsz, L, 3, n_head, hd)  # packed (three, heads, head_dim)
    q, k, v = qkv.unbind(2)  # (B, L, H, hd)
    if "rotary_emb.inv_freq" in m:  # rotary on the first r dims: dim j pairs with j + r/2
        half = m["rotary_emb.inv_freq"].numel()
        angle = torch.arange(L, dtype=torch.float64)[:, None] * m["rotary_emb.inv_freq"].double()[None]
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (L, 1, r/2)

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
            return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest), dim=-1)

        q, k = rotate(q), rotate(k)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(Bsz, L, d)
    return y @ m["out_proj.weight"].T + m["out_proj.bias"]


def _reference(sd: dict[str, torch.Tensor], ids: torch.Tensor, n_head: int, layers: str, norms: list[str],
               embedding: str) -> torch.Tensor:
    """Embedding, then per layer: x += mixer(norm(x)), x += mlp(norm(x)), the norms taken in the
    order of `norms` (the last one final), then the tied head."""
    sd = {k: v.double() for k, v in sd.items()}
    n_layer = (len(norms) - 1) // 2
    x = sd[embedding][ids]
    for i in range(n_layer):
        p = f"{layers}{i}."
        m = {k[len(p) + 6 :]: v for k, v in sd.items() if k.startswith(p + "mixer.")}
        h = _layer_norm(x, sd[norms[2 * i] + ".weight"], sd[norms[2 * i] + ".bias"])
        x = x + (_ref_attention(h, m, n_head) if "Wqkv.weight" in m else _ref_h3(h, m))
        h = _layer_norm(x, sd[norms[2 * i + 1] + ".weight"], sd[norms[2 * i + 1] + ".bias"])
        x = x + _gelu_tanh(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T \
            + sd[p + "mlp.fc2.bias"]
    x = _layer_norm(x, sd[norms[-1] + ".weight"], sd[norms[-1] + ".bias"])
    return x @ sd[embedding].T


def reference_logits(sd: dict[str, torch.Tensor], ids: torch.Tensor, n_head: int, n_layer: int) -> torch.Tensor:
    """Current layout: layers.i.norm1 before the mixer, norm2 before the MLP, ln_f last."""
    norms = [f"backbone.layers.{i}.norm{j}" for i in range(n_layer) for j in (1, 2)] + ["backbone.ln_f"]
    return _reference(sd, ids, n_head, "backbone.layers.", norms, EMB)


def reference_logits_old(sd: dict[str, torch.Tensor], ids: torch.Tensor, n_head: int, n_layer: int) -> torch.Tensor:
    """Older layout, read in its own block order (mixer/MLP -> add -> LN): `norm` right after the
    embedding, each layer's norm1 after its mixer, its norm2 after its MLP."""
    norms = ["s4seq.encoder.norm"] + [f"s4seq.encoder.layers.{i}.norm{j}" for i in range(n_layer) for j in (1, 2)]
    return _reference(sd, ids, n_head, "s4seq.encoder.layers.", norms, "embedding.weight")


# ------------------------------------------------------------------------------------- helpers
def _ids(L: int = 80, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 257, (batch, L), generator=torch.Generator().manual_seed(7))


def _imported_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return HippoLM.from_pretrained(folder)(ids).double()


def _err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest expected logit."""
    return ((got - expected).abs().max() / expected.abs().max()).item()


VARIANTS = {  # name: (d_model, n_layer, attention layers, heads, rotary dims, file form)
    "plain": (24, 3, (1,), 3, None, "plain"),
    "lightning": (16, 2, (0,), 2, None, "lightning"),
    "old_layout": (24, 4, (2,), 4, None, "old"),
    "rotary": (32, 3, (1,), 2, 8, "plain"),  # head_dim 16, rotary on 8: the 2.7B model's 64 of 128
}


def _write(tmp_path, name: str) -> tuple:
    d, n_layer, attn, heads, rotary, form = VARIANTS[name]
    sd = authors_state_dict(d, n_layer, attn, rotary_dim=rotary)
    obj = {"plain": sd, "lightning": lightning(sd), "old": old_layout(sd, n_layer)}[form]
    path = tmp_path / f"{name}.pt"
    torch.save(obj, path)
    return path, sd, obj


# --------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(VARIANTS))
def test_imported_model_computes_the_authors_logits(tmp_path, name):
    """Each form of file -> export -> HippoLM gives the float64 reference's logits, at L=80 (longer
    than the 64 shift taps) and L=40 (shorter)."""
    d, n_layer, attn, heads, rotary, form = VARIANTS[name]
    path, sd, obj = _write(tmp_path, name)
    result = import_h3(path, tmp_path / "export", n_head=heads, tokenizer="byte")
    assert result.model.attn_layer_idx == list(attn) and result.model.n_layer == n_layer
    assert result.model.rotary_dim == rotary and result.model.padded_vocab_size == ROWS
    for L in (80, 40):
        ids = _ids(L)
        expected = reference_logits(sd, ids, heads, n_layer)
        if form == "old":  # the older file read in its own block order is the same model
            assert _err(reference_logits_old(obj, ids, heads, n_layer), expected) < 1e-10
        assert expected.abs().max() > 1.0  # logits of O(1) and more
        assert _err(_imported_logits(tmp_path / "export", ids), expected) < TOL


QKV, DIAG = "backbone.layers.1.mixer.Wqkv.weight", "backbone.layers.0.mixer.kernel.kernel."
MUTATIONS = {
    "Q and K blocks of Wqkv swapped": lambda sd, d: sd.update({
        QKV: sd[QKV][[*range(d, 2 * d), *range(d), *range(2 * d, 3 * d)]]}),
    "diagonal C conjugated": lambda sd, d: sd[DIAG + "C"][..., 1].neg_(),
    "diagonal B dropped (B = 1)": lambda sd, d: sd[DIAG + "B"].copy_(torch.tensor([1.0, 0.0])),
    "shift filter reversed (B and C swapped)": lambda sd, d: sd.update({
        "backbone.layers.2.mixer.ssm_k_kernel.kernel.B": sd["backbone.layers.2.mixer.ssm_k_kernel.kernel.C"][0],
        "backbone.layers.2.mixer.ssm_k_kernel.kernel.C": sd["backbone.layers.2.mixer.ssm_k_kernel.kernel.B"][None]}),
    "Re A doubled (another real_type than exp)": lambda sd, d: sd[DIAG + "inv_A_real"].add_(math.log(2)),
    "norm1 and norm2 of a layer swapped": lambda sd, d: sd.update({
        "backbone.layers.0.norm1.weight": sd["backbone.layers.0.norm2.weight"],
        "backbone.layers.0.norm2.weight": sd["backbone.layers.0.norm1.weight"]}),
    "rotary pairs interleaved": lambda sd, d: sd.update({QKV: sd[QKV][_interleave(d)]}),
}


def _interleave(d: int, heads: int = 2, rotary: int = 8) -> list[int]:
    """Row order of Wqkv that makes the halves pairing of a head's first `rotary` dims act as
    adjacent-pair (interleaved) rotary on the original rows, for Q and K."""
    hd, rows = d // heads, list(range(3 * d))
    order = [j for i in range(rotary // 2) for j in (i, i + rotary // 2)]
    for block in (0, 1):
        for h in range(heads):
            base = block * d + h * hd
            rows[base : base + rotary] = [base + order.index(j) for j in range(rotary)]
    return rows


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_comparison_sees_each_mapping_mistake(tmp_path, mutation):
    """Importing a file changed as a wrong mapping would change it (or the reference reading it
    so) misses the reference by far more than TOL: the logits test above can fail."""
    d, n_layer, heads = 32, 3, 2
    sd = authors_state_dict(d, n_layer, (1,), rotary_dim=8)
    mutated = {k: v.clone() for k, v in sd.items()}
    mutated["lm_head.weight"] = mutated[EMB]
    MUTATIONS[mutation](mutated, d)
    torch.save(mutated, tmp_path / "m.pt")
    import_h3(tmp_path / "m.pt", tmp_path / "export", n_head=heads, tokenizer="byte")
    ids = _ids()
    assert _err(_imported_logits(tmp_path / "export", ids), reference_logits(sd, ids, heads, n_layer)) > 100 * TOL


def _refusal(tmp_path, sd_or_obj, **kw) -> str:
    torch.save(sd_or_obj, tmp_path / "bad.pt")
    with pytest.raises(ConfigError) as e:
        import_h3(tmp_path / "bad.pt", tmp_path / "export", **{"n_head": 3, "tokenizer": "byte", **kw})
    assert not (tmp_path / "export").exists()
    return str(e.value)


def test_a_tensor_of_the_wrong_shape_is_refused_by_name(tmp_path):
    sd = authors_state_dict()
    sd["backbone.layers.2.mixer.kernel.kernel.A_imag"] = torch.zeros(24, 16)
    message = _refusal(tmp_path, sd)
    assert "backbone.layers.2.mixer.kernel.kernel.A_imag has shape (24, 16), expected (24, 32)" in message


def test_an_unknown_key_is_refused_by_name(tmp_path):
    sd = authors_state_dict()
    sd["backbone.layers.0.mixer.kernel.kernel.P"] = torch.zeros(1, 24, 32, 2)
    assert "unknown key backbone.layers.0.mixer.kernel.kernel.P" in _refusal(tmp_path, sd)


def test_a_missing_tensor_an_untied_head_and_a_foreign_rotary_base_are_refused(tmp_path):
    sd = authors_state_dict()
    del sd["backbone.layers.1.mixer.out_proj.bias"]
    assert "backbone.layers.1.mixer.out_proj.bias is missing" in _refusal(tmp_path, sd)
    sd = authors_state_dict()
    sd["lm_head.weight"] = sd[EMB] + 1e-3
    assert "Hippo ties the LM head" in _refusal(tmp_path, sd)
    sd = authors_state_dict(32, 3, (1,), rotary_dim=8)
    sd["backbone.layers.1.mixer.rotary_emb.inv_freq"] = 1.0 / 500 ** (torch.arange(0, 8, 2) / 8)
    assert "rotary base 10000" in _refusal(tmp_path, sd, n_head=2)


class Hyperparameters:  # what a Lightning checkpoint may pickle besides tensors (an OmegaConf config, say)
    lr = 6e-4


def test_python_objects_in_a_file_need_trust_and_a_non_checkpoint_is_named(tmp_path):
    obj = {**lightning(authors_state_dict()), "hyper_parameters": Hyperparameters()}
    assert "pass --trust-pickle" in _refusal(tmp_path, obj)
    result = import_h3(tmp_path / "bad.pt", tmp_path / "export", n_head=3, tokenizer="byte", trust_pickle=True)
    assert result.model.d_model == 24
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="text.pt: not a PyTorch checkpoint"):
        import_h3(tmp_path / "text.pt", tmp_path / "e2", n_head=3, tokenizer="byte")


def test_heads_and_tokenizer_must_be_given(tmp_path):
    message = _refusal(tmp_path, authors_state_dict(), n_head=None)
    assert "--n-head N or --config NAME" in message
    message = _refusal(tmp_path, authors_state_dict(), tokenizer=None)
    assert "GPT-2's tokenizer" in message and "tokenizer.json" in message


def test_a_config_gives_the_heads_and_must_match_every_size(tmp_path):
    """--config: heads and training settings from it; a size that differs from the file's is
    refused naming the field; attention placement comes from the file (noted)."""
    (tmp_path / "fits.yaml").write_text("model: {vocab_size: 257, d_model: 24, n_layer: 3, n_head: 3, "
                                        "attn_layer_idx: [2], dropout: 0.1}\n")
    (tmp_path / "wide.yaml").write_text("model: {vocab_size: 257, d_model: 32, n_layer: 3, n_head: 4}\n")
    torch.save(authors_state_dict(), tmp_path / "m.pt")
    result = import_h3(tmp_path / "m.pt", tmp_path / "export", config=str(tmp_path / "fits.yaml"), tokenizer="byte")
    assert (result.model.n_head, result.model.attn_layer_idx, result.model.dropout) == (3, [1], 0.1)
    assert any("attention layers [1] from the checkpoint" in n for n in result.notes)
    hint = next(n for n in result.notes if n.startswith("continue pretraining with: hippo train"))
    sets = [s for s in hint.split(" --set ")[1:] if not s.startswith("data.")]
    assert sets == ["model.attn_layer_idx=[1]"]  # what `--init-from` needs: the model sections equal
    assert load_config(tmp_path / "fits.yaml", sets).model == result.model
    with pytest.raises(ConfigError, match=r"model.d_model=32, but the checkpoint has 24"):
        import_h3(tmp_path / "m.pt", tmp_path / "e2", config=str(tmp_path / "wide.yaml"), tokenizer="byte")


def test_the_cli_imports_and_prints_one_error_line(tmp_path, capsys):
    torch.save(authors_state_dict(), tmp_path / "m.pt")
    assert main(["import", "h3", str(tmp_path / "m.pt"), "-o", str(tmp_path / "e"), "--n-head", "3",
                 "--tokenizer", "byte"]) == 0
    assert "attention at [1] (3 heads)" in capsys.readouterr().out
    assert main(["import", "h3", str(tmp_path / "m.pt"), "-o", str(tmp_path / "e2"), "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hippo: error: attention layers [1] need the number of heads") and "\n" not in err


@pytest.mark.parametrize("name,dtype", [("plain", torch.float32), ("plain", torch.float16),
                                        ("lightning", torch.float32), ("rotary", torch.float32),
                                        ("old_layout", torch.float32)])
def test_import_then_export_gives_back_the_authors_tensors_bit_for_bit(tmp_path, name, dtype):
    """`hippo import h3` then `hippo export --format h3`: the current layout of the file, every
    tensor equal in value and dtype, the head tied to the embedding as in their state dict."""
    d, n_layer, attn, heads, rotary, form = VARIANTS[name]
    sd = authors_state_dict(d, n_layer, attn, rotary_dim=rotary, dtype=dtype)
    torch.save({"plain": sd, "lightning": lightning(sd), "old": old_layout(sd, n_layer)}[form], tmp_path / "in.pt")
    assert main(["import", "h3", str(tmp_path / "in.pt"), "-o", str(tmp_path / "e"), "--n-head", str(heads),
                 "--tokenizer", "byte"]) == 0
    assert main(["export", str(tmp_path / "e"), "-o", str(tmp_path / "h3"), "--format", "h3"]) == 0
    back = torch.load(tmp_path / "h3" / "model.pt", weights_only=True)
    assert list(back) and set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert back["lm_head.weight"].data_ptr() == back[EMB].data_ptr()


def test_a_hippo_trained_model_exports_to_what_the_authors_model_computes(tmp_path):
    """A HippoLM of its own init (rotary on part of the head) -> their layout -> the float64
    reference of their model gives the HippoLM's logits; their model's arguments are written."""
    import json

    cfg = ModelConfig(vocab_size=257, d_model=32, n_layer=3, n_head=2, attn_layer_idx=[2],
                      position_embedding="rotary", rotary_dim=8)
    model = HippoLM(cfg, seed=5).eval()
    model.save_pretrained(tmp_path / "e", tokenizer="byte", step=9)
    assert main(["export", str(tmp_path / "e"), "-o", str(tmp_path / "h3"), "--format", "h3"]) == 0
    sd = torch.load(tmp_path / "h3" / "model.pt", weights_only=True)
    ids = _ids()
    with torch.no_grad():
        assert _err(model(ids).double(), reference_logits(sd, ids, 2, 3)) < TOL
    args = json.loads((tmp_path / "h3" / "h3_config.json").read_text())
    assert args["attn_layer_idx"] == [2] and args["attn_cfg"] == {"num_heads": 2, "rotary_emb_dim": 8}


def test_models_without_a_counterpart_are_not_exported(tmp_path, capsys):
    for extra in (dict(mixer="s4d"), dict(attn_layer_idx=[1], position_embedding="learned")):
        model = HippoLM(ModelConfig(vocab_size=257, d_model=16, n_layer=2, n_head=2, **extra))
        model.save_pretrained(tmp_path / "e", tokenizer="byte", step=0)
        assert main(["export", str(tmp_path / "e"), "-o", str(tmp_path / "h3"), "--format", "h3"]) == 2
        assert "has no counterpart in the authors' H3 layout" in capsys.readouterr().err


@pytest.mark.slow
def test_a_training_checkpoint_exports_to_the_authors_layout(train_data, tmp_path):
    """`hippo export RUN --format h3` reads the checkpoint (universal conversion), and gives the
    same tensors as the run's own export folder converted."""
    from hippo.pretrain.h3_checkpoint import to_h3_state_dict
    from hippo.pretrain.models.pretrained import load_weights, read_config
    from tests.helpers import hippo_train

    run = tmp_path / "run"
    hippo_train(run, train_data, "train.steps=2", "tracking.enabled=false")
    assert main(["export", str(run), "-o", str(tmp_path / "h3"), "--format", "h3"]) == 0
    got = torch.load(tmp_path / "h3" / "model.pt", weights_only=True)
    expected = to_h3_state_dict(load_weights(run / "export"), ModelConfig(**read_config(run / "export")["model"]))
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def released_geometry(d: int, n_layer: int, attn: tuple[int, ...], rotary_dim: int | None = None) -> dict:
    """The released files' keys and shapes (h3-checkpoints.md), as meta tensors: nothing allocated."""
    shapes = {EMB: (50264, d), "lm_head.weight": (50264, d), "backbone.ln_f.weight": (d,), "backbone.ln_f.bias": (d,)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        shapes.update({f"{p}{n}.{w}": (d,) for n in ("norm1", "norm2") for w in ("weight", "bias")})
        shapes.update({f"{p}mlp.fc1.weight": (4 * d, d), f"{p}mlp.fc1.bias": (4 * d,),
                       f"{p}mlp.fc2.weight": (d, 4 * d), f"{p}mlp.fc2.bias": (d,)})
        if i in attn:
            shapes.update({f"{p}mixer.Wqkv.weight": (3 * d, d), f"{p}mixer.Wqkv.bias": (3 * d,),
                           f"{p}mixer.out_proj.weight": (d, d), f"{p}mixer.out_proj.bias": (d,)})
            if rotary_dim:
                shapes[f"{p}mixer.rotary_emb.inv_freq"] = (rotary_dim // 2,)
            continue
        shapes.update({f"{p}mixer.{n}.{w}": (d, d) if w == "weight" else (d,)
                       for n in ("q_proj", "k_proj", "v_proj", "output_linear") for w in ("weight", "bias")})
        shapes.update({f"{p}mixer.ssm_k_kernel.kernel.B": (d, N), f"{p}mixer.ssm_k_kernel.kernel.C": (1, d, N),
                       f"{p}mixer.ssm_k_D": (d,), f"{p}mixer.kernel.kernel.log_dt": (d,),
                       f"{p}mixer.kernel.kernel.inv_A_real": (d, N // 2), f"{p}mixer.kernel.kernel.A_imag": (d, N // 2),
                       f"{p}mixer.kernel.kernel.B": (d, N // 2, 2), f"{p}mixer.kernel.kernel.C": (1, d, N // 2, 2),
                       f"{p}mixer.D": (d,)})
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("config,geometry,heads", [
    ("h3_125m", (768, 12, (6,)), 12), ("h3_355m", (1024, 24, (8, 16)), 16), ("hybrid_1.3b", (2048, 24, (8, 16)), 16),
    ("h3_2.7b", (2560, 32, (8, 16, 24)), 20), ("hybrid_2.7b", (2560, 32, (10, 21), 64), 20),
])
def test_the_released_geometries_fit_the_shipped_configs(config, geometry, heads):
    """At the released sizes (meta tensors): the shipped config of each size is accepted, its heads
    taken, attention placed as in the file, and Hippo's parameters are exactly the file's tensors
    (H3-125M: 126,387,456, the tied embedding once)."""
    from hippo.pretrain.h3_checkpoint import infer_model_config
    from hippo.pretrain.models import count_parameters

    sd = released_geometry(*geometry)
    cfg, _ = infer_model_config(sd, vocab_size=50257, base=load_config(config).model, base_name=config)
    assert (cfg.n_head, cfg.attn_layer_idx, cfg.padded_vocab_size) == (heads, list(geometry[2]), 50264)
    assert cfg.rotary_dim == (geometry[3] if len(geometry) > 3 else None)
    in_file = sum(t.numel() for k, t in sd.items() if k != "lm_head.weight" and not k.endswith("inv_freq"))
    assert count_parameters(cfg) == in_file
    if config == "h3_125m":
        assert in_file == 126_387_456
