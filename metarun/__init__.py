"""metarun: config-driven meta-learning experiments on transformer language models."""

__version__ = "0.1.0"
