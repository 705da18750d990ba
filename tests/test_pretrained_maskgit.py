"""MaskGIT-pytorch's transformer and sampler, and the Di4C authors' MaskGIT student, in
imagenet_masked.py, against golden files made from the upstream code (tests/fixtures/README.md).

Network: the fixture's random weights through pretrained/maskgit.py into our MaskTransformer
give the upstream logits (float32, max abs difference at most 1e-5). Sampler: --sampler maskgit
(valeoai's sample()) and --sampler di4c (the authors' modified copy), given a torch generator and a numpy RandomState seeded as upstream's global RNGs
were, draws exactly the tokens upstream's MaskGIT.sample drew (teacher with CFG; the authors'
student with a fresh lambda per step). CPU, offline, seconds.
"""
import os

import numpy as np
import pytest
import torch

import imagenet_masked as m
from pretrained import maskgit
from pretrained.maskgit import maskgit_to_ours

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
ATOL = 1e-5


def load(name):
    fx = torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=True)
    c = fx["config"]
    K, D = c["codebook_size"], (c["img_size"] // 16) ** 2
    lam_dim = 1 if fx["lam"] is not None else 0
    net = m.MaskTransformer(K, D, c["nclass"], c["depth"], c["hidden_dim"], c["heads"],
                            c["mlp_dim"], c["dropout"], lam_dim, "token").eval()
    net.load_state_dict(maskgit_to_ours(fx["state_dict"]))                  # strict
    return fx, net, lam_dim


@pytest.mark.parametrize("name", ["maskgit_v1", "di4c_maskgit_student"])
def test_network_matches_upstream(name):
    fx, net, lam_dim = load(name)
    y = torch.where(fx["drop"], net.n_classes, fx["y"])              # dropped class = n_classes
    with torch.no_grad():
        ours = net.raw_logits(fx["x"], fx["lam"], y)                          # (N, D, K + 1)
    diff = (ours - fx["logits"]).abs().max().item()
    assert diff <= ATOL, diff
    assert fx["logits"].abs().max() > 1
    if lam_dim:                                                   # lambda is really an input
        with torch.no_grad():
            other = net.raw_logits(fx["x"], 1 - fx["lam"], y)
        assert (other - fx["logits"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["maskgit_v1", "di4c_maskgit_student"])
def test_upstream_sampler_draws_upstreams_tokens(name):
    fx, net, lam_dim = load(name)
    s = fx["sample"]
    variant = "di4c" if name.startswith("di4c") else "maskgit"
    sche = (maskgit.upstream_schedule(s["step"], net.D) if variant == "maskgit"
            else m.reveal_counts(s["step"], net.D))
    g = torch.Generator().manual_seed(s["seed"])
    rng = np.random.RandomState(s["seed"])
    codes = maskgit.sample(net, lam_dim, s["labels"], sche, s["w"], s["sm_temp"], s["r_temp"], g,
                           rng, variant=variant)
    assert torch.equal(codes, s["codes"])
    other = maskgit.sample(net, lam_dim, s["labels"], sche, s["w"], s["sm_temp"], s["r_temp"],
                           torch.Generator().manual_seed(s["seed"] + 1),
                           np.random.RandomState(s["seed"] + 1), variant=variant)
    assert not torch.equal(other, s["codes"])                       # the draws matter


def test_upstream_schedule():
    """MaskGIT-pytorch's arccos schedule: sums to D, at least one token per step, 1 step refused;
    one case by hand. (The golden-file sampler test checks it at the fixture's sizes.)"""
    # arccos(r) / (pi / 2) at r = 1, 2/3, 1/3, 0: 0, 0.5354, 0.7837, 1 (sum 2.3191); x 16 / sum:
    # 0, 3.69, 5.41, 6.90, rounded 0, 4, 5, 7; the 0 raised to 1; the last gives back the excess
    assert maskgit.upstream_schedule(4, 16) == [1, 4, 5, 6]
    assert maskgit.upstream_schedule(12, 256)[0] == 1
    assert sum(maskgit.upstream_schedule(12, 256)) == 256
    assert all(n >= 1 and sum(maskgit.upstream_schedule(k, 16)) == 16
               for k in range(2, 9) for n in maskgit.upstream_schedule(k, 16))
    with pytest.raises(SystemExit, match="2 or more steps"):
        maskgit.upstream_schedule(1, 16)
    with pytest.raises(SystemExit, match="cannot reveal 16 tokens"):
        maskgit.upstream_schedule(19, 16)


def test_released_checkpoints_load_through_load_model(tmp_path):
    """MaskGIT-pytorch's file layout ({"model_state_dict": ...}) through load_model: the
    teacher as a product model, the authors' student recognised by its lambda token."""
    for name, want_lam in (("maskgit_v1", 0), ("di4c_maskgit_student", 1)):
        fx = torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=True)
        c = fx["config"]
        path = str(tmp_path / f"{name}.pth")
        torch.save({"model_state_dict": fx["state_dict"]}, path)
        cfg = m.make_config(m.Config, preset="smoke", n_layer=c["depth"], n_embd=c["hidden_dim"],
                            n_head=c["heads"], mlp_dim=c["mlp_dim"])
        meta = {"K": c["codebook_size"], "grid": c["img_size"] // 16, "n_classes": c["nclass"]}
        net, lam_dim, info = m.load_model(cfg, meta, path, torch.device("cpu"))
        assert lam_dim == want_lam and info["parents"] == {} and not net.training
        y = torch.where(fx["drop"], net.n_classes, fx["y"])
        with torch.no_grad():
            assert (net.raw_logits(fx["x"], fx["lam"], y) - fx["logits"]).abs().max() <= ATOL
