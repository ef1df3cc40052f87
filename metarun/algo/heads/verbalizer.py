"""The verbalizer head: an example's class scores are a decoder's log-probabilities of each
label name after the instruction and the text (as zero-shot prompting reads them), so adapting
the decoder's weights on the support set adapts the classifier. It has no tensors of its own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algo.adapted import encoder_params
from metarun.backbone import Encoder
from metarun.backbone.prompts import PromptFormat, PromptScorer, score_matrix
from metarun.config import PromptFields
from metarun.task import Episode, Examples, TaskData
from metarun.task.labels import episode_label_names


class Verbalizer:
    """Label-name scores of examples under a decoder (optionally with adapted weights)."""

    def __init__(self, encoder: Encoder, prompt: PromptFields, user: str, per_tree: int = 32):
        self.encoder, self.score, self.per_tree = encoder, prompt.score, per_tree
        self.scorer = PromptScorer(encoder, user)
        self.format = PromptFormat(prompt.instruction, prompt.template, prompt.separator)
        self.label_names: dict[str, str] = {}

    def __call__(self, examples: Examples, params: dict | None = None) -> torch.Tensor:
        """[examples, way] class scores, with adapted decoder weights `params` if given."""
        names = episode_label_names(self.label_names, examples.classes, "the verbalizer head")
        fmt, tok = self.format, self.scorer.tokenize
        stems = tok([fmt.stem(self.encoder.table.text(int(i))) for i in examples.ids])
        leaves = tok([fmt.continuation(n) for n in names])
        prefix = tok([fmt.prefix(names)])[0]
        return score_matrix(self.scorer, prefix, stems, leaves, self.per_tree, self.score, params)


class VerbalizerHead(nn.Module):
    names: tuple[str, ...] = ()
    # Prompts hold the instruction's and label names' tokens besides the episode's texts.
    cuts_table = False
    default_adapt = "lora"  # a decoder's weights are the classifier; LoRA adapts them leanly
    no_head = "scores label names with the decoder itself"

    def __init__(self, encoder: Encoder, way: int, cfg: PromptFields) -> None:
        super().__init__()
        self.verbalizer = Verbalizer(encoder, cfg, "algo.head=verbalizer")

    def prepare(self, data: TaskData) -> None:
        """Scores need every class's readable name."""
        self.verbalizer.label_names = dict(data.label_names)

    def initial(self, name: str) -> torch.Tensor | None:
        return None

    def start(
        self, encoder: Encoder, support: Examples, way: int, track: bool,
        adapts_encoder: bool, like: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:  # fmt: skip
        return {}, None

    def scores(
        self, encoder: Encoder, examples: Examples, params: dict[str, torch.Tensor],
        vocab: torch.Tensor | None = None, feats: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        return self.verbalizer(examples, encoder_params(params))

    def objective(self, encoder: Encoder, data: TaskData) -> PromptObjective:
        """Fine-tuning's training under this head: prompt-based, on the episodes' label names."""
        return PromptObjective(self.verbalizer)


class PromptObjective(nn.Module):
    """Cross-entropy over each episode's label names, scored by the unadapted decoder."""

    def __init__(self, verbalizer: Verbalizer) -> None:
        super().__init__()
        self.verbalizer = verbalizer

    def forward(
        self, encoder: Encoder, episodes: Sequence[Episode]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        losses, correct, total = [], 0, 0
        for ep in episodes:
            for part in (ep.support, ep.query):
                logits = self.verbalizer(part)
                labels = part.labels.to(logits.device)
                losses.append(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                total += len(labels)
        loss = torch.stack(losses).sum() / total
        return loss, {"loss": float(loss.detach()), "acc": correct / total}
