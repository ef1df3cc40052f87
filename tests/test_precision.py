"""bf16 where it pays (hardware.py, backbone/lowp.py): `hardware.precision=auto` picks bf16 only
on bf16 hardware for a large backbone, and storing frozen weights in bf16 computes exactly
what autocast computed without the per-call casts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metarun.algo.inner import adapted_encoder_weights
from metarun.backbone.lowp import output_layer_in_bf16, store_frozen_in_bf16
from metarun.config import HardwareConfig
from metarun.hardware import BF16_MIN_PARAMS, choose_precision, cpu_bf16_units, setup_hardware
from metarun.task import fixed_episodes
from metarun.train.evaluate import evaluate

from .cli_helpers import FAST, metarun, run_dirs
from .conftest import seeded_algorithm


@pytest.fixture
def make(compose_cfg, synthetic_task):
    def _make(*overrides: str, backbone: str = "tiny-llama"):
        return seeded_algorithm(compose_cfg, synthetic_task, backbone, *overrides).eval()

    return _make


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


LORA_VERBALIZER = ["algo=maml", "algo.head=verbalizer", "algo.adapt=lora",
                   "backbone.trainable=none", "algo.eval_inner_steps=2"]  # fmt: skip


@pytest.mark.parametrize(("backbone", "overrides"), [
    ("tiny-llama", LORA_VERBALIZER),  # a LoRA base layer is frozen, its factors adapt
    ("tiny-llama", ["algo=icl"]),  # nothing trains
    ("tiny", ["algo=maml", "algo.adapt=top_k", "algo.top_k=1", "backbone.trainable=none"]),
])  # fmt: skip
def test_frozen_weights_in_bf16_compute_what_autocast_computed(
    make, synthetic_task, backbone, overrides
):
    episodes = fixed_episodes(synthetic_task.splits["valid"], 3, 2, 3, 2, 0, "valid")
    plain = make(*overrides, backbone=backbone)
    stored = make(*overrides, backbone=backbone)
    cast = store_frozen_in_bf16(stored.encoder.model, adapted_encoder_weights(stored))
    assert cast > 0
    # a decoder's frozen (tied) output layer gets its bf16 copy, read under autocast
    copied = output_layer_in_bf16(stored.encoder, adapted_encoder_weights(stored))
    assert copied == (backbone == "tiny-llama")
    reference = evaluate(plain, episodes, bf16_autocast)
    result = evaluate(stored, episodes, bf16_autocast)
    assert result.accuracies.tolist() == reference.accuracies.tolist()
    ep = episodes[0]
    with torch.no_grad(), bf16_autocast():
        expected = plain.adapt(ep.support, ep.way)(ep.query)
        got = stored.adapt(ep.support, ep.way)(ep.query)
    assert torch.equal(got, expected)


def test_only_frozen_unadapted_block_weights_are_stored_in_bf16(make):
    """LoRA factors, weights adapted per episode, trained weights and the tied embedding table
    (shared with the LM head) keep their float32."""
    lora = make(*LORA_VERBALIZER)
    store_frozen_in_bf16(lora.encoder.model, adapted_encoder_weights(lora))
    for name, param in lora.encoder.model.named_parameters():
        low = param.dtype == torch.bfloat16
        assert low == (".layers." in name and "lora_" not in name and "norm" not in name), name
    top = make("algo=maml", "algo.adapt=top_k", "algo.top_k=1", "backbone.trainable=none")
    adapted = adapted_encoder_weights(top)
    assert adapted
    store_frozen_in_bf16(top.encoder.model, adapted)
    params = dict(top.encoder.model.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in adapted)
    trained = make("algo=maml", "algo.adapt=head")  # backbone.trainable=all: nothing frozen
    assert store_frozen_in_bf16(trained.encoder.model, set()) == 0
    assert output_layer_in_bf16(trained.encoder, set()) == 0


def test_the_output_layer_copy_is_read_only_under_bf16_autocast_and_never_when_adapted(make):
    """The bf16 copy stands in for the cast autocast would make; in fp32, or when the output
    weight is adapted (passed in `params`), the float32 weight is read as before."""
    algo = make(*LORA_VERBALIZER)
    enc = algo.encoder
    assert output_layer_in_bf16(enc, {enc.output_name}) == 0  # an adapted output layer
    assert output_layer_in_bf16(enc, set()) == 1
    hidden = torch.randn(4, enc.model.config.hidden_size)
    weight = enc.model.get_output_embeddings().weight
    with torch.no_grad():
        assert enc.lm_logits(hidden).dtype == torch.float32  # no autocast: the float32 weight
        assert torch.equal(enc.lm_logits(hidden), hidden @ weight.T)
        with bf16_autocast():
            low = enc.lm_logits(hidden)
            expected = torch.nn.functional.linear(hidden, weight)  # autocast casts it
            adapted = enc.lm_logits(hidden, {enc.output_name: 2 * weight})
            doubled = torch.nn.functional.linear(hidden, 2 * weight)
    assert low.dtype == torch.bfloat16 and torch.equal(low, expected)
    assert torch.equal(adapted, doubled)
    enc.output_low = torch.zeros_like(enc.output_low)  # the copy, not a cast, is what is read
    with torch.no_grad(), bf16_autocast():
        assert not enc.lm_logits(hidden).any()


@pytest.mark.parametrize(("units", "params", "inner", "used"), [
    ([], BF16_MIN_PARAMS, [], "fp32"),
    (["avx512_bf16"], BF16_MIN_PARAMS - 1, [], "fp32"),
    (["avx512_bf16"], BF16_MIN_PARAMS, [], "bf16"),
    (["amx_bf16", "avx512_bf16"], 10 * BF16_MIN_PARAMS, [], "bf16"),
    # an inner loop on backbone weights: its steps would vanish in bf16's rounding
    (["amx_bf16"], 10 * BF16_MIN_PARAMS, ["layer.4.output.dense.weight"], "fp32"),
])  # fmt: skip
def test_auto_picks_bf16_where_it_pays_and_hides_nothing(monkeypatch, units, params, inner, used):
    monkeypatch.setattr("metarun.hardware.cpu_bf16_units", lambda: units)
    hw = setup_hardware(HardwareConfig())  # the schema default: auto
    assert hw.requested == "auto" and hw.precision == "fp32"  # until the model is built
    assert choose_precision(hw, params, inner) is None
    assert hw.facts()["used"] == used and hw.reason.startswith("auto: ")
    assert ("inner loop adapts" in hw.reason) == bool(inner)
    assert isinstance(hw.autocast(), torch.autocast) == (used == "bf16")
    fixed = setup_hardware(HardwareConfig(precision="fp32"))
    assert choose_precision(fixed, params, inner) is None
    assert fixed.facts() == {"requested": "fp32", "used": "fp32",
                             "why": "hardware.precision=fp32"}  # fmt: skip


def test_an_explicit_bf16_over_an_inner_loop_on_backbone_weights_is_warned(monkeypatch):
    """Asked for, bf16 is kept, with a warning: the steps are ~1e-6 relative, bf16 resolves
    4e-3 (measured on MiniLM under MAML's defaults: under 1% of the weights change at all)."""
    hw = setup_hardware(HardwareConfig(precision="bf16"))
    warning = choose_precision(hw, BF16_MIN_PARAMS, ["layer.4.output.dense.weight"])
    assert warning and "below bf16's resolution" in warning and hw.precision == "bf16"
    assert choose_precision(hw, BF16_MIN_PARAMS, []) is None


def test_cpu_bf16_units_agree_with_the_kernel_flags():
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert set(cpu_bf16_units()) <= {"amx_bf16", "avx512_bf16"} & flags


def test_bf16_run_and_auto_run_record_their_precision(tmp_path, synthetic_jsonl):
    """Training, validation and testing under bf16 with stored frozen weights end to end, with
    episodes side by side (hardware.episode_batch); the default (auto) keeps a tiny backbone in
    fp32 and says why, and ProtoNet says it adapts one episode at a time."""
    fast = [a for a in FAST if not a.startswith("backbone=")]
    (tmp_path / "bf16").mkdir()
    (tmp_path / "auto").mkdir()
    common = [*fast, f"task.path={synthetic_jsonl}", "backbone=tiny-llama", "train.steps=2",
              "hardware.episode_batch=2"]  # fmt: skip
    lora = metarun(*common, *LORA_VERBALIZER, "algo.inner_steps=1", "hardware.precision=bf16",
                   "train.meta_batch_size=2", "train.episodes_per_backward=2",
                   cwd=tmp_path / "bf16")  # fmt: skip
    assert lora.returncode == 0, lora.stderr[-3000:]
    auto = metarun(*common, "algo=protonet", cwd=tmp_path / "auto")
    assert auto.returncode == 0, auto.stderr[-3000:]
    (bf16,) = run_dirs(tmp_path / "bf16")
    summary = json.loads((bf16 / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["precision"]["used"] == "bf16"
    assert summary["precision"]["frozen_weights_in_bf16"] > 0
    assert summary["precision"]["warning"] is None  # LoRA factors adapt, not base weights
    assert summary["episode_batch"] == {"requested": 2, "side_by_side": True}
    (fp32,) = run_dirs(tmp_path / "auto")
    auto_summary = json.loads((fp32 / "summary.json").read_text())
    assert auto_summary["episode_batch"] == {"requested": 2, "side_by_side": False}
    precision = auto_summary["precision"]
    assert precision["requested"] == "auto" and precision["used"] == "fp32"
    assert precision["frozen_weights_in_bf16"] == 0 and precision["why"].startswith("auto: ")


def test_run_precision_facts_name_the_inner_loop_on_backbone_weights(make):
    """What summary.json records: LoRA factors adapting is no reason for fp32; a top-k inner
    loop under an explicit bf16 is kept but warned of, and its adapted weights stay float32."""
    from metarun.experiment import set_precision

    lora = make(*LORA_VERBALIZER)
    facts = set_precision(setup_hardware(HardwareConfig(precision="bf16")), lora, 10**9)
    assert facts["used"] == "bf16" and facts["warning"] is None
    assert facts["frozen_weights_in_bf16"] > 0
    top = make("algo=maml", "algo.adapt=top_k", "algo.top_k=1", "backbone.trainable=none")
    facts = set_precision(setup_hardware(HardwareConfig(precision="bf16")), top, 10**9)
    assert "inner loop adapts" in facts["warning"]
    params = dict(top.encoder.model.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in adapted_encoder_weights(top))
