"""`hippo train` with `model.document_isolation=true`: the trainer takes the EOS id from the data,
the checkpoint and the export record the setting, a stopped run resumes bitwise, and changing the
setting on resume is refused like any change of what the weights mean. The runs also leave the EOS
positions out of the loss (`train.eod_mask_loss`, which needs the EOS id too): the resumed run covers
it, and a short run without it shows it changes the losses.

The data are the byte tokenizer's documents of `train_data` (5-60 words each, so 32-token windows
hold boundaries). The H3 hybrid needs the layers' half of issue 25; it is skipped until then.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from hippo.data_pipeline.tokenizer import ByteTokenizer
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.h3 import H3
from tests.helpers import DROPOUT, STEPS, hippo_train, losses

pytestmark = pytest.mark.slow

ISOLATION = "model.document_isolation=true"
EOD_MASK = "train.eod_mask_loss=true"
MODELS = {
    "attention": ["model.mixer=attention", "model.attn_layer_idx=[]"],
    "hybrid": [],  # the test config's H3 hybrid (attention at layer 1)
}


def model_params() -> list:
    h3_ready = "doc_start" in inspect.signature(H3.forward).parameters
    return [pytest.param(name, marks=[] if name != "hybrid" or h3_ready else [pytest.mark.skip(
        reason="H3.forward has no doc_start yet (issue 25's layer half)")]) for name in MODELS]


@pytest.fixture(scope="module", params=model_params())
def runs(request, train_data, tmp_path_factory) -> dict:
    """An uninterrupted isolated run, the same run stopped at step 12 and resumed, and the same
    model without isolation; all with dropout (so the RNG streams are part of the bitwise claim) and
    the EOS positions left out of the loss. And the first 4 steps of the isolated run with every
    position in the loss."""
    name = request.param
    root = tmp_path_factory.mktemp(f"isolation_{name}")
    model = [*MODELS[name], EOD_MASK]
    hippo_train(root / "whole", train_data, DROPOUT, ISOLATION, *model)
    hippo_train(root / "stopped", train_data, DROPOUT, ISOLATION, *model, "train.exit_interval=12")
    stopped = losses(root / "stopped")
    hippo_train(root / "stopped", train_data, DROPOUT, ISOLATION, *model)
    hippo_train(root / "plain", train_data, DROPOUT, *model)
    hippo_train(root / "unmasked", train_data, DROPOUT, ISOLATION, *MODELS[name], "train.exit_interval=4")
    return {"root": root, "model": model, "stopped_at": max(stopped), "data": train_data}


def test_an_isolated_run_resumes_bitwise_and_differs_from_a_plain_one(runs):
    root = runs["root"]
    whole, resumed, plain = (losses(root / n) for n in ("whole", "stopped", "plain"))
    assert runs["stopped_at"] == 12 and sorted(whole) == list(range(1, STEPS + 1))
    assert resumed == whole  # bitwise: CPU, fp32
    assert any(whole[s] != plain[s] for s in whole)  # isolation changes what is trained


def test_leaving_the_eos_positions_out_of_the_loss_changes_every_logged_loss(runs):
    whole, unmasked = losses(runs["root"] / "whole"), losses(runs["root"] / "unmasked")
    assert sorted(unmasked) == [1, 2, 3, 4]
    assert all(whole[s] != unmasked[s] for s in unmasked), (whole, unmasked)


def test_the_checkpoint_and_the_export_record_isolation_and_the_eos_id(runs):
    root = runs["root"]
    eos = ByteTokenizer().eos_id
    saved = json.loads((root / "whole" / "checkpoints" / f"global_step{STEPS}" / "hippo" / "state.json").read_text())
    assert saved["config"]["model"]["document_isolation"] is True and saved["config"]["model"]["eos_id"] == eos
    assert saved["config"]["train"]["eod_mask_loss"] is True
    # Without isolation the loss mask reads the data's EOS id but leaves the model config as it was.
    plain = json.loads((root / "plain" / "checkpoints" / f"global_step{STEPS}" / "hippo" / "state.json").read_text())
    assert plain["config"]["train"]["eod_mask_loss"] is True and plain["config"]["model"]["eos_id"] is None
    model = HippoLM.from_pretrained(root / "whole" / "export")
    assert model.cfg.document_isolation and model.cfg.eos_id == eos
    # The export isolates on its own: a document after another gets the logits it gets alone.
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        packed = model(torch.cat([a, torch.tensor([[eos]]), b], 1))[:, 10:]
        alone = model(b)
    assert (packed - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_changing_isolation_on_resume_is_refused(runs):
    root, data, model = runs["root"], runs["data"], runs["model"]
    off = hippo_train(root / "whole", data, DROPOUT, *model, "train.steps=26", "--allow-config-change", check=False)
    assert off.returncode == 2 and "model.document_isolation: True -> False" in off.stderr, off.stderr[-2000:]
    on = hippo_train(root / "plain", data, DROPOUT, ISOLATION, *model, "train.steps=26", "--allow-config-change",
                     check=False)
    assert on.returncode == 2 and "model.document_isolation: False -> True" in on.stderr, on.stderr[-2000:]
    assert "Traceback" not in off.stderr + on.stderr
