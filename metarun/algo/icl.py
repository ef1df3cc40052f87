"""In-context learning with a decoder LM, zero-shot prompting, and MetaICL (Min et al., 2022).

An episode's support set becomes a prompt: the instruction (naming the episode's labels), then
demonstrations "{text} -> {label}" through a template; each query is appended and every label
name is scored as its continuation (summed or mean token log-probability). The highest-scoring
label is the prediction. Without demonstrations (`algo=prompt`) this is zero-shot prompting, the
verbalizer head before any adaptation. MetaICL trains the decoder on meta-train episodes
formatted the same way, with the language-model loss on the correct label's tokens. Scoring
shares the demonstrations between queries and each query between labels (backbone/prompts.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metarun.algo.base import Algorithm, Predictor, freeze
from metarun.backbone import Encoder
from metarun.backbone.prompts import (
    PromptFormat,
    PromptScorer,
    Tree,
    chunks,
    laid,
    score_matrix,
    stems_per_tree,
)
from metarun.config import ICLConfig
from metarun.task import Episode, Examples, TaskData
from metarun.task.labels import episode_label_names


class InContext(Algorithm):
    family = "in-context"
    config = ICLConfig
    feature_cache = False  # predictions come from prompts, not cached embeddings

    def __init__(self, encoder: Encoder, way: int, cfg: ICLConfig) -> None:
        super().__init__(encoder, way)
        self.scorer = PromptScorer(encoder, f"{type(self).__name__} (algo=icl, metaicl, prompt)")
        self.format = PromptFormat(cfg.instruction, cfg.template, cfg.separator)
        self.score, self.batch_size, self.loss = cfg.score, cfg.batch_size, cfg.loss
        self.demonstrations, self.shared_prefix = cfg.demonstrations, cfg.shared_prefix
        self.label_names: dict[str, str] = {}
        if not cfg.train_lm:  # plain in-context learning: the decoder never changes
            freeze(encoder)

    def prepare(self, data: TaskData) -> None:
        self.label_names = dict(data.label_names)

    def text(self, text_id: int) -> str:
        return self.encoder.table.text(text_id)

    def names(self, classes: tuple[str, ...]) -> list[str]:
        return episode_label_names(self.label_names, classes, "in-context learning")

    def prefix(self, support: Examples) -> str:
        """The instruction and, unless zero-shot, the support set as demonstrations."""
        names = self.names(support.classes)
        demos = []
        if self.demonstrations:
            pairs = zip(support.ids.tolist(), support.labels.tolist(), strict=True)
            demos = [(self.text(i), names[lab]) for i, lab in pairs]
        return self.format.prefix(names, demos)

    def pieces(self, support: Examples, query: Examples) -> tuple[list[int], list[list[int]]]:
        """Token ids of the shared prefix and of each query's stem."""
        tok = self.scorer.tokenize
        stems = tok([self.format.stem(self.text(int(q))) for q in query.ids])
        return tok([self.prefix(support)])[0], stems

    def scores(self, support: Examples, query: Examples) -> torch.Tensor:
        """[queries, way] label scores after the episode's prompt."""
        prefix, stems = self.pieces(support, query)
        conts = self.scorer.tokenize(
            [self.format.continuation(n) for n in self.names(support.classes)]
        )
        return score_matrix(self.scorer, prefix, stems, conts, self.batch_size, self.score,
                            shared=self.shared_prefix)  # fmt: skip

    def adapt(self, support: Examples, way: int) -> Predictor:
        return lambda query: self.scores(support, query)

    def meta_loss(self, episodes: Sequence[Episode]) -> tuple[torch.Tensor, dict[str, float]]:
        """MetaICL: the language-model loss on each query's correct label tokens (loss=lm), or
        cross-entropy over every label's score (loss=ce, scores `way` times more tokens)."""
        if self.loss == "ce":
            return super().meta_loss(episodes)
        trees = []
        for ep in episodes:
            prefix, stems = self.pieces(ep.support, ep.query)
            names = self.names(ep.support.classes)
            conts = self.scorer.tokenize([self.format.continuation(n) for n in names])
            correct = [[conts[int(lab)]] for lab in ep.query.labels]
            sizes = [len(s) + laid(c[0]) for s, c in zip(stems, correct, strict=True)]
            size = stems_per_tree(len(prefix), sizes, self.batch_size)
            for part in chunks(list(range(len(stems))), size):
                trees.append(Tree(prefix, [stems[i] for i in part], [correct[i] for i in part]))
        sums, counts = self.scorer.logprobs(trees)
        loss = -sums.sum() / counts.sum()  # mean NLL per label token
        return loss, {"loss": float(loss.detach())}
