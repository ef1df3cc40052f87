"""In-context learning on a tiny random GPT-2: the prompt format, and what gets scored."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from metarun.algo import build_algorithm
from metarun.algo.icl import PromptFormat
from metarun.backbone import load_backbone
from metarun.errors import MetarunError
from metarun.task import fixed_episodes


@pytest.fixture
def icl(compose_cfg, synthetic_task):
    def _make(*overrides: str):
        cfg = compose_cfg("backbone=tiny-gpt2", "algo=icl", *overrides)
        torch.manual_seed(0)
        encoder = load_backbone(OmegaConf.to_object(cfg).backbone)
        encoder.set_texts(synthetic_task.texts)
        algo = build_algorithm(cfg.algo, encoder, 3)
        algo.prepare(synthetic_task)
        return algo.eval()

    return _make


@pytest.fixture
def episode(synthetic_task):
    return fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 1, 0, "train")[0]


def test_prompt_format_round_trips():
    fmt = PromptFormat("Input: {text}\nLabel: {label}", "\n\n")
    demos = [("my card was  charged\ntwice", "card payment fee"), ("where is my money", "transfer")]
    context = fmt.context(demos, "how do I top up?")
    assert context.endswith("Input: how do I top up?\nLabel:")
    parsed, query = fmt.parse(context)
    assert parsed == [(fmt.clean(t), fmt.clean(lab)) for t, lab in demos]
    assert query == "how do I top up?"
    assert fmt.continuation("transfer") == " transfer"  # the template's space goes with the label
    with pytest.raises(MetarunError, match=r"algo\.template"):
        PromptFormat("{label} is the label of {text}", "\n")


def test_each_label_is_scored_as_the_continuation_of_the_same_prompt(icl, episode):
    algo = icl()
    contexts = algo.contexts(episode.support, episode.query)
    names = algo.names(episode.support.classes)
    assert len(contexts) == len(episode.query)
    demos, query = algo.format.parse(contexts[0])
    assert len(demos) == len(episode.support) and {lab for _, lab in demos} == set(names)
    assert query == algo.format.clean(algo.encoder.texts[int(episode.query.ids[0])])
    # Batched scoring equals scoring each full sequence alone with the plain LM head.
    conts = [algo.format.continuation(n) for n in names]
    with torch.no_grad():
        sums, counts = algo.logprobs([contexts[0]] * len(conts), conts)
    tok, model = algo.encoder.tokenizer, algo.encoder.model
    for k, cont in enumerate(conts):
        ctx_ids = tok(contexts[0], add_special_tokens=False)["input_ids"]
        cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
        assert tok.decode(cont_ids).strip() == names[k]  # what is scored is the label name
        with torch.no_grad():
            logp = model(torch.tensor([ctx_ids + cont_ids])).logits.log_softmax(-1)[0]
        expected = sum(float(logp[len(ctx_ids) + j - 1, t]) for j, t in enumerate(cont_ids))
        assert abs(float(sums[k]) - expected) < 1e-4 and int(counts[k]) == len(cont_ids)
    with torch.no_grad():
        logits = algo.adapt(episode.support, 3)(episode.query)
    assert logits.shape == (len(episode.query), 3)


def test_plain_icl_trains_nothing_and_metaicl_trains_the_decoder(icl):
    assert icl().param_groups() == []
    assert icl("algo.train_lm=true").param_groups()


def test_a_prompt_longer_than_the_decoder_is_a_clear_error(icl, episode):
    algo = icl()
    algo.max_positions = 20
    with pytest.raises(MetarunError, match=r"lower task\.shots"):
        algo.adapt(episode.support, 3)(episode.query)
