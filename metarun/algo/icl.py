"""In-context learning with a decoder LM, and MetaICL (Min et al., 2022) which meta-trains it.

An episode's support set becomes a prompt of demonstrations, "{text} -> {label}" through a
template; each query is appended and every label name is scored as its continuation (summed or
mean token log-probability). The highest-scoring label is the prediction. MetaICL trains the
decoder on meta-train episodes formatted the same way, with the language-model loss on the
correct label's tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from metarun.algo.base import Algorithm, Predictor, freeze
from metarun.backbone import Encoder
from metarun.errors import MetarunError
from metarun.task import Episode, Examples, TaskData
from metarun.task.data import episode_label_names

SCORES = ("sum", "mean")
LOSSES = ("lm", "ce")


class PromptFormat:
    """Demonstrations and queries as text, and back (the inverse is what the tests check)."""

    def __init__(self, template: str, separator: str) -> None:
        if template.count("{text}") != 1 or template.count("{label}") != 1:
            raise MetarunError(f"algo.template={template!r} needs one {{text}} and one {{label}}")
        if template.index("{text}") > template.index("{label}"):
            raise MetarunError(f"algo.template={template!r}: {{text}} must come before {{label}}")
        if not separator:
            raise MetarunError("algo.separator must not be empty")
        self.template, self.separator = template, separator
        head = template.split("{label}")[0]
        self.query_head = head.rstrip()  # the label's leading space belongs to its continuation
        self.gap = head[len(self.query_head) :]
        pattern = re.escape(template).replace(r"\{text\}", "(.*?)").replace(r"\{label\}", "(.*)")
        self._demo_re = re.compile(f"^{pattern}$", re.S)
        query = re.escape(self.query_head).replace(r"\{text\}", "(.*)")
        self._query_re = re.compile(f"^{query}$", re.S)

    @staticmethod
    def clean(text: str) -> str:
        """One line, single spaces: a text can then never contain the separator."""
        return " ".join(text.split())

    def demo(self, text: str, label: str) -> str:
        return self.template.format(text=self.clean(text), label=self.clean(label))

    def context(self, demos: Sequence[tuple[str, str]], query: str) -> str:
        parts = [self.demo(t, lab) for t, lab in demos]
        return self.separator.join([*parts, self.query_head.format(text=self.clean(query))])

    def continuation(self, label: str) -> str:
        return self.gap + self.clean(label)

    def parse(self, context: str) -> tuple[list[tuple[str, str]], str]:
        """(demonstrations, query text) back from a context string."""
        *parts, last = context.split(self.separator)
        demos = []
        for part in parts:
            match = self._demo_re.match(part)
            if match is None:
                raise ValueError(f"not a demonstration: {part!r}")
            demos.append((match.group(1), match.group(2)))
        match = self._query_re.match(last)
        if match is None:
            raise ValueError(f"not a query: {last!r}")
        return demos, match.group(1)


class InContext(Algorithm):
    backbone_kind = "causal_lm"
    feature_cache = False  # predictions come from prompts, not cached embeddings

    def __init__(
        self, encoder: Encoder, way: int, template: str, separator: str, score: str,
        batch_size: int, train_lm: bool, loss: str,
    ) -> None:  # fmt: skip
        super().__init__(encoder, way)
        if score not in SCORES:
            raise MetarunError(f"algo.score={score}; use one of {', '.join(SCORES)}")
        if loss not in LOSSES:
            raise MetarunError(f"algo.loss={loss}; use one of {', '.join(LOSSES)}")
        if batch_size < 1:
            raise MetarunError(f"algo.batch_size={batch_size} must be at least 1")
        self.format = PromptFormat(template, separator)
        self.score, self.batch_size, self.loss = score, batch_size, loss
        self.label_names: dict[str, str] = {}
        if not train_lm:  # plain in-context learning: the decoder never changes
            freeze(encoder)
        config = encoder.model.config
        self.max_positions = getattr(config, "n_positions", None) or getattr(
            config, "max_position_embeddings", None
        )

    def prepare(self, data: TaskData) -> None:
        self.label_names = dict(data.label_names)

    def text(self, text_id: int) -> str:
        """The task's text, cut to backbone.max_length tokens like every other algorithm's."""
        enc = self.encoder
        if int(enc.lengths[text_id]) < enc.max_length:
            return enc.texts[text_id]
        row = enc.tokens[text_id, : enc.max_length]
        return enc.tokenizer.decode(row, skip_special_tokens=True)

    def names(self, classes: tuple[str, ...]) -> list[str]:
        return episode_label_names(self.label_names, classes, "in-context learning")

    def contexts(self, support: Examples, query: Examples) -> list[str]:
        names = self.names(support.classes)
        pairs = zip(support.ids.tolist(), support.labels.tolist(), strict=True)
        demos = [(self.text(i), names[lab]) for i, lab in pairs]
        return [self.format.context(demos, self.text(int(q))) for q in query.ids]

    def logprobs(
        self, contexts: list[str], continuations: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probability of each continuation after its context, and its token count."""
        tok = self.encoder.tokenizer
        ctx = tok(contexts, add_special_tokens=False)["input_ids"]
        cont = tok(continuations, add_special_tokens=False)["input_ids"]
        seqs = [c + k for c, k in zip(ctx, cont, strict=True)]
        longest = max(len(s) for s in seqs)
        if self.max_positions and longest > self.max_positions:
            raise MetarunError(
                f"an in-context prompt has {longest} tokens but the decoder takes "
                f"{self.max_positions}; lower task.shots, task.way or backbone.max_length"
            )
        out = []
        for start in range(0, len(seqs), self.batch_size):
            part = range(start, min(start + self.batch_size, len(seqs)))
            out.append(self._score_batch([seqs[i] for i in part], [len(cont[i]) for i in part]))
        sums = torch.cat(out)
        return sums, torch.tensor([len(k) for k in cont], device=sums.device, dtype=sums.dtype)

    def _score_batch(self, seqs: list[list[int]], n_cont: list[int]) -> torch.Tensor:
        model, device = self.encoder.model, self.encoder.tokens.device
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        rows, cols, targets = [], [], []
        for i, (seq, k) in enumerate(zip(seqs, n_cont, strict=True)):
            ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
            for p in range(len(seq) - k, len(seq)):  # the hidden state before each label token
                rows.append(i), cols.append(p - 1), targets.append(seq[p])
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
        picked = hidden.last_hidden_state[torch.tensor(rows), torch.tensor(cols)]
        logits = model.get_output_embeddings()(picked).float()  # only where a label token is
        token_lp = logits.log_softmax(-1).gather(-1, torch.tensor(targets, device=device)[:, None])
        seq_of = torch.tensor(rows, device=device)
        return torch.zeros(len(seqs), device=device).index_add(0, seq_of, token_lp.squeeze(-1))

    def adapt(self, support: Examples, way: int) -> Predictor:
        names = self.names(support.classes)

        def predict(query: Examples) -> torch.Tensor:
            contexts = self.contexts(support, query)
            pairs = [(c, self.format.continuation(n)) for c in contexts for n in names]
            sums, counts = self.logprobs([c for c, _ in pairs], [k for _, k in pairs])
            scores = sums / counts if self.score == "mean" else sums
            return scores.view(len(contexts), way)

        return predict

    def meta_loss(self, episodes: Sequence[Episode]) -> tuple[torch.Tensor, dict[str, float]]:
        """MetaICL: the language-model loss on each query's correct label tokens (loss=lm), or
        cross-entropy over every label's score (loss=ce, costs `way` times more)."""
        if self.loss == "ce":
            return super().meta_loss(episodes)
        sums, counts = [], []
        for ep in episodes:
            names = self.names(ep.support.classes)
            conts = [self.format.continuation(names[int(lab)]) for lab in ep.query.labels]
            lp, n = self.logprobs(self.contexts(ep.support, ep.query), conts)
            sums.append(lp)
            counts.append(n)
        loss = -torch.cat(sums).sum() / torch.cat(counts).sum()  # mean NLL per label token
        return loss, {"loss": float(loss.detach())}
