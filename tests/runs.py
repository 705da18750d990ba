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


def second_di4c_round(m, cfg_of, tmp_path, samples: str, key: str):
    """Round 2 (docs/method.md (35)) of a domain script `m`: the round-1 student is the mixture
    teacher and the initialisation, lambda path included; a control is refused (a mixture has no
    loss of its own). The round-2 teacher's samples must be the round-1 student's, draw for draw
    (same seeds, a lambda per draw as for a student: sampled as a product it would differ).
    cfg_of(path, **overrides) -> a smoke config writing to path; samples: a sample file under
    out_dir with "{model}" for the network; key: its tensor. Returns (round-1, round-2)
    configs."""
    import os

    import pytest
    import torch
    first = cfg_of(tmp_path / "round1")
    m.main(first)
    kw = dict(teacher_ckpt=os.path.join(first.out_dir, "student.pt"))
    with pytest.raises(SystemExit, match="--control_iters 0"):
        m.main(cfg_of(tmp_path / "bad", **kw))
    second = cfg_of(tmp_path / "round2", control_iters=0, **kw)
    m.main(second)
    log = open(os.path.join(second.out_dir, "log.txt")).read()
    assert "nothing to train" in log and "mixture (multi-round) teacher" in log
    ev = json.load(open(os.path.join(second.out_dir, "metrics.json")))["eval"]
    assert any(k.startswith("student") for k in ev) and not any("control" in k for k in ev)
    r1 = torch.load(os.path.join(first.out_dir, "student.pt"), weights_only=True)
    r2 = torch.load(os.path.join(second.out_dir, "student.pt"), weights_only=True)
    assert r2["parents"]["teacher"] == r1["id"] and (r1["lam_dim"], r2["lam_dim"]) == (1, 1)

    def drawn(cfg, model):
        path = os.path.join(cfg.out_dir, samples.format(model=model))
        return torch.load(path, weights_only=True)[key]
    assert torch.equal(drawn(second, "teacher"), drawn(first, "student"))
    assert not torch.equal(drawn(second, "teacher"), drawn(first, "teacher"))
    return first, second
