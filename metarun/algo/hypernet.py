"""A hypernetwork that writes each task's weights from its support set: no gradient steps at
test time, one forward pass per task.

A task encoder pools the support set (a DeepSets mean over class prototypes) into a task
embedding. From it and each class prototype the hypernetwork writes that class's head row; it
starts as the linear form of a euclidean ProtoNet and learns a correction. With
`generate_lora`, it also writes LoRA matrices for the backbone's target layers, one set per
layer (a learned layer embedding tells the layers apart); the backbone then re-encodes the
task's texts with them, functionally.
"""

from __future__ import annotations

import torch
from torch import nn

from metarun.algo.adapted import inject_lora
from metarun.algo.base import Algorithm, Predictor, fresh_module_groups, upcast
from metarun.algo.protonet import prototypes
from metarun.backbone import Encoder
from metarun.config import HyperNetConfig
from metarun.task import Examples


def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, out))


def lora_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(lora_A, lora_B) parameter names per adapted layer, in model order."""
    names = [n for n, _ in model.named_parameters() if ".lora_A." in n]
    return [(a, a.replace(".lora_A.", ".lora_B.")) for a in names]


class HyperNet(Algorithm):
    family = "model-based"

    config = HyperNetConfig

    def __init__(self, encoder: Encoder, way: int, cfg: HyperNetConfig) -> None:
        super().__init__(encoder, way)
        dim, self.head_lr, hidden = encoder.dim, cfg.head_lr, cfg.hidden
        self.task_encoder = mlp(dim, hidden, hidden)
        self.head_writer = mlp(dim + hidden, hidden, dim + 1)
        nn.init.zeros_(self.head_writer[-1].weight)  # starts as ProtoNet: correction zero
        nn.init.zeros_(self.head_writer[-1].bias)
        self.pairs: list[tuple[str, str]] = []
        self.lora_writer: nn.ModuleDict | None = None
        if cfg.generate_lora:
            self.build_lora_writer(cfg.lora_r, cfg.lora_alpha, encoder.lora_targets, hidden)
        self.feature_cache = not cfg.generate_lora

    def build_lora_writer(self, r: int, alpha: int, targets: list[str], hidden: int) -> None:
        model = self.encoder.model
        inject_lora(model, r, alpha, targets)
        self.pairs = lora_pairs(model)
        for a, b in self.pairs:  # written per task, never learned as such
            model.get_parameter(a).requires_grad_(False)
            model.get_parameter(b).requires_grad_(False)
        self.layer_embedding = nn.Embedding(len(self.pairs), hidden)
        self.lora_trunk = mlp(2 * hidden, hidden, hidden)
        writers = {}
        for a, b in self.pairs:
            key = self.shape_key(a, b)
            if key not in writers:
                rank, fan_in = model.get_parameter(a).shape
                fan_out = model.get_parameter(b).shape[0]
                writer = nn.Linear(hidden, rank * (fan_in + fan_out))
                nn.init.normal_(writer.weight, std=fan_in**-0.5 / hidden**0.5)
                with torch.no_grad():  # B starts at zero: the backbone starts unchanged
                    writer.weight[rank * fan_in :].zero_()
                    writer.bias.zero_()
                writers[key] = writer
        self.lora_writer = nn.ModuleDict(writers)

    def shape_key(self, a: str, b: str) -> str:
        model = self.encoder.model
        (rank, fan_in), fan_out = model.get_parameter(a).shape, model.get_parameter(b).shape[0]
        return f"r{rank}_in{fan_in}_out{fan_out}"

    def param_groups(self) -> list[dict]:
        fresh = [self.task_encoder, self.head_writer, self.lora_writer]
        if self.lora_writer is not None:
            fresh += [self.layer_embedding, self.lora_trunk]
        return fresh_module_groups(self, fresh, self.head_lr)

    def write_lora(self, task: torch.Tensor) -> dict[str, torch.Tensor]:
        """LoRA matrices for every adapted layer, as encoder parameter overrides."""
        model, out = self.encoder.model, {}
        codes = self.lora_trunk(torch.cat(
            [task.expand(len(self.pairs), -1), self.layer_embedding.weight], dim=-1
        ))  # fmt: skip
        for i, (a, b) in enumerate(self.pairs):
            flat = self.lora_writer[self.shape_key(a, b)](codes[i])
            shape_a, shape_b = model.get_parameter(a).shape, model.get_parameter(b).shape
            dtype = model.get_parameter(a).dtype
            out[a] = flat[: shape_a.numel()].view(shape_a).to(dtype)
            out[b] = flat[shape_a.numel() :].view(shape_b).to(dtype)
        return out

    def generate(self, support: Examples, way: int) -> dict[str, torch.Tensor]:
        """Every weight this task gets: "head.weight", "head.bias" and any LoRA overrides."""
        labels = support.labels
        protos = upcast(prototypes(self.encoder(support.ids), labels, way))
        task = self.task_encoder(protos).mean(0)  # permutation invariant over classes
        weights: dict[str, torch.Tensor] = {}
        if self.lora_writer is not None:
            weights |= self.write_lora(task)
            protos = upcast(prototypes(self.encoder(support.ids, params=weights), labels, way))
        delta = self.head_writer(torch.cat([protos, task.expand(way, -1)], dim=-1))
        weights["head.weight"] = 2 * protos + delta[:, :-1]
        weights["head.bias"] = -(protos**2).sum(-1) + delta[:, -1]
        return weights

    def adapt(self, support: Examples, way: int) -> Predictor:
        weights = self.generate(support, way)
        lora = {k: v for k, v in weights.items() if not k.startswith("head.")} or None

        def predict(query: Examples) -> torch.Tensor:
            q = upcast(self.encoder(query.ids, params=lora))
            return q @ weights["head.weight"].T + weights["head.bias"]

        return predict
