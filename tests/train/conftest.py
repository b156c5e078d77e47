import pytest
import torch

from nanosae.data import write_store


def planted(n_tokens: int, d_in: int = 32, n_features: int = 64, active: int = 3, noise: float = 0.01, seed: int = 0):
    """x = sparse positive codes @ a known unit-norm dictionary + noise."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_features, generator=g)[:active] for _ in range(n_tokens)])
    mags = torch.rand(n_tokens, active, generator=g) * 2 + 0.5
    codes = torch.zeros(n_tokens, n_features).scatter(1, idx, mags)
    x = codes @ D + 0.3 + noise * torch.randn(n_tokens, d_in, generator=g)  # a shared offset for b_dec to find
    return x, D


@pytest.fixture(scope="session")
def planted_store(tmp_path_factory):
    x, D = planted(40_000)
    store = write_store(
        tmp_path_factory.mktemp("planted") / "acts",
        x,
        hook="blocks.0.hook_resid_post",
        model="synthetic",
        tokens_per_shard=8192,
    )
    return store, D
