"""Golden-file equivalence with the upstream image networks whose checkpoints we load.

tests/fixtures/tauldr_unet.pt, tauldr_di4c_student.pt and taming_vqgan.pt were made by
make_image_fixtures.py from andrew-cr/tauLDR, the Di4C authors' tauLDR copy (their student) and
valeoai/Maskgit-pytorch (its taming VQGAN): tiny networks with random weights
(stored in float8, exact in float32), fixed inputs and the upstream outputs. Each test writes the
state dict in the upstream checkpoint layout to a file, loads it with our loader
(cifar10_gaussian.load_net -> pretrained/tauldr.py; pretrained/taming_vqgan.load_vqgan, sizes
read off the state dict), runs our network at the same size in float32 on CPU and checks, max abs
difference <= 1e-5:
- tauLDR (EMA weights, and the raw net.* weights via tauldr_to_ours(ema=False)): the U-Net's
  output before the logistic head, and our head on upstream's U-Net output against upstream's
  logits (see check_tauldr for why the two are checked apart);
- VQGAN: quant_conv(encoder(image)), the code indices (exactly equal) and decode(code grid).
"""
import os

import pytest
import torch

import cifar10_gaussian as cg
from pretrained import taming_vqgan, tauldr

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOL = 1e-5


def fixture(name: str) -> dict:
    fx = torch.load(os.path.join(FIXTURES, name), weights_only=True)
    to32 = lambda v: v.float() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    fx["state_dict"] = {k: [to32(x) for x in v] if isinstance(v, list) else to32(v)
                        for k, v in fx["state_dict"].items()}
    return fx


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str):
    assert ours.shape == theirs.shape, what
    assert theirs.abs().max() > 0.1, f"{what}: trivial upstream output"
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"{what}: max abs difference {diff:.3g} > {TOL}"


def tauldr_net(tmp_path):
    fx = fixture("tauldr_unet.pt")
    c = fx["config"]
    C, H, _ = c["shape"]
    path = str(tmp_path / "ckpt_0000001234.pt")
    torch.save({"model": fx["state_dict"], "n_iter": 1234}, path)      # tauLDR's checkpoint file
    cfg = cg.make_config(cg.Config, S=c["S"], ch=c["ch"], ch_mult=tuple(c["ch_mult"]),
                         num_res_blocks=c["num_res_blocks"], dropout=c["dropout"],
                         attn_res=(H // 2 ** c["scale_count_to_put_attn"],), teacher_ckpt=path)
    net, st = cg.load_net(cfg, "teacher", C, H, False, "cpu")
    assert st["format"] == "tauLDR (EMA weights)"
    return fx, net


def run_tauldr(net, fx) -> tuple:
    """Our U-Net on the fixture's x_t, t (lambda for a student): (logits, output before the
    head, centred x)."""
    seen = {}
    hooks = [net.out.register_forward_hook(lambda mod, inp, out: seen.update(raw=out)),
             net.conv_in.register_forward_pre_hook(lambda mod, inp: seen.update(x=inp[0]))]
    lam = fx.get("lam")
    with torch.no_grad():
        logits = net(fx["x"], fx["t"], None if lam is None else lam[:, None])
    for h in hooks:
        h.remove()
    assert torch.equal(logits, cg.logistic_logits(seen["x"], seen["raw"], net.S))
    return logits, seen["raw"], seen["x"]


def check_tauldr(net, fx, which: str, suffix: str = ""):
    """The U-Net body (its output before the logistic head) within TOL, and the head (ours
    applied to upstream's body output): logits within TOL in every bin of mass >= 0.01, and
    probabilities within 1e-6 in every bin. The head is ill-conditioned where a bin's mass is
    small, log(1e-6 + 1 - exp(lo - hi)) with exp(lo - hi) near 1: a 1-ulp change of that exp
    (6e-8) moves the logit by 6e-8 / exp(logit - hi), so the CPU's exp (AVX2 or AVX-512 kernels
    round differently) moves such logits by up to 0.02 (55 of 9792 here, at mass ~3e-6); that is
    rounding, not a different function. The same holds end to end for the body's rounding."""
    _, raw, x = run_tauldr(net, fx)
    close(raw, fx["net_out" + suffix], f"tauLDR U-Net output before the head ({which})")
    head, want = cg.logistic_logits(x, fx["net_out" + suffix], net.S), fx["logits" + suffix]
    what = f"tauLDR logistic head on upstream's U-Net output ({which})"
    sure = want.exp() >= 0.01          # bins where a 1-ulp exp moves the logit by < 6e-6
    assert sure.float().mean() > 0.05, what
    close(head[sure], want[sure], what)
    gap = (head.exp() - want.exp()).abs().max().item()     # every bin, as probabilities
    assert gap <= 1e-6, f"{what}: max abs probability difference {gap:.3g} > 1e-6"


def test_tauldr_unet_matches_upstream(tmp_path):
    fx, net = tauldr_net(tmp_path)
    check_tauldr(net, fx, "EMA weights")


def test_tauldr_raw_weights_match_upstream(tmp_path):
    fx, net = tauldr_net(tmp_path)
    net.load_state_dict(tauldr.tauldr_to_ours(fx["state_dict"], ema=False))
    check_tauldr(net, fx, "raw net.* weights", "_raw")
    assert (fx["logits_raw"] - fx["logits"]).abs().max() > 0.1       # the two weight sets differ


def test_authors_tauldr_student_matches_upstream(tmp_path):
    """The Di4C authors' student (sony/di4c tauldr, do_lam_embed; the layout of tldr-di4c.pt)
    through --student_ckpt: its lambda path maps onto ours; lambda really is an input."""
    fx = fixture("tauldr_di4c_student.pt")
    c = fx["config"]
    C, H, _ = c["shape"]
    path = str(tmp_path / "tldr-di4c.pt")
    torch.save({"model": fx["state_dict"], "n_iter": 1234}, path)
    cfg = cg.make_config(cg.Config, S=c["S"], ch=c["ch"], ch_mult=tuple(c["ch_mult"]),
                         num_res_blocks=c["num_res_blocks"], dropout=c["dropout"],
                         attn_res=(H // 2 ** c["scale_count_to_put_attn"],), student_ckpt=path)
    net, st = cg.load_net(cfg, "student", C, H, True, "cpu")
    assert st["format"] == "tauLDR (EMA weights)"
    check_tauldr(net, fx, "the authors' student, EMA weights")
    with torch.no_grad():
        other = net(fx["x"], fx["t"], 1 - fx["lam"][:, None])
    assert (other - fx["logits"]).abs().max() > 1e-2
    net.load_state_dict(tauldr.tauldr_to_ours(fx["state_dict"], ema=False))
    check_tauldr(net, fx, "the authors' student, raw weights", "_raw")


@pytest.fixture(scope="module")
def vqgan(tmp_path_factory):
    fx = fixture("taming_vqgan.pt")
    c, dd = fx["config"], fx["config"]["ddconfig"]
    assert not dd["double_z"] and dd["z_channels"] == c["embed_dim"]
    path = str(tmp_path_factory.mktemp("vqgan") / "last.ckpt")
    # a Lightning checkpoint as MaskGIT's last.ckpt; taming's training loss (LPIPS/discriminator)
    # weights sit under loss.* there and are not part of the tokenizer
    sd = {**fx["state_dict"], "loss.discriminator.main.0.weight": torch.ones(2, 3, 4, 4)}
    torch.save({"state_dict": sd, "global_step": 1}, path)
    net = taming_vqgan.load_vqgan(path, dd["resolution"]).eval()   # sizes read off the weights
    assert (net.K, net.f, len(net.encoder.down[0].block)) == (c["n_embed"], 2 ** (len(
        dd["ch_mult"]) - 1), dd["num_res_blocks"])
    return fx, net


def test_vqgan_encoder_and_quantizer_match_upstream(vqgan):
    fx, net = vqgan
    with torch.no_grad():
        z = net.quant_conv(net.encoder(fx["image"]))
        codes = net.encode(fx["image"])
    close(z, fx["z"], "VQGAN quant_conv(encoder(image))")
    assert fx["code_margin"] > 1e-4         # upstream's indices are no near-ties (gap of |z - e|^2)
    assert codes.shape == fx["codes"].shape
    assert torch.equal(codes, fx["codes"]), \
        f"VQGAN code indices differ at {(codes != fx['codes']).sum().item()} places"
    assert len(fx["codes"].unique()) >= 8                     # many codes in use


def test_vqgan_decoder_matches_upstream(vqgan):
    fx, net = vqgan
    grid = fx["code_grid"]
    with torch.no_grad():
        img = net.decode(grid.view(len(grid), -1))
    close(img, fx["decoded"], "VQGAN decode(codes)")
