"""Prompts for a decoder, and label scoring that encodes each shared piece once.

Prompt-based methods score every label name as the continuation of a prompt: in-context learning
(instruction, demonstrations, query), zero-shot prompting and the verbalizer head (instruction,
text). Scoring each (prompt, label) sequence alone repeats the demonstrations for every query and
every query for every label. Here a prompt is a tree: a `prefix` (instruction and
demonstrations) shared by several `stems` (one per text), each followed by its `leaves` (label
continuations). A tree is one stretch of a row; an attention mask lets each token see only its
ancestors, and position ids continue along each branch, so every leaf is scored exactly as after
its own full sequence, with each shared piece computed once. Unlike a key/value cache this is one
ordinary forward: it takes adapted weights and carries gradients (MetaICL, MAML through LoRA).

Only what a score reads is computed: a leaf's last token is never laid out (it predicts nothing
scored and no token attends to it), the output layer and its vocabulary-wide log-softmax run
once per distinct predicting slot (every leaf of a stem shares its first one), and a prompt's
stems are split into trees of the size that costs least, since dense attention over a row grows
with the square of its width while each extra tree repeats the prefix.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from metarun.backbone.encoder import Encoder, upcast
from metarun.backbone.packing import attention_mask, pack_rows
from metarun.errors import MetarunError

# Called with a forward's [rows, width] tree index of every token slot (padding: negative), it
# gives the context that forward runs in (algo/batched.py: each episode's own LoRA factors).
Around = Callable[[torch.Tensor], contextlib.AbstractContextManager]

DECODERS = "a decoder backbone (backbone=smollm2 offline, gpt2, qwen2.5-0.5b, llama-3.2-1b)"


class PromptFormat:
    """Instruction, demonstrations and texts as strings."""

    def __init__(self, instruction: str, template: str, separator: str) -> None:
        if template.count("{text}") != 1 or template.count("{label}") != 1:
            raise MetarunError(f"algo.template={template!r} needs one {{text}} and one {{label}}")
        if template.index("{text}") > template.index("{label}"):
            raise MetarunError(f"algo.template={template!r}: {{text}} must come before {{label}}")
        if not separator:
            raise MetarunError("algo.separator must not be empty")
        if re.search(r"\{(?!labels\})[^}]*\}", instruction):
            raise MetarunError(f"algo.instruction={instruction!r}: {{labels}} is its only field")
        self.instruction, self.template, self.separator = instruction, template, separator
        head = template.split("{label}")[0]
        self.query_head = head.rstrip()  # the label's leading space belongs to its continuation
        self.gap = head[len(self.query_head) :]

    @staticmethod
    def clean(text: str) -> str:
        """One line, single spaces: a text can then never contain the separator."""
        return " ".join(text.split())

    def demo(self, text: str, label: str) -> str:
        return self.template.format(text=self.clean(text), label=self.clean(label))

    def prefix(self, names: Sequence[str], demos: Sequence[tuple[str, str]] = ()) -> str:
        """What every text of an episode shares: the instruction, then the demonstrations."""
        head = self.instruction.replace("{labels}", ", ".join(self.clean(n) for n in names))
        return head + "".join(self.demo(t, lab) + self.separator for t, lab in demos)

    def stem(self, text: str) -> str:
        return self.query_head.format(text=self.clean(text))

    def continuation(self, label: str) -> str:
        return self.gap + self.clean(label)


@dataclass
class Tree:
    """Token ids of one prompt tree: a shared prefix, stems after it, leaves after each stem."""

    prefix: list[int]
    stems: list[list[int]]
    leaves: list[list[list[int]]]  # leaves[i]: the continuations scored after stem i

    def __len__(self) -> int:
        """Slots laid out: every token but each leaf's last."""
        return len(self.prefix) + sum(len(s) + sum(laid(leaf) for leaf in ls) for s, ls in zip(
            self.stems, self.leaves, strict=True))  # fmt: skip


def laid(leaf: list[int]) -> int:
    """A leaf's slots: its last token is only a target, so it takes none."""
    return max(len(leaf) - 1, 0)


# A row's dense attention costs about what its linear layers do once it is this many tokens
# wide (SmolLM2 on one CPU thread: 918 tokens, 60 ms of linear layers and 50 ms of attention
# per block); sets how many stems share a tree (`stems_per_tree`).
ATTENTION_WIDTH = 1024


def stems_per_tree(prefix: int, stems: Sequence[int], most: int) -> int:
    """How many stems (of `stems` slots each, leaves included) share one copy of a `prefix`
    slots long, at most `most`: the count whose trees cost least, a tree costing its slots
    plus its attention, width² / ATTENTION_WIDTH. Long prefixes (demonstrations) favour large
    trees, short ones (an instruction) small trees."""

    def cost(k: int) -> float:
        sizes = [prefix + sum(stems[i : i + k]) for i in range(0, len(stems), k)]
        return sum(n + n * n / ATTENTION_WIDTH for n in sizes)

    return min(range(min(most, len(stems)), 0, -1), key=cost) if stems else 1


@dataclass
class _Layout:
    """Trees laid out in rows: per slot its token, position and branch ids, and per scored
    token the slot that predicts it."""

    tokens: list[int]
    positions: list[int]
    tree: list[int]  # which tree a slot belongs to (padding: a tree of its own)
    stem: list[int]  # global stem id, -1 in a prefix
    leaf: list[int]  # global leaf id, -1 outside leaves
    predictor: list[int]  # per scored token: the slot whose output predicts it
    target: list[int]  # per scored token: its token id
    owner: list[int]  # per scored token: its global leaf id


def _lay_out(trees: Sequence[Tree], rows: list[list[int]], width: int, pad: int) -> _Layout:
    out = _Layout([], [], [], [], [], [], [], [])
    first_leaf = [0]
    for t in trees:  # global leaf ids follow (tree, stem, leaf) order whatever the rows
        first_leaf.append(first_leaf[-1] + sum(len(ls) for ls in t.leaves))
    stems_before = [0]
    for t in trees:
        stems_before.append(stems_before[-1] + len(t.stems))
    for r, members in enumerate(rows):
        for ti in members:
            tree = trees[ti]
            stem_id, leaf_id = stems_before[ti], first_leaf[ti]

            def put(token: int, position: int, stem: int, leaf: int, ti: int = ti) -> int:
                out.tokens.append(token), out.positions.append(position), out.tree.append(ti)
                out.stem.append(stem), out.leaf.append(leaf)
                return len(out.tokens) - 1

            last = -1
            for p, token in enumerate(tree.prefix):
                last = put(token, p, -1, -1)
            for stem, leaves in zip(tree.stems, tree.leaves, strict=True):
                before = last
                for p, token in enumerate(stem):
                    before = put(token, len(tree.prefix) + p, stem_id, -1)
                start = len(tree.prefix) + len(stem)
                for leaf in leaves:
                    if before < 0:
                        raise MetarunError("a prompt must have at least one token before a label")
                    prev = before
                    for p, token in enumerate(leaf):
                        out.predictor.append(prev), out.target.append(token)
                        out.owner.append(leaf_id)
                        if p < len(leaf) - 1:  # the last token is only a target
                            prev = put(token, start + p, stem_id, leaf_id)
                    leaf_id += 1
                stem_id += 1
        while len(out.tokens) < (r + 1) * width:  # padding sees only itself
            out.tokens.append(pad), out.positions.append(0), out.tree.append(-1 - len(out.tokens))
            out.stem.append(-1), out.leaf.append(-1)
    return out


class PromptScorer:
    """Summed log-probabilities of every leaf of prompt trees under a decoder (optionally with
    adapted weights), in (tree, stem, leaf) order."""

    def __init__(self, encoder: Encoder, user: str, max_tokens: int = 4096) -> None:
        """`user`: what scores prompts (named in the one error an encoder backbone gets)."""
        if not encoder.causal_lm:
            raise MetarunError(
                f"{user} scores label names with a decoder's LM head, and {encoder.name} is an "
                f"encoder; choose {DECODERS}"
            )
        self.encoder, self.max_tokens = encoder, max_tokens
        config = encoder.model.config
        self.max_positions = getattr(config, "n_positions", None) or getattr(
            config, "max_position_embeddings", None
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoder.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def check_length(self, trees: Sequence[Tree]) -> None:
        longest = max(len(t.prefix) + len(s) + len(leaf) for t in trees
                      for s, ls in zip(t.stems, t.leaves, strict=True) for leaf in ls)  # fmt: skip
        if self.max_positions and longest > self.max_positions:
            raise MetarunError(
                f"a prompt has {longest} tokens but the decoder takes {self.max_positions}; "
                "lower task.shots, task.way or backbone.max_length"
            )

    def logprobs(
        self, trees: Sequence[Tree], params: dict | None = None, around: Around | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probability, token count) of every leaf; `around`: see `Around`."""
        self.check_length(trees)
        sizes = [len(t) for t in trees]
        width = max(sizes)
        rows = pack_rows(sizes, width)
        per_forward = max(1, self.max_tokens // width)
        n_leaves = sum(len(ls) for t in trees for ls in t.leaves)
        device = self.encoder.device
        dtype = torch.promote_types(next(self.encoder.model.parameters()).dtype, torch.float32)
        sums = torch.zeros(n_leaves, device=device, dtype=dtype)
        counts = torch.zeros(n_leaves, device=device, dtype=dtype)
        for start in range(0, len(rows), per_forward):
            part = rows[start : start + per_forward]
            lp, owner = self._forward(trees, part, width, params, around)
            sums = sums.index_add(0, owner, lp.to(sums.dtype))
            counts = counts.index_add(0, owner, torch.ones_like(counts[owner]))
        return sums, counts

    def _forward(self, trees, rows, width, params, around) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder
        device = enc.device
        pad = enc.tokenizer.pad_token_id or 0
        lay = _lay_out(trees, rows, width, pad)
        shape = (len(rows), width)
        ids = torch.tensor(lay.tokens, device=device).view(shape)
        positions = torch.tensor(lay.positions, device=device).view(shape)
        tree, stem, leaf = (torch.tensor(x, device=device).view(shape)
                            for x in (lay.tree, lay.stem, lay.leaf))  # fmt: skip
        sees = (
            (tree[:, :, None] == tree[:, None, :])
            & ((stem[:, None, :] == -1) | (stem[:, :, None] == stem[:, None, :]))
            & ((leaf[:, None, :] == -1) | (leaf[:, :, None] == leaf[:, None, :]))
            & torch.ones(width, width, dtype=torch.bool, device=device).tril()
        )
        mask = attention_mask(sees.unsqueeze(1), enc.additive_mask_dtype())
        inputs = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        with around(tree) if around else contextlib.nullcontext():
            hidden = enc.hidden(inputs, params).reshape(-1, enc.model.config.hidden_size)
        # the output layer only where a label token is predicted, once per predicting slot
        slots, row = torch.tensor(lay.predictor, device=device).unique(return_inverse=True)
        logprobs = upcast(enc.lm_logits(hidden[slots], params)).log_softmax(-1)
        token_lp = logprobs[row, torch.tensor(lay.target, device=device)]
        return token_lp, torch.tensor(lay.owner, device=device)


def label_scores(sums: torch.Tensor, counts: torch.Tensor, score: str) -> torch.Tensor:
    """A label's score from its tokens: their summed or mean log-probability."""
    return sums / counts if score == "mean" else sums


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def score_matrices(
    scorer: PromptScorer, parts: Sequence[tuple[list[int], list[list[int]], list[list[int]]]],
    per_tree: int, score: str, params: dict | None = None,
    around: Callable[[list[int]], Around] | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """`score_matrix` of several (prefix, stems, leaves) parts (episodes) in shared forwards:
    [stems, leaves] scores per part; at most `per_tree` stems share a copy of their part's
    prefix (`stems_per_tree`). `around(owner)`, `owner` each tree's part, gives the context of
    each forward (see `Around`)."""
    trees, owner = [], []
    for i, (prefix, stems, leaves) in enumerate(parts):
        branch = sum(laid(leaf) for leaf in leaves)
        size = stems_per_tree(len(prefix), [len(s) + branch for s in stems], per_tree)
        for part in chunks(stems, size):
            trees.append(Tree(prefix, part, [leaves] * len(part)))
            owner.append(i)
    sums, counts = scorer.logprobs(trees, params, around(owner) if around else None)
    scores = label_scores(sums, counts, score)  # leaves in (tree, stem, leaf) order: by part
    sizes = [len(stems) * len(leaves) for _, stems, leaves in parts]
    return [s.view(len(stems), len(leaves))
            for s, (_, stems, leaves) in zip(scores.split(sizes), parts, strict=True)]  # fmt: skip


def score_matrix(
    scorer: PromptScorer, prefix: list[int], stems: list[list[int]], leaves: list[list[int]],
    per_tree: int, score: str, params: dict | None = None, shared: bool = True,
) -> torch.Tensor:  # fmt: skip
    """[stems, leaves] label scores: every stem followed by every leaf. `shared`: stems share
    the prefix, at most `per_tree` at a time; otherwise each (stem, leaf) pair is scored alone."""
    if shared:
        return score_matrices(scorer, [(prefix, stems, leaves)], per_tree, score, params)[0]
    trees = [Tree(prefix, [s], [[leaf]]) for s in stems for leaf in leaves]
    sums, counts = scorer.logprobs(trees, params)
    return label_scores(sums, counts, score).view(len(stems), len(leaves))
