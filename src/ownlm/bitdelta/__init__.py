"""BitDelta: a fine-tune as 1-bit signs + scales (arXiv 2402.10193), in two modes on one engine.

Read in this order: pack (bits) -> quant (signs + scales of one matrix) -> delta (the in-memory delta) ->
lora1 / dense (compress) -> distill (train the scales) -> format (files) -> apply (merge into a base).
"""

from ownlm.bitdelta.apply import apply, check_fits, unapply, weight_deltas
from ownlm.bitdelta.config import CompressConfig, DistillConfig
from ownlm.bitdelta.delta import Delta
from ownlm.bitdelta.dense import compress_dense
from ownlm.bitdelta.distill import DistillReport, distill
from ownlm.bitdelta.format import load_delta, read_metadata, save_delta
from ownlm.bitdelta.lora1 import LoraAdapter, compress_lora, read_adapter

__all__ = [
    "CompressConfig", "Delta", "DistillConfig", "DistillReport", "LoraAdapter", "apply", "check_fits",
    "compress_dense", "compress_lora", "distill", "load_delta", "read_adapter", "read_metadata", "save_delta",
    "unapply", "weight_deltas",
]
