"""`algo.backend=higher`: the same inner loop through the `higher` package.

For users whose code relies on `higher`, and as an independent cross-check of the functional
path (tests require both to give the same meta-gradients). higher patches a copy of the module
tree whose forward reads "fast weights"; only the adapted tensors are in its optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algo.base import Algorithm, Predictor, upcast
from metarun.backbone import Encoder
from metarun.errors import MetarunError
from metarun.task import Examples


def check_supported(algo: Algorithm) -> None:
    inner = algo.inner
    if inner.optimizer != "sgd" or isinstance(inner.lrs, nn.Parameter):
        raise MetarunError(
            "algo.backend=higher supports algo.inner_optimizer=sgd with a fixed inner rate; "
            "use algo.backend=func for adam or algo.learn_inner_lr=true"
        )


class _EncoderWithHead(nn.Module):
    """The module higher patches: the encoder's model plus a linear head."""

    def __init__(self, encoder: Encoder, way: int, like: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, way, device=like.device, dtype=like.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(upcast(self.encoder(ids)))


def adapt_with_higher(
    algo: Algorithm, support: Examples, way: int, steps: int, create_graph: bool
) -> Predictor:
    import higher

    inner, encoder, track = algo.inner, algo.encoder, algo.training
    net = _EncoderWithHead(encoder, way, like=inner.lrs)
    adapted = {f"encoder.model.{n}" for n in inner.names} | {"head.weight", "head.bias"}
    refs = [p for n, p in net.named_parameters() if n in adapted]
    # One group per tensor so each has its own rate, as in the functional loop.
    opt = torch.optim.SGD([{"params": [p]} for p in refs], lr=float(inner.lrs[0, 0]))
    labels = support.labels.to(encoder.device)
    with torch.enable_grad():
        feats0 = encoder(support.ids) if inner.head.init == "proto" else None
        weight, bias = inner.head.init_weights(feats0, labels, way, inner.lrs)
        fmodel = higher.monkeypatch(net, copy_initial_weights=False, track_higher_grads=track)
        start = [
            weight if n == "head.weight" else bias if n == "head.bias" else p.view_as(p)
            for n, p in net.named_parameters()  # aliases: partial inner gradients, as func
        ]
        if not track:
            start = [p.detach().requires_grad_() for p in start]
        fmodel.update_params(start)
        diffopt = higher.optim.get_diff_optim(
            opt, net.parameters(), fmodel=fmodel, track_higher_grads=track,
            override={"lr": [float(lr) for lr in inner.lrs[0, : len(refs)]]},
        )  # fmt: skip
        detach = None if create_graph else (lambda gs: [g if g is None else g.detach() for g in gs])
        for _ in range(steps):
            loss = F.cross_entropy(fmodel(support.ids), labels)
            diffopt.step(loss, grad_callback=detach)

    def predict(query: Examples) -> torch.Tensor:
        return fmodel(query.ids)

    return predict
