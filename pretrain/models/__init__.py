"""Hippo's models: H3, S4D and attention mixers in a pre-norm language model."""

from pretrain.models.attention import CausalSelfAttention
from pretrain.models.block import Block
from pretrain.models.h3 import H3
from pretrain.models.inference import InferenceParams
from pretrain.models.linear import SINGLE_PROCESS, Linears
from pretrain.models.embedding import TokenEmbedding
from pretrain.models.init import init_parameters
from pretrain.models.lm import HippoLM, count_parameters
from pretrain.models.mlp import MLP
from pretrain.models.s4d import S4D

__all__ = [
    "Block",
    "CausalSelfAttention",
    "H3",
    "HippoLM",
    "InferenceParams",
    "Linears",
    "MLP",
    "S4D",
    "TokenEmbedding",
    "SINGLE_PROCESS",
    "count_parameters",
    "init_parameters",
]
