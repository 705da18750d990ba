"""Released text checkpoints (MDLM, SDTT, the Di4C authors' SDTT students) in owt_masked.py.

Golden files (tests/fixtures/README.md): the upstream networks, run once on CPU at a tiny size
with random weights, and their outputs. Here the same weights go through pretrained/mdlm.py into
our DiT, which must give the same outputs (float32, max abs difference at most 1e-5). Then the
file formats (Hugging Face safetensors, Lightning with EMA and torch.compile prefixes, a bare
state dict) load as the teacher, a released Di4C student samples and is scored beside the
teacher, and configuration mismatches stop with a one-line error. CPU, offline.
"""
import json
import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import owt_masked as m
from pretrained import mdlm
from tests.test_owt import smoke_cfg

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
ATOL = 1e-5


def fixture(name):
    return torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=True)


def our_net(fx, **kw):
    c = fx["config"]
    net = m.DiT(fx["vocab"], c["n_blocks"], c["hidden_size"], c["n_heads"], c["cond_dim"],
                c["dropout"], **kw).eval()
    weights, _ = mdlm.backbone_weights(fx["state_dict"])
    mdlm.load_into(net, weights, c["hidden_size"] // c["n_heads"])
    return net


def raw_logits(net, x, lam=None):
    """Our network's pre-SUBS logits at every position, as the upstream forward returns them."""
    with torch.no_grad():
        return net.output_layer.linear(net.trunk(x, lam))                     # (B, D, S)


def check_subs(net, x, upstream, lam=None):
    """Our forward = SUBS of the upstream logits: log-softmax with [MASK] excluded at masked
    positions, the revealed token with probability one elsewhere."""
    with torch.no_grad():
        ours = F.log_softmax(net(x, None, lam), -1)                           # (B, D, S)
    ref = upstream.clone()
    ref[..., net.mask_id] = m.NEG
    masked = x == net.mask_id
    assert (ours[masked] - F.log_softmax(ref[masked], -1)).abs().max() <= ATOL
    revealed = ours[~masked].exp()                                            # (R, S)
    assert torch.equal(revealed.argmax(-1), x[~masked]) and revealed.max(-1).values.min() == 1


def test_mdlm_dit_matches_upstream():
    fx = fixture("mdlm_dit")
    net = our_net(fx)
    diff = (raw_logits(net, fx["x"]) - fx["logits"]).abs().max().item()
    assert diff <= ATOL, diff
    assert fx["logits"].abs().max() > 1                                       # not a zero net
    assert (net.sigma_map(fx["sigma_in"]) - fx["sigma_out"]).abs().max() <= ATOL
    check_subs(net, fx["x"], fx["logits"])


def test_authors_lambda_token_student_matches_upstream():
    """sony/di4c's SDTT student: lambda as one more token without rotary (lam_inject token)."""
    fx = fixture("di4c_sdtt_dit")
    net = our_net(fx, lam_dim=1, lam_inject="token")
    lam = fx["lam"][:, None]                                                  # (B, 1)
    diff = (raw_logits(net, fx["x"], lam) - fx["logits"]).abs().max().item()
    assert diff <= ATOL, diff
    other = raw_logits(net, fx["x"], 1 - lam)                    # lambda really is an input
    assert (other - fx["logits"]).abs().max() > 1e-3
    check_subs(net, fx["x"], fx["logits"], lam)


def test_sdtt_sampler_draws_the_upstream_tokens():
    """--sampler sdtt replays the authors' MultiRoundSDTT.sample (SDTT's ancestral sampler) token
    for token under the same torch.manual_seed: the lambda-token student (a fresh lambda per
    NFE) and a plain teacher, 3 and 6 steps, 5 sequences of 8 tokens from all-[MASK]."""
    fx = fixture("sdtt_sampler")
    assert len(fx["runs"]) == 4
    for run in fx["runs"]:
        kw = dict(lam_dim=1, lam_inject="token") if run["is_di4c"] else {}
        net = our_net({**fx, "state_dict": fx["state_dicts"][run["is_di4c"]]}, **kw)
        x_T = torch.full(run["tokens"].shape, net.mask_id)
        torch.manual_seed(run["seed"])
        with torch.no_grad():
            tokens, nfe = mdlm.sdtt_sample(net, x_T, run["steps"], lam_dim=int(run["is_di4c"]))
        assert torch.equal(tokens, run["tokens"]), (run["is_di4c"], run["steps"])
        assert (tokens != net.mask_id).all() and nfe in (run["steps"], run["steps"] + 1)
    # a different seed draws different tokens (the comparison above is not vacuous)
    torch.manual_seed(run["seed"] + 1)
    with torch.no_grad():
        assert not torch.equal(mdlm.sdtt_sample(net, x_T, run["steps"])[0], run["tokens"])


def test_safetensors_reader_matches_the_library_file():
    """mdlm_dit.safetensors was written by the safetensors package from the fixture's weights
    under "backbone." (the layout of the Hugging Face model.safetensors)."""
    sd = mdlm.read_safetensors(os.path.join(FIXTURES, "mdlm_dit.safetensors"))
    ref = fixture("mdlm_dit")["state_dict"]
    assert set(sd) == {"backbone." + k for k in ref}
    assert all(torch.equal(sd["backbone." + k], v) for k, v in ref.items())


def tiny_cfg(**kw):
    fx = fixture("mdlm_dit")
    c = fx["config"]
    arch = dict(n_layer=c["n_blocks"], n_embd=c["hidden_size"], n_head=c["n_heads"],
                cond_dim=c["cond_dim"])
    return m.make_config(m.Config, preset="smoke", **{**arch, **kw})


CORPUS = SimpleNamespace(S=11, device=torch.device("cpu"))


def write_lightning(path, weights: dict, ema: dict = None):
    """A Lightning checkpoint as MDLM / SDTT save it: "backbone." and torch.compile prefixes,
    the EMA as a shadow list, and hyper-parameters of a class that is not importable here."""
    mod = types.ModuleType("absent_config_pkg")

    class DictConfig:
        def __init__(self, d):
            self.d = d
    DictConfig.__module__, DictConfig.__qualname__ = "absent_config_pkg", "DictConfig"
    mod.DictConfig = DictConfig
    sys.modules["absent_config_pkg"] = mod
    try:
        obj = {"state_dict": {"backbone._orig_mod." + k: v for k, v in weights.items()},
               "hyper_parameters": {"config": DictConfig({"model": "small"})},
               "noise": None, "global_step": 7}
        if ema is not None:
            obj["ema"] = {"decay": 0.9999, "num_updates": 7,
                          "shadow_params": [ema[k] for k in weights if k in ema]}
        torch.save(obj, path)
    finally:
        del sys.modules["absent_config_pkg"]


def test_released_formats_load_as_teacher(tmp_path):
    fx = fixture("mdlm_dit")
    sd = fx["state_dict"]
    params = {k: v for k, v in sd.items() if k != "rotary_emb.inv_freq"}
    ema = {k: v + 0.5 for k, v in params.items()}
    write_lightning(tmp_path / "mdlm.ckpt", sd, ema)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    cfg = tiny_cfg()
    for path, want in ((os.path.join(FIXTURES, "mdlm_dit.safetensors"), params),
                       (str(tmp_path / "pytorch_model.bin"), params),
                       (str(tmp_path / "mdlm.ckpt"), ema)):
        net, lam_dim, meta = m.load_model(cfg, CORPUS, path)
        got = net.state_dict()
        assert lam_dim == 0 and not net.training and len(meta["id"]) == 12
        assert all(torch.equal(got[k], v) for k, v in want.items()), path
    raw, _, _ = m.load_model(cfg, CORPUS, str(tmp_path / "mdlm.ckpt"), use_ema=False)
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in params.items())


def test_released_mismatches_stop_with_one_line(tmp_path):
    path = os.path.join(FIXTURES, "mdlm_dit.safetensors")
    with pytest.raises(SystemExit, match=r"n_layer 2 in the file vs 3 here \(--n_layer\)"):
        m.load_model(tiny_cfg(n_layer=3), CORPUS, path)
    with pytest.raises(SystemExit, match=r"S 11 in the file vs 12 here \(--remap_vocab false"):
        m.load_model(tiny_cfg(), SimpleNamespace(S=12, device=CORPUS.device), path)
    with pytest.raises(SystemExit, match="check --n_head"):
        m.load_model(tiny_cfg(n_head=4), CORPUS, path)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read"):
        m.load_model(tiny_cfg(), CORPUS, str(tmp_path / "junk.ckpt"))
    torch.save({"state_dict": {"x.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit, match="not an MDLM-style DiT"):
        m.load_model(tiny_cfg(), CORPUS, str(tmp_path / "other.ckpt"))
    two_d = {**fixture("mdlm_dit")["state_dict"], "lam_mlp.0.weight": torch.zeros(512, 256)}
    torch.save(two_d, tmp_path / "two_d.bin")                # a 2-dimensional lambda
    with pytest.raises(SystemExit, match="256 inputs: a 2-dimensional lambda"):
        m.load_model(tiny_cfg(), CORPUS, str(tmp_path / "two_d.bin"))


def as_released(our_ckpt: str, out: str, token_student: bool = False):
    """One of this script's checkpoints rewritten in a released layout (Lightning .ckpt with
    the EMA as a shadow list; the authors' "latent_projection" for a lambda-token student)."""
    state = torch.load(our_ckpt, weights_only=True)
    weights = state["model"]
    if token_student:
        weights = {k.replace("lam_token.", "latent_projection."): v for k, v in weights.items()}
    ema = state["ema"] and {k.replace("lam_token.", "latent_projection."): v
                            for k, v in state["ema"].items()}
    write_lightning(out, weights, ema)
    return state


def test_released_teacher_and_student_run_end_to_end(tmp_path):
    """The smoke pipeline from a released-layout teacher (Di4C initialised from it), then a
    released-layout lambda-token student sampled and scored beside that teacher."""
    base = smoke_cfg(tmp_path, "base", stage="teacher")
    m.main(base)
    teacher = os.path.join(str(tmp_path), "teacher.ckpt")
    as_released(os.path.join(base.out_dir, "teacher.pt"), teacher)
    run = smoke_cfg(tmp_path, "from_mdlm", teacher_ckpt=teacher, sampler="sdtt")
    m.main(run)
    ev = json.load(open(os.path.join(run.out_dir, "metrics.json")))["eval"]
    assert {"teacher_uncond_2", "student_uncond_2", "control_uncond_2"} <= set(ev)
    ours = torch.load(os.path.join(run.out_dir, "student.pt"), weights_only=True)
    assert any(k.startswith("lam_token.") for k in ours["model"])
    student = os.path.join(str(tmp_path), "sdtt-di4c.ckpt")
    as_released(os.path.join(run.out_dir, "student.pt"), student, token_student=True)
    score = smoke_cfg(tmp_path, "score", teacher_ckpt=teacher, student_ckpt=student,
                      control_iters=0, stage="sample")
    m.main(score)
    m.main(smoke_cfg(tmp_path, "score", teacher_ckpt=teacher, student_ckpt=student,
                     control_iters=0, stage="eval"))
    ev2 = json.load(open(os.path.join(score.out_dir, "metrics.json")))["eval"]
    assert {"teacher_uncond_2", "student_uncond_2"} <= set(ev2)
    with pytest.raises(SystemExit, match="--student_ckpt replaces the distill stage"):
        m.main(smoke_cfg(tmp_path, "bad", teacher_ckpt=teacher, student_ckpt=student))
    # another Di4C round from the authors' (lambda-token) student: needs their injection
    with pytest.raises(SystemExit, match="lambda-token student: add --sampler sdtt"):
        m.main(smoke_cfg(tmp_path, "r2bad", teacher_ckpt=student, control_iters=0,
                         stage="distill"))
    r2 = smoke_cfg(tmp_path, "r2", teacher_ckpt=student, control_iters=0, stage="distill",
                   sampler="sdtt")
    m.main(r2)
    assert "mixture (multi-round) teacher" in open(os.path.join(r2.out_dir, "log.txt")).read()
