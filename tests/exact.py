"""Brute-force references for the core's exact tests: every joint state of a tiny problem enumerated."""
import itertools

import torch


def all_states(D: int, S: int) -> torch.Tensor:
    """Every configuration of D dimensions with S states: (S**D, D) long, first dimension slowest."""
    return torch.tensor(list(itertools.product(range(S), repeat=D)), dtype=torch.long)


def state_index(x: torch.Tensor, S: int) -> torch.Tensor:
    """Inverse of all_states: (N, D) long -> (N,) row index."""
    D = x.shape[-1]
    weights = S ** torch.arange(D - 1, -1, -1, device=x.device)
    return (x * weights).sum(-1)


def random_joint(n: int, generator: torch.Generator, power: float = 4.0) -> torch.Tensor:
    """A random, skewed distribution over n states (so dimensions are correlated). (n,) float64."""
    p = torch.rand(n, generator=generator, dtype=torch.float64) ** power + 1e-3
    return p / p.sum()


def marginals(pi: torch.Tensor, states: torch.Tensor, S: int) -> torch.Tensor:
    """Per-dimension marginals of a joint over `states`: (D, S) float64."""
    D = states.shape[1]
    out = torch.zeros(D, S, dtype=torch.float64)
    for d in range(D):
        out[d].index_add_(0, states[:, d], pi)
    return out


def entropy(p: torch.Tensor) -> torch.Tensor:
    p = p[p > 0]
    return -(p * p.log()).sum()


def total_correlation(pi: torch.Tensor, states: torch.Tensor, S: int) -> torch.Tensor:
    return sum(entropy(m) for m in marginals(pi, states, S)) - entropy(pi)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    pos = p > 0
    return (p[pos] * (p[pos].log() - q[pos].log())).sum()


def product_joint(log_p: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Joint of a product model with per-dimension log-probs log_p (D, S) on `states`: (N,) float64."""
    D = states.shape[1]
    return log_p.double()[torch.arange(D), states].sum(-1).exp()


class TableDenoiser:
    """A denoiser that looks its logits up in a table indexed by the whole x_t.

    table: (K, S_in**D, D, S_out) logits for K mixture components. lambda in [k/K, (k+1)/K) picks
    component k, so the lambda-mixture is exactly the uniform mixture of the K components and
    every expectation over lambda can be enumerated. K = 1 is a product model.
    """

    def __init__(self, table: torch.Tensor, S_in: int):
        self.table, self.S_in = table, S_in

    def __call__(self, x, t, lam, cond=None):
        K = self.table.shape[0]
        comp = torch.zeros(x.shape[0], dtype=torch.long) if lam is None else \
            (lam[:, 0] * K).long().clamp(max=K - 1)
        return self.table[comp, state_index(x, self.S_in)]

    def component_log_probs(self, x_row: torch.Tensor) -> torch.Tensor:
        """log p_c^d(. | x) for every component c: (K, D, S_out) float64."""
        idx = state_index(x_row[None], self.S_in)[0]
        return self.table[:, idx].double().log_softmax(-1)
