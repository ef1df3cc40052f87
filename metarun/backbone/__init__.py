"""Backbones: a Hugging Face encoder, or a decoder read through its body and its LM head.

- table.py: the task's texts, tokenised once, and how forwards batch them (padding, length
  groups, packing: packing.py);
- encoder.py: the functional forward (adapted weights as `params`) and pooling;
- decoder.py: the decoder subclass (LM head, no special tokens);
- cache.py: unadapted embeddings computed once per block of episodes;
- bottom.py: the blocks below the adapted ones, run once per episode instead of every step;
- prompts.py: prompt formats, prompt trees and shared-prefix label scoring for decoders;
- weights.py, load.py: where weights come from, and building a backbone from its config.
"""

from metarun.backbone.bottom import transformer_layers
from metarun.backbone.decoder import Decoder
from metarun.backbone.encoder import Encoder, second_order_attention, upcast
from metarun.backbone.load import load_backbone, set_trainable

__all__ = [
    "Decoder", "Encoder", "load_backbone", "second_order_attention", "set_trainable",
    "transformer_layers", "upcast",
]  # fmt: skip
