"""Baselines that the benchmark scripts compare metarun against (not part of the package)."""
