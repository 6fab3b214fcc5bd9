"""Hippo's parallel training: layouts, process groups, the DeepSpeed engine over Megatron layers."""

import warnings

# megatron-core warns on import, once per module, that it falls back to torch's optimizers and its
# own multi-tensor helpers without Transformer Engine or Apex. Hippo uses neither path (DeepSpeed
# steps the optimizer), so the three lines on every command say nothing to act on.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
