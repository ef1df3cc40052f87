"""The encoder: one-time tokenisation, pooling, functional parameter overrides, eval cache."""

from __future__ import annotations

import pytest
import torch

from metarun.backbone import load_backbone, set_trainable
from metarun.config import BackboneConfig
from metarun.errors import MetarunError

TEXTS = ["short text", "a much longer text with many more tokens in it than the first", "third"]


def test_embeddings_do_not_depend_on_batch_padding(tiny_encoder):
    tiny_encoder.set_texts(TEXTS)
    tiny_encoder.eval()
    alone = tiny_encoder(torch.tensor([0]))
    batched = tiny_encoder(torch.tensor([0, 1]))
    assert alone.shape == (1, tiny_encoder.dim)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


def test_cls_and_mean_pooling_differ(tiny_encoder):
    tiny_encoder.set_texts(TEXTS)
    tiny_encoder.eval()
    mean = tiny_encoder(torch.tensor([1]))
    tiny_encoder.pooling = "cls"
    assert not torch.allclose(mean, tiny_encoder(torch.tensor([1])))


def test_tokenised_once_and_truncated(tiny_encoder):
    tiny_encoder.set_texts(TEXTS * 3)
    assert tiny_encoder.table.tokens.shape[0] == 9
    assert int(tiny_encoder.table.lengths.max()) <= tiny_encoder.max_length
    batch = tiny_encoder.table.batch(torch.tensor([0, 2]))
    assert batch["input_ids"].shape[1] == int(tiny_encoder.table.lengths[[0, 2]].max())


def test_truncated_fraction_counts_exactly_the_texts_cut(tiny_encoder):
    limit = tiny_encoder.max_length
    words = [" ".join(["word"] * n) for n in (1, limit - 2, limit - 1, limit, 3 * limit)]
    tiny_encoder.set_texts(words)
    full = tiny_encoder.tokenizer(words, return_length=True)["length"]  # untruncated reference
    assert full[1] == limit  # [CLS] + limit-2 words + [SEP]: fills max_length, is not cut
    assert tiny_encoder.table.truncated_fraction == sum(n > limit for n in full) / len(words) == 0.6


def test_functional_params_override_without_touching_the_module(tiny_encoder):
    tiny_encoder.set_texts(TEXTS)
    tiny_encoder.eval()
    ids = torch.tensor([0, 1])
    base = tiny_encoder(ids)
    name, weight = next(
        (n, p) for n, p in tiny_encoder.model.named_parameters() if "dense.weight" in n
    )
    before = weight.detach().clone()
    changed = tiny_encoder(ids, params={name: weight + torch.randn_like(weight)})
    assert not torch.allclose(base, changed)
    assert torch.equal(weight, before)
    assert torch.allclose(tiny_encoder(ids), base)


def test_cache_matches_direct_encoding_and_is_bypassed_by_params(tiny_encoder):
    tiny_encoder.set_texts(TEXTS)
    tiny_encoder.eval()
    direct = tiny_encoder(torch.tensor([2, 0]))
    name, weight = next(iter(tiny_encoder.model.named_parameters()))
    with torch.no_grad(), tiny_encoder.cached(torch.tensor([0, 2, 2])):
        assert torch.allclose(tiny_encoder(torch.tensor([2, 0])), direct, atol=1e-6)
        with pytest.raises(RuntimeError, match="outside the evaluation cache"):
            tiny_encoder(torch.tensor([1]))
        tiny_encoder(torch.tensor([1]), params={name: weight})  # adapted calls are computed
    assert tiny_encoder.cache.values is None


def test_top_k_trains_only_the_last_layers(tiny_encoder):
    model = tiny_encoder.model
    set_trainable(model, "top_k", 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layer.1." in n for n in trainable)
    set_trainable(model, "none", 0)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(MetarunError, match=r"backbone\.top_k=5"):
        set_trainable(model, "top_k", 5)


def test_offline_hub_id_fails_with_the_fix():
    with pytest.raises(MetarunError) as err:
        load_backbone(BackboneConfig(path="bert-base-uncased"))
    assert "backbone=minilm" in str(err.value) and "backbone.path=/local/dir" in str(err.value)


def test_minilm_loads_from_the_package(compose_cfg):
    from omegaconf import OmegaConf

    enc = load_backbone(OmegaConf.to_object(compose_cfg()).backbone)
    assert enc.dim == 384 and sum(p.numel() for p in enc.parameters()) > 20e6
    enc.set_texts(["I lost my card", "my card is gone", "what is the weather"])
    enc.eval()
    with torch.no_grad():
        e = torch.nn.functional.normalize(enc(torch.tensor([0, 1, 2])), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2]  # real pretrained weights: paraphrases are closer


def _mixed_lengths(n: int) -> list[str]:
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    return [" ".join(words[: 1 + (i * 7) % len(words)]) for i in range(n)]


def test_length_groups_give_the_same_embeddings_in_the_callers_order(tiny_encoder):
    """Forwarding texts in groups of similar length only removes padding: same results, same
    order, gradients included."""
    tiny_encoder.set_texts(_mixed_lengths(24))
    tiny_encoder.eval()
    tiny_encoder.table.pack_start = None  # groups are for models that cannot be packed
    ids = torch.randperm(24)
    tiny_encoder.table.length_buckets = 1
    whole = tiny_encoder(ids)
    tiny_encoder.table.length_buckets = 3
    groups = tiny_encoder.table.length_groups(ids)
    assert len(groups) == 3 and sorted(torch.cat(groups).tolist()) == list(range(24))
    widths = [int(tiny_encoder.table.lengths[ids[g]].max()) for g in groups]
    assert widths == sorted(widths) and widths[0] < widths[-1]  # short texts pad less
    grouped = tiny_encoder(ids)
    assert torch.allclose(whole, grouped, atol=1e-5)
    weight = next(p for n, p in tiny_encoder.model.named_parameters() if "dense.weight" in n)
    grads = []
    for buckets in (1, 3):
        tiny_encoder.table.length_buckets = buckets
        (g,) = torch.autograd.grad(tiny_encoder(ids).pow(2).sum(), weight)
        grads.append(g)
    assert torch.allclose(*grads, atol=1e-5)
    assert len(tiny_encoder.table.length_groups(ids[:10])) == 1  # groups keep at least 8 texts


def test_automatic_length_groups_only_for_models_wide_enough_to_gain(tiny_encoder):
    """Grouping pays on CPU for wide models (fewer padded FLOPs); a narrow model is overhead-
    bound and a GPU is launch-bound, so there the automatic choice is one group."""
    tiny_encoder.set_texts(_mixed_lengths(24))
    tiny_encoder.table.length_buckets = 0
    ids = torch.arange(24)
    assert tiny_encoder.dim < 256 and len(tiny_encoder.table.length_groups(ids)) == 1
    tiny_encoder.table.dim = 384  # only the width decides
    assert len(tiny_encoder.table.length_groups(ids)) == 2


def test_episode_vocabulary_table_gives_the_full_tables_embeddings(tiny_encoder):
    """An embedding table cut to an episode's tokens (`vocab`) encodes those texts exactly as
    the whole table does; the padding row keeps its index."""
    tiny_encoder.set_texts(TEXTS)
    tiny_encoder.eval()
    ids = torch.tensor([0, 2])
    vocab = tiny_encoder.local_vocab(ids)
    assert vocab[0] == 0 and bool((vocab[1:] > vocab[:-1]).all())
    assert len(vocab) < tiny_encoder.model.get_input_embeddings().num_embeddings // 100
    name = "embeddings.word_embeddings.weight"
    table = tiny_encoder.model.get_parameter(name)
    cut = tiny_encoder(ids, params={name: table[vocab]}, vocab=vocab)
    assert torch.allclose(cut, tiny_encoder(ids), atol=1e-6)
