"""Second-order MAML written the way a `higher` user writes it: the yardstick of scripts/bench.py.

What such a user does, step by step: wrap the Hugging Face encoder and a linear head in one
module; tokenise each episode's texts in the loop; open `higher.innerloop_ctx` over an SGD inner
optimizer on *all* parameters; take the inner steps with `diffopt.step(loss)`; backpropagate the
query loss into the initial weights. The one deviation from a naive script is the attention
kernel: PyTorch's fused kernels have no double backward, so second order runs under the math
kernel, the fix such users find for "derivative ... is not implemented".

It computes exactly the meta-gradient of `algo=maml algo.head_init=learned` (tests check the
losses agree), so the ratio of their speeds and memory is a ratio of implementations.
"""

from __future__ import annotations

from collections.abc import Sequence

import higher
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class EncoderClassifier(nn.Module):
    """A transformer encoder, mean pooling and a `way`-class linear head."""

    def __init__(self, model: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.head(pooled.to(self.head.weight.dtype))


class ReferenceMAML:
    """Meta-train `net` with second-order MAML through `higher`, one meta-batch per `step`."""

    def __init__(
        self, net: EncoderClassifier, tokenizer, max_length: int, inner_steps: int,
        inner_lr: float, outer_lr: float, grad_clip: float,
    ) -> None:  # fmt: skip
        self.net, self.tokenizer, self.max_length = net, tokenizer, max_length
        self.inner_steps, self.inner_lr, self.grad_clip = inner_steps, inner_lr, grad_clip
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.meta_opt = torch.optim.AdamW(self.params, lr=outer_lr)

    def batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        device = self.net.head.weight.device
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                             padding="longest", return_tensors="pt")  # fmt: skip
        return {"input_ids": enc["input_ids"].to(device),
                "attention_mask": enc["attention_mask"].to(device)}  # fmt: skip

    def episode_loss(self, support: tuple[list[str], torch.Tensor],
                     query: tuple[list[str], torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """The query loss after `inner_steps` differentiable SGD steps on the support set."""
        device = self.net.head.weight.device
        (s_texts, s_labels), (q_texts, q_labels) = support, query
        s_inputs, q_inputs = self.batch(s_texts), self.batch(q_texts)
        inner_opt = torch.optim.SGD(self.net.parameters(), lr=self.inner_lr)
        with (
            sdpa_kernel([SDPBackend.MATH]),
            higher.innerloop_ctx(self.net, inner_opt, copy_initial_weights=False) as (
                fnet,
                diffopt,
            ),
        ):
            for _ in range(self.inner_steps):
                diffopt.step(F.cross_entropy(fnet(**s_inputs), s_labels.to(device)))
            return F.cross_entropy(fnet(**q_inputs), q_labels.to(device))

    def step(self, episodes: Sequence[tuple]) -> float:
        """One outer step: mean query loss over the meta-batch, clipped AdamW update."""
        self.meta_opt.zero_grad(set_to_none=True)
        total = 0.0
        for support, query in episodes:
            loss = self.episode_loss(support, query) / len(episodes)
            loss.backward()  # one episode's graph at a time, as the usual loop does
            total += float(loss.detach())
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.meta_opt.step()
        return total
