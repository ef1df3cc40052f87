"""Prompt-based methods on tiny random decoders (GPT-2 and Llama): the prompt format, what gets
scored, and shared-prefix scoring against each sequence scored alone."""

from __future__ import annotations

import re

import pytest
import torch

from metarun.backbone.prompts import (
    PromptFormat,
    PromptScorer,
    Tree,
    score_matrix,
    stems_per_tree,
)
from metarun.errors import MetarunError
from metarun.task import fixed_episodes

from .conftest import seeded_algorithm

DECODERS = ["tiny-gpt2", "tiny-llama"]


@pytest.fixture
def icl(compose_cfg, synthetic_task):
    def _make(*overrides: str, backbone: str = "tiny-gpt2"):
        return seeded_algorithm(
            compose_cfg, synthetic_task, backbone, "algo=icl", *overrides
        ).eval()

    return _make


@pytest.fixture
def episode(synthetic_task):
    return fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 1, 0, "train")[0]


def context(fmt: PromptFormat, names, demos, query: str) -> str:
    """One prompt as a string: the instruction, the demonstrations, the query."""
    return fmt.prefix(names, demos) + fmt.stem(query)


def contexts(algo, support, query) -> list[str]:
    """Each query's whole prompt as one string (what the scored token pieces spell)."""
    return [algo.prefix(support) + algo.format.stem(algo.text(int(q))) for q in query.ids]


def parse(fmt: PromptFormat, text: str, names) -> tuple[list[tuple[str, str]], str]:
    """(demonstrations, query text) back from a prompt string: the format's inverse."""
    head = fmt.prefix(names)
    assert text.startswith(head), f"not after the instruction {head!r}: {text!r}"
    *parts, last = text[len(head) :].split(fmt.separator)
    pattern = re.escape(fmt.template).replace(r"\{text\}", "(.*?)").replace(r"\{label\}", "(.*)")
    demos = [re.fullmatch(pattern, part, re.S).groups() for part in parts]
    query = re.fullmatch(re.escape(fmt.query_head).replace(r"\{text\}", "(.*)"), last, re.S)
    return [tuple(d) for d in demos], query.group(1)


def test_prompt_format_round_trips():
    fmt = PromptFormat("Classify as one of: {labels}.\n\n", "Input: {text}\nLabel: {label}", "\n\n")
    names = ["card payment fee", "transfer"]
    demos = [("my card was  charged\ntwice", "card payment fee"), ("where is my money", "transfer")]
    prompt = context(fmt, names, demos, "how do I top up?")
    assert prompt.startswith("Classify as one of: card payment fee, transfer.\n\nInput: my card")
    assert prompt.endswith("Input: how do I top up?\nLabel:")
    parsed, query = parse(fmt, prompt, names)
    assert parsed == [(fmt.clean(t), fmt.clean(lab)) for t, lab in demos]
    assert query == "how do I top up?"
    assert fmt.continuation("transfer") == " transfer"  # the template's space goes with the label
    assert parse(fmt, context(fmt, names, [], "hi"), names) == ([], "hi")  # zero-shot: no demos
    with pytest.raises(MetarunError, match=r"algo\.template"):
        PromptFormat("", "{label} is the label of {text}", "\n")
    with pytest.raises(MetarunError, match=r"algo\.instruction"):
        PromptFormat("Pick {choice}", "{text} {label}", "\n")


def full_sequence_logprob(model, context: list[int], continuation: list[int]) -> float:
    """The reference: one plain forward of the whole sequence, no mask, no position ids."""
    with torch.no_grad():
        logp = model(torch.tensor([context + continuation])).logits.log_softmax(-1)[0]
    return sum(float(logp[len(context) + j - 1, t]) for j, t in enumerate(continuation))


@pytest.mark.parametrize("backbone", DECODERS)
def test_shared_prefix_scores_equal_each_sequence_scored_alone(icl, episode, backbone):
    algo = icl(backbone=backbone)
    prompts = contexts(algo, episode.support, episode.query)
    names = algo.names(episode.support.classes)
    assert len(prompts) == len(episode.query)
    demos, query = parse(algo.format, prompts[0], names)
    assert len(demos) == len(episode.support) and {lab for _, lab in demos} == set(names)
    assert query == algo.format.clean(algo.encoder.table.texts[int(episode.query.ids[0])])
    with torch.no_grad():
        shared = algo.adapt(episode.support, 3)(episode.query)
        algo.shared_prefix = False
        alone = algo.adapt(episode.support, 3)(episode.query)
    assert shared.shape == (len(episode.query), 3)
    assert torch.allclose(shared, alone, atol=1e-4)
    tok, model = algo.encoder.tokenizer, algo.encoder.model
    prefix, stems = algo.pieces(episode.support, episode.query)
    for q, stem in enumerate(stems):
        assert prefix + stem == tok(prompts[q], add_special_tokens=False)["input_ids"]
        for k, name in enumerate(names):
            cont = tok(algo.format.continuation(name), add_special_tokens=False)["input_ids"]
            assert tok.decode(cont).strip() == name  # what is scored is the label name
            expected = full_sequence_logprob(model, prefix + stem, cont)
            assert abs(float(shared[q, k]) - expected) < 1e-4


def test_trees_packed_in_rows_score_like_trees_alone(icl):
    """Several trees share rows (and a forward) without seeing each other."""
    scorer = PromptScorer(icl(backbone="tiny-llama").encoder, "a test", max_tokens=40)
    trees = [
        Tree([5, 6, 7], [[8, 9], [10]], [[[11, 12], [13]], [[11, 12], [13]]]),
        Tree([20], [[21, 22, 23]], [[[24]]]),
        Tree([], [[30, 31]], [[[32, 33, 34]]]),
    ]
    with torch.no_grad():
        together, counts = scorer.logprobs(trees)
        alone = torch.cat([scorer.logprobs([t])[0] for t in trees])
    assert torch.allclose(together, alone, atol=1e-5)
    assert counts.tolist() == [2, 1, 2, 1, 1, 3]
    model = scorer.encoder.model
    assert abs(float(together[0]) - full_sequence_logprob(model, [5, 6, 7, 8, 9], [11, 12])) < 1e-4
    assert abs(float(together[5]) - full_sequence_logprob(model, [30, 31], [32, 33, 34])) < 1e-4


@pytest.mark.parametrize("backbone", DECODERS)
def test_only_what_a_score_reads_is_computed(icl, backbone):
    """A leaf's last token takes no slot and the output layer runs once per predicting slot,
    with every score still that of the whole sequence."""
    scorer = PromptScorer(icl(backbone=backbone).encoder, "a test")
    tree = Tree([5, 6, 7], [[8, 9], [10]], [[[11, 12], [13]], [[11, 12, 14], [13]]])
    assert len(tree) == 3 + (2 + 1 + 0) + (1 + 2 + 0)  # prefix, stems, leaves less their last
    rows, widths, enc = [], [], scorer.encoder
    lm_logits, hidden = enc.lm_logits, enc.hidden
    enc.lm_logits = lambda h, params=None: rows.append(len(h)) or lm_logits(h, params)
    enc.hidden = lambda inputs, params=None: (
        widths.append(inputs["input_ids"].shape) or hidden(inputs, params)
    )
    with torch.no_grad():
        sums, counts = scorer.logprobs([tree])
    assert widths == [(1, len(tree))]
    # predicting slots: 9 (both leaves' first token), 11 (12), 10 (11 and 13), 11 and 12 (12, 14)
    assert rows == [5] and counts.tolist() == [2, 1, 3, 1]
    pairs = [([8, 9], [11, 12]), ([8, 9], [13]), ([10], [11, 12, 14]), ([10], [13])]
    for score, (stem, leaf) in zip(sums, pairs, strict=True):
        assert abs(float(score) - full_sequence_logprob(enc.model, [5, 6, 7, *stem], leaf)) < 1e-4


def test_stems_share_a_tree_as_their_prefix_pays_for_it():
    """Short prefixes split many stems into small trees (attention grows with a tree's width
    squared); long ones (demonstrations) keep them together; never more than asked."""
    assert stems_per_tree(35, [30] * 25, 32) < 10
    assert stems_per_tree(2000, [30] * 25, 32) == 25
    assert 25 / 4 <= stems_per_tree(2000, [30] * 25, 8) <= 8  # as few trees as allowed
    assert stems_per_tree(0, [30] * 25, 32) == 1
    assert stems_per_tree(35, [], 32) == 1


def test_scores_do_not_depend_on_how_stems_share_trees(icl):
    scorer = PromptScorer(icl(backbone="tiny-llama").encoder, "a test")
    stems = [[8 + i, 9] for i in range(12)]
    leaves = [[11, 12], [13], [14, 15, 16]]
    with torch.no_grad():
        one = score_matrix(scorer, [5, 6], stems, leaves, 1, "sum")
        chosen = score_matrix(scorer, [5, 6], stems, leaves, 32, "sum")
        mean = score_matrix(scorer, [5, 6], stems, leaves, 32, "mean")
    assert torch.allclose(one, chosen, atol=1e-5)
    assert torch.allclose(mean * torch.tensor([2.0, 1.0, 3.0]), chosen, atol=1e-5)
    expected = full_sequence_logprob(scorer.encoder.model, [5, 6, 19, 9], [14, 15, 16])
    assert abs(float(chosen[11, 2]) - expected) < 1e-4


def test_zero_shot_prompting_reads_no_support_example(icl, episode, synthetic_task):
    algo = icl("algo.demonstrations=false", backbone="tiny-llama")
    other = fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 2, 0, "train")[1]
    moved = type(episode.support)(other.support.ids, other.support.labels, episode.classes)
    with torch.no_grad():
        first = algo.adapt(episode.support, 3)(episode.query)
        second = algo.adapt(moved, 3)(episode.query)
    assert torch.equal(first, second)
    names = algo.names(episode.classes)
    assert contexts(algo, episode.support, episode.query)[0].startswith(algo.format.prefix(names))


def test_plain_icl_trains_nothing_and_metaicl_trains_the_decoder(icl):
    assert icl().param_groups() == []
    assert icl("algo.train_lm=true").param_groups()


@pytest.mark.parametrize("backbone", DECODERS)
def test_metaicl_loss_is_the_nll_of_the_correct_label_tokens(icl, episode, backbone):
    algo = icl("algo.train_lm=true", backbone=backbone)
    loss, _ = algo.meta_loss([episode])
    names = algo.names(episode.classes)
    tok, model = algo.encoder.tokenizer, algo.encoder.model
    prefix, stems = algo.pieces(episode.support, episode.query)
    total, tokens = 0.0, 0
    for stem, label in zip(stems, episode.query.labels.tolist(), strict=True):
        cont = tok(algo.format.continuation(names[label]), add_special_tokens=False)["input_ids"]
        total -= full_sequence_logprob(model, prefix + stem, cont)
        tokens += len(cont)
    assert abs(float(loss.detach()) - total / tokens) < 1e-4
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_prompt_longer_than_the_decoder_is_a_clear_error(icl, episode):
    algo = icl()
    algo.scorer.max_positions = 20
    with pytest.raises(MetarunError, match=r"lower task\.shots"):
        algo.adapt(episode.support, 3)(episode.query)
