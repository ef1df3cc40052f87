"""Several episodes through one inner loop, each with its own LoRA factors (hardware.episode_batch).

Adapting episodes one at a time runs the whole decoder once per episode and inner step, on a
few hundred tokens: small matrix products, and per-layer overheads paid once per episode. Here
the episodes' factors sit side by side in one tensor per LoRA layer: A as [episodes * r, in]
(episode e owns rows e*r .. e*r+r-1) and B as [out, episodes * r]. One forward takes every
episode's inputs; a hook on each LoRA A layer zeroes, for every token, the rank columns of the
other episodes, so a token sees only its own episode's factors:

    delta(x_t) = B_all (mask_t * (A_all x_t)) = B_e(t) A_e(t) x_t.

The frozen base weights then multiply every episode's tokens in one product, and the summed
support losses give each episode's factors exactly the gradient of its own loss (no other loss
reads them); SGD and Adam updates act per element, so every episode follows its own trajectory.
Results equal one-at-a-time adaptation up to floating-point summation order (tests/test_batched.py).

Where the layout of tokens is not known, or a forward would be replayed outside this context
(activation checkpointing, checkpointed inner steps), algorithms adapt one episode at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from metarun.algo.adapted import is_lora
from metarun.errors import MetarunError

LORA_DIM = {"lora_A": 0, "lora_B": 1}  # the rank dimension of each factor's weight


def _rank_dim(name: str) -> int | None:
    """The rank dimension of LoRA factor `name`'s weight; None if `name` is not one."""
    found = [dim for key, dim in LORA_DIM.items() if f".{key}." in name]
    return found[0] if len(found) == 1 and name.endswith(".weight") else None


def is_factor(name: str) -> bool:
    """Whether `name` is the weight of one LoRA factor (A or B)."""
    return _rank_dim(name) is not None


def rank_dim(name: str) -> int:
    """The dimension of LoRA factor `name`'s weight that holds its rank."""
    dim = _rank_dim(name)
    if dim is None:
        raise MetarunError(f"{name}: not a LoRA factor's weight; episodes cannot be batched")
    return dim


def side_by_side(
    params: dict[str, torch.Tensor], n: int, track: bool = True
) -> dict[str, torch.Tensor]:
    """`n` copies of each LoRA factor, concatenated along its rank dimension: the starting point
    of `n` episodes. Tracked (`track`), the copies stay functions of the originals, so an outer
    gradient sums the episodes' gradients as one-at-a-time adaptation of a meta-batch does;
    otherwise they are fresh leaves, as evaluation's inner loop starts from."""
    out = {k: torch.cat([v] * n, dim=rank_dim(k)) for k, v in params.items()}
    return out if track else {k: v.detach().requires_grad_() for k, v in out.items()}


def episode_slice(params: dict[str, torch.Tensor], n: int, e: int) -> dict[str, torch.Tensor]:
    """Episode `e`'s own factors out of `n` side by side (the weights one-at-a-time adaptation
    would hold)."""
    out = {}
    for name, value in params.items():
        dim = rank_dim(name)
        r = value.shape[dim] // n
        out[name] = value.narrow(dim, e * r, r)
    return out


def batchable(model: nn.Module, names: list[str]) -> bool:
    """Whether the adapted tensors are exactly the model's LoRA factors (each a Linear's):
    then every LoRA layer can carry one factor per episode."""
    lora = {n for n, _ in model.named_parameters() if is_lora(n)}
    if not names or set(names) != lora or not all(map(is_factor, names)):
        return False
    return all(
        isinstance(model.get_submodule(n.removesuffix(".weight")), nn.Linear)
        for n in names if ".lora_A." in n
    )  # fmt: skip


def lora_a_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LoRA A projections of `model` (peft keeps them in a `lora_A` dict per layer)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".lora_A." in f"{n}."]  # fmt: skip


@contextlib.contextmanager
def token_episodes(model: nn.Module, episode: torch.Tensor, n: int) -> Iterator[None]:
    """Within the block, each LoRA A output keeps only the rank columns of its token's episode.

    `episode`: [rows, width] long, the episode of every token slot of the forward's input
    (-1: padding, which then gets no LoRA term; its outputs are never read).
    """
    masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # the same for every LoRA layer

    def mask(columns: int, dtype: torch.dtype) -> torch.Tensor:
        if columns % n:
            raise MetarunError(f"a LoRA layer has {columns} rank columns for {n} episodes")
        if (columns, dtype) not in masks:
            owner = torch.arange(columns, device=episode.device) // (columns // n)
            masks[columns, dtype] = (episode[..., None] == owner).to(dtype)
        return masks[columns, dtype]

    def hook(name: str):
        def keep_own(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if out.shape[:-1] != episode.shape:
                raise MetarunError(
                    f"{name} sees inputs of shape {tuple(out.shape[:-1])}, not the token layout "
                    f"{tuple(episode.shape)} of the batched episodes: LoRA on this layer cannot "
                    "be batched; set hardware.episode_batch=1"
                )
            return out * mask(out.shape[-1], out.dtype)

        return keep_own

    handles = [m.register_forward_hook(hook(name)) for name, m in lora_a_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
