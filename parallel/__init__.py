"""Hippo's parallel training: layouts, process groups, the DeepSpeed engine over Megatron layers."""

import logging
import warnings

# megatron-core announces on import, on every command, that it falls back to torch's optimizers and
# its own multi-tensor helpers without Transformer Engine or Apex (three warnings), and which FSDP it
# found (three INFO lines). Hippo uses none of these paths (DeepSpeed steps the optimizer; no FSDP):
# nothing in them to act on.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)
