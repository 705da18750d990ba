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


def second_di4c_round(m, cfg_of, tmp_path, samples: str, key: str):
    """Round 2 (docs/method.md (35)) of a domain script `m`: the round-1 student is the mixture
    teacher and the initialisation, lambda path included; a control is refused (a mixture has no
    loss of its own). The round-2 teacher's samples must be the round-1 student's, draw for draw
    (same seeds, a lambda per draw as for a student: sampled as a product it would differ).
    cfg_of(path, **overrides) -> a smoke config writing to path; samples: a sample file under
    out_dir with "{model}" for the network; key: its tensor. Round 1 trains a student with a
    2-dimensional lambda (--lam_dim 2), round 2 one with k = 1 from it: the checkpoint carries k,
    the mixture teacher draws 2-d lambdas. Returns (round-1, round-2) configs."""
    import os

    import pytest
    import torch
    first = cfg_of(tmp_path / "round1", lam_dim=2)
    m.main(first)
    kw = dict(teacher_ckpt=os.path.join(first.out_dir, "student.pt"))
    with pytest.raises(SystemExit, match="--control_iters 0"):
        m.main(cfg_of(tmp_path / "bad", **kw))
    with pytest.raises(SystemExit, match="2-dimensional lambda .* pass --lam_dim 2"):
        m.main(cfg_of(tmp_path / "bad_k", control_iters=0, lam_dim=1, **kw))
    second = cfg_of(tmp_path / "round2", control_iters=0, lam_dim=2, **kw)
    m.main(second)
    log = open(os.path.join(second.out_dir, "log.txt")).read()
    assert "nothing to train" in log and "mixture (multi-round) teacher" in log
    ev = json.load(open(os.path.join(second.out_dir, "metrics.json")))["eval"]
    assert any(k.startswith("student") for k in ev) and not any("control" in k for k in ev)
    r1 = torch.load(os.path.join(first.out_dir, "student.pt"), weights_only=True)
    r2 = torch.load(os.path.join(second.out_dir, "student.pt"), weights_only=True)
    assert r2["parents"]["teacher"] == r1["id"] and (r1["lam_dim"], r2["lam_dim"]) == (2, 2)

    def drawn(cfg, model):
        path = os.path.join(cfg.out_dir, samples.format(model=model))
        return torch.load(path, weights_only=True)[key]
    assert torch.equal(drawn(second, "teacher"), drawn(first, "student"))
    assert not torch.equal(drawn(second, "teacher"), drawn(first, "teacher"))
    return first, second
