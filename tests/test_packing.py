"""Padding-free batches: packed rows give every text the embeddings (and gradients) of a
padded batch, with fewer token slots."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from metarun.backbone import load_backbone, second_order_attention
from metarun.backbone.packing import pack_rows
from metarun.checks import check_config
from metarun.errors import MetarunError

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
TEXTS = [" ".join(WORDS[: 1 + (i * 3) % len(WORDS)]) for i in range(20)]


def _encoder(compose_cfg, *overrides: str, backbone: str = "tiny"):
    torch.manual_seed(0)
    cfg = compose_cfg(f"backbone={backbone}", "backbone.packing=always", *overrides)
    enc = load_backbone(OmegaConf.to_object(cfg).backbone)
    enc.set_texts(TEXTS)
    return enc.eval()


def _padded(encoder, ids, **kw):
    encoder.table.packing, encoder.table.length_buckets = "never", 1
    try:
        return encoder(ids, **kw)
    finally:
        encoder.table.packing = "always"


def test_rows_hold_every_text_once_within_capacity():
    lengths = [7, 3, 9, 1, 4, 4, 8, 2, 9, 5]
    rows = pack_rows(lengths, 9)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 9 for row in rows)
    assert len(rows) == 6  # 52 tokens: ceil(52 / 9) = 6 rows, no more


ARCHS = {
    "bert": [],
    "roberta": ["+backbone.arch.pad_token_id=1", "backbone.arch.model_type=roberta"],
    "distilbert": [
        "backbone.arch.model_type=distilbert",
        "+backbone.arch.dim=32",
        "+backbone.arch.n_layers=2",
        "+backbone.arch.n_heads=2",
        "+backbone.arch.hidden_dim=64",
    ],
    "electra": ["backbone.arch.model_type=electra", "+backbone.arch.embedding_size=32"],
    "bert-eager": ["+backbone.arch._attn_implementation=eager"],
}
# Decoders: a causal block-diagonal mask; each text's first token sits at position 0.
DECODER_ARCHS = {
    "llama": ("tiny-llama", []),
    "gpt2": ("tiny-gpt2", []),
    "llama-eager": ("tiny-llama", ["+backbone.arch._attn_implementation=eager"]),
}
CASES = [(a, p) for a in ARCHS for p in ("mean", "cls")] + [
    (a, p) for a in DECODER_ARCHS for p in ("mean", "last")
]


@pytest.mark.parametrize(("arch", "pooling"), CASES)
def test_packed_equals_padded_with_gradients(compose_cfg, arch, pooling):
    backbone, overrides = DECODER_ARCHS.get(arch, ("tiny", ARCHS.get(arch)))
    enc = _encoder(compose_cfg, f"backbone.pooling={pooling}", *overrides, backbone=backbone)
    assert enc.table.packs(), f"{arch} should pack"
    ids = torch.randperm(len(TEXTS))
    packed = enc.table.packed(ids, enc.additive_mask_dtype())
    padded_slots = len(ids) * int(enc.table.lengths[ids].max())
    assert packed.inputs["input_ids"].numel() < 0.7 * padded_slots  # the padding is gone
    weights = [p for n, p in enc.model.named_parameters() if "weight" in n and p.dim() == 2]
    out_packed, out_padded = enc(ids), _padded(enc, ids)
    assert torch.allclose(out_packed, out_padded, atol=1e-5)
    # A random direction: the squared norm of a layer-normed output would have ~zero gradient.
    probe = torch.randn(out_packed.shape, generator=torch.Generator().manual_seed(0))
    g_packed = torch.autograd.grad((out_packed * probe).sum(), weights, allow_unused=True)
    g_padded = torch.autograd.grad((out_padded * probe).sum(), weights, allow_unused=True)
    for a, b in zip(g_packed, g_padded, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_packed_second_order_gradient_equals_padded(tiny_encoder):
    """The double backward that second-order MAML takes through attention sees the mask as a
    constant: a gradient of a gradient is the padded one."""
    tiny_encoder.set_texts(TEXTS)
    tiny_encoder.eval()
    tiny_encoder.table.packing = "always"
    ids = torch.arange(12)
    weight = tiny_encoder.model.get_parameter("encoder.layer.0.attention.self.query.weight")

    def grad_of_grad(forward):
        out = forward()
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        (g,) = torch.autograd.grad((out * probe).sum(), weight, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), weight)[0]

    with second_order_attention():
        packed = grad_of_grad(lambda: tiny_encoder(ids))
        padded = grad_of_grad(lambda: _padded(tiny_encoder, ids))
    assert packed.abs().sum() > 0 and torch.allclose(packed, padded, atol=1e-5, rtol=1e-4)


def test_packed_with_an_episode_vocabulary_table(tiny_encoder):
    tiny_encoder.set_texts(TEXTS)
    tiny_encoder.eval()
    tiny_encoder.table.packing = "always"
    ids = torch.tensor([3, 0, 7, 11])
    vocab = tiny_encoder.local_vocab(ids)
    name = "embeddings.word_embeddings.weight"
    table = tiny_encoder.model.get_parameter(name)
    cut = tiny_encoder(ids, params={name: table[vocab]}, vocab=vocab)
    assert torch.allclose(cut, _padded(tiny_encoder, ids), atol=1e-5)


def test_packing_auto_only_where_it_pays(compose_cfg, tiny_encoder):
    """auto packs on CPU for models at least 256 wide; a narrow model is bound by per-operator
    overhead, which packing adds to (the tiny BERT's MAML ran 1.5x slower packed)."""
    assert tiny_encoder.table.packing == "auto" and tiny_encoder.table.pack_start == 0
    assert not tiny_encoder.table.packs()
    tiny_encoder.table.dim = 384  # only the width decides
    assert tiny_encoder.table.packs()
    tiny_encoder.table.packing = "never"
    assert not tiny_encoder.table.packs()
    cfg = compose_cfg("backbone=tiny-gpt2")
    assert load_backbone(OmegaConf.to_object(cfg).backbone).table.pack_start == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["backbone=tiny", "backbone.packing=yes"], "backbone.packing=yes; use one of auto"),
        (
            ["backbone=tiny", "backbone.packing=always", "backbone.arch.model_type=mpnet"],
            "backbone.packing=always: .* mpnet",
        ),
    ],
)
def test_bad_packing_is_one_clear_error(compose_cfg, overrides, message):
    cfg = compose_cfg(*overrides)
    with pytest.raises(MetarunError, match=message):
        check_config(cfg)  # a value outside the choices: before anything loads
        load_backbone(OmegaConf.to_object(cfg).backbone)  # a model that cannot pack
