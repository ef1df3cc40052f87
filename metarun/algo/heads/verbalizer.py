"""The verbalizer head: an example's class scores are a decoder's log-probabilities of each
label name after the instruction and the text (as zero-shot prompting reads them), so adapting
the decoder's weights on the support set adapts the classifier. It has no tensors of its own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algo.adapted import encoder_params
from metarun.algo.batched import token_episodes
from metarun.backbone import Encoder
from metarun.backbone.prompts import Around, PromptFormat, PromptScorer, score_matrices
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
        return self.many([examples], params)[0]

    def many(self, parts: Sequence[Examples], params: dict | None = None) -> list[torch.Tensor]:
        """The class scores of several episodes' examples in shared forwards. With more than
        one part, `params` holds every episode's LoRA factors side by side (algo/batched.py)."""
        prompts = [self.prompt(examples) for examples in parts]
        around = self.episodes(len(parts)) if len(parts) > 1 else None
        return score_matrices(self.scorer, prompts, self.per_tree, self.score, params, around)

    def prompt(self, examples: Examples) -> tuple[list[int], list[list[int]], list[list[int]]]:
        """(prefix, stems, leaves) token ids: the instruction with the episode's label names,
        one stem per text, one leaf per label name."""
        names = episode_label_names(self.label_names, examples.classes, "the verbalizer head")
        fmt, tok = self.format, self.scorer.tokenize
        stems = tok([fmt.stem(self.encoder.table.text(int(i))) for i in examples.ids])
        leaves = tok([fmt.continuation(n) for n in names])
        prefix = tok([fmt.prefix(names)])[0]
        return prefix, stems, leaves

    def episodes(self, n: int):
        """Given each prompt tree's episode, the context in which a forward's tokens each see
        their own episode's LoRA factors."""
        model = self.encoder.model

        def around(owner: list[int]) -> Around:
            table = torch.tensor(owner, device=self.encoder.device)

            def context(tree: torch.Tensor):
                episode = torch.where(tree >= 0, table[tree.clamp_min(0)], -1)
                return token_episodes(model, episode, n)

            return context

        return around


class VerbalizerHead(nn.Module):
    names: tuple[str, ...] = ()
    # Prompts hold the instruction's and label names' tokens besides the episode's texts.
    cuts_table = False
    # Several episodes' scores come from one forward over their prompt trees (`scores_many`)
    batches = True
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

    def scores_many(
        self, encoder: Encoder, parts: Sequence[Examples], params: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """`scores` of several episodes, whose LoRA factors `params` holds side by side."""
        return self.verbalizer.many(parts, encoder_params(params))

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
