"""Shared fixtures: a tiny random model and a small synthetic benchmark, built once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Tiny models are dominated by per-op overhead: one thread is much faster than two here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from obliviate.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def small_bench(tmp_path_factory):
    from obliviate.data.synthetic import SyntheticConfig, generate_benchmark, write_benchmark

    cfg = SyntheticConfig(n_entities=6, facts_per_entity=3, forget_fraction=0.34, seed=0)
    return write_benchmark(generate_benchmark(cfg), tmp_path_factory.mktemp("bench") / "bench", cfg)


@pytest.fixture(autouse=True)
def _private_registry(tmp_path, monkeypatch):
    # Tests never write to the user's run registry.
    monkeypatch.setenv("OBLIVIATE_REGISTRY", str(tmp_path / "runs.db"))
