"""Padding-free encoder batches: several texts share one row, each attending only to itself.

A padded batch of an episode's texts is mostly padding when lengths vary (about 40% of an
ICD-10 episode's tokens), and every linear layer pays for it. Packed rows hold whole texts end to
end; a block-diagonal attention mask keeps texts apart and position ids restart at each text, so
each text's hidden states equal its padded ones (up to float rounding) at a fraction of the
FLOPs, with matmuls as large as the padded batch's rather than split into small groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Architectures whose embeddings take explicit `position_ids` and whose attention takes a
# prepared 4D mask, with the position id of each text's first token ("pad": padding_idx + 1,
# RoBERTa's convention). Decoders get a causal block-diagonal mask. Others forward padded batches.
FIRST_POSITION = {"bert": 0, "distilbert": 0, "electra": 0, "roberta": "pad",
                  "xlm-roberta": "pad", "camembert": "pad", "llama": 0, "qwen2": 0, "qwen3": 0,
                  "mistral": 0, "gpt2": 0}  # fmt: skip
PACKABLE = tuple(FIRST_POSITION)
MASKS = ("sdpa", "eager")  # attention implementations that read a dense 4D mask


def first_position(model: nn.Module) -> int | None:
    """The position id each packed text starts from, or None when `model` cannot be packed."""
    config = model.config
    start = FIRST_POSITION.get(config.model_type)
    if start is None or getattr(config, "_attn_implementation", None) not in MASKS:
        return None
    if start == "pad":
        return int(config.pad_token_id) + 1
    return start


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: text indices per row, each row's lengths summing to <= capacity."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


@dataclass
class Packed:
    """Model inputs of packed rows, and where each text's tokens landed in the flattened rows."""

    inputs: dict[str, torch.Tensor]  # input_ids, position_ids [rows, width]; 4D attention_mask
    token_text: torch.Tensor  # [tokens] the text each real token belongs to
    token_slot: torch.Tensor  # [tokens] its position in the flattened rows
    first_slot: torch.Tensor  # [texts] the slot of each text's first token
    lengths: torch.Tensor  # [texts]

    def pool(self, hidden: torch.Tensor, pooling: str) -> torch.Tensor:
        """[texts, dim] mean over each text's tokens, or its first ("cls") or last token."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if pooling == "cls":
            return flat[self.first_slot]
        if pooling == "last":
            return flat[self.first_slot + self.lengths - 1]
        sums = flat.new_zeros(len(self.lengths), flat.shape[-1])
        sums = sums.index_add(0, self.token_text, flat[self.token_slot])
        return sums / self.lengths.unsqueeze(-1).to(flat.dtype)


def attention_mask(allowed: torch.Tensor, additive_dtype=None) -> torch.Tensor:
    """A prepared 4D mask from a boolean one (True attends): as is for SDPA, or additive floats
    (0 / the dtype's minimum) for eager attention when `additive_dtype` is given."""
    if additive_dtype is None:
        return allowed
    blocked = torch.finfo(additive_dtype).min
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device).masked_fill(
        ~allowed, blocked
    )


def pack(
    tokens: torch.Tensor, lengths: torch.Tensor, pad_id: int, start: int, additive_dtype=None,
    causal: bool = False,
) -> Packed:  # fmt: skip
    """Pack texts (`tokens` [texts, >= max length], padded with anything) into rows as wide
    as the longest text. `additive_dtype` gives an additive float mask (eager attention) instead
    of a boolean one (SDPA: True attends); `causal`: each token sees only earlier ones."""
    device = tokens.device
    sizes = lengths.tolist()
    width = max(sizes)
    rows = pack_rows(sizes, width)
    row_of, offset = [0] * len(sizes), [0] * len(sizes)
    for r, members in enumerate(rows):
        used = 0
        for i in members:
            row_of[i], offset[i] = r, used
            used += sizes[i]
    first_slot = torch.tensor(row_of, device=device) * width + torch.tensor(offset, device=device)
    real = torch.arange(tokens.shape[1], device=device)[None, :] < lengths[:, None]
    token_text, within = real.nonzero(as_tuple=True)  # text by text, positions ascending
    token_slot = first_slot[token_text] + within
    slots = len(rows) * width
    input_ids = torch.full((slots,), pad_id, dtype=tokens.dtype, device=device)
    input_ids[token_slot] = tokens[token_text, within]
    position_ids = torch.zeros(slots, dtype=torch.long, device=device)
    position_ids[token_slot] = within + start
    segment = torch.full((slots,), -1, dtype=torch.long, device=device)  # padding: its own
    segment[token_slot] = token_text
    segment = segment.view(len(rows), width)
    mask = segment[:, :, None] == segment[:, None, :]
    if causal:
        mask &= torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = attention_mask(mask.unsqueeze(1), additive_dtype)
    shape = (len(rows), width)
    inputs = {"input_ids": input_ids.view(shape), "position_ids": position_ids.view(shape),
              "attention_mask": mask}  # fmt: skip
    return Packed(inputs, token_text, token_slot, first_slot, lengths)
