"""Meta-Attention: a mixed prefill/decode/verify batch as a few fixed-shape tile classes.

``plan`` cuts a step's batch into tiles once per step, host side (``tiles`` defines them, ``short`` and
``long`` cut the two classes); a backend runs them in every layer: ``torch_backend`` (any device, the CPU's
path), ``triton_backend`` (CUDA) and ``npu_backend`` (Ascend, torch_npu).
"""

from .plan import plan_meta_attention
from .short import advance_decode_plan
from .tiles import (
                    CAUSAL,
                    DEFAULT_FLOAT32_SHORT_TILES,
                    DEFAULT_GROUP_COST_SCORES,
                    NO_MASK,
                    TREE,
                    AttnRequest,
                    LongGroup,
                    MetaAttentionPlan,
                    ShortTiles,
)
from .torch_backend import run_meta_attention_torch

__all__ = ["CAUSAL", "DEFAULT_FLOAT32_SHORT_TILES", "DEFAULT_GROUP_COST_SCORES", "NO_MASK", "TREE", "AttnRequest",
           "LongGroup", "MetaAttentionPlan", "ShortTiles", "advance_decode_plan", "plan_meta_attention",
           "run_meta_attention_torch"]
