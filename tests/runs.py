"""Helpers for the end-to-end tests of the domain scripts."""
import json

TIMING_KEYS = {"wall_seconds", "latency", "train_seconds", "sec_per_step", "peak_mem_gb", "mem_start_gb"}


def metrics_without_timings(path) -> dict:
    """metrics.json without wall-clock numbers: two identical runs must agree on the rest."""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in TIMING_KEYS}
        return v
    return strip(json.load(open(path)))


def late_fusion_against_every_row(net, forward, monkeypatch, seen: list, mask=None):
    """Late fusion: forward() (-> output) and the backward of the logsumexp of its rows `mask`
    (all without), as the network runs (trunk once per distinct row), then again with
    torch.unique_consecutive replaced by the identity (every row through the trunk). Every
    gradient must agree (relative 1e-4). seen: the list the test's forward hooks append row
    counts to; returns (output, output with every row, gradients, the first run's row counts)."""
    import torch

    def run():
        net.zero_grad()
        out = forward()
        (out if mask is None else out[mask]).logsumexp(-1).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    out, grads = run()
    first = list(seen)
    with monkeypatch.context() as mp:
        mp.setattr(torch, "unique_consecutive",
                   lambda x, dim, return_inverse: (x, torch.arange(len(x))))
        ref, ref_grads = run()
    for n in grads:
        assert (grads[n] - ref_grads[n]).norm() <= 1e-4 * ref_grads[n].norm() + 1e-6, n
    return out, ref, grads, first
