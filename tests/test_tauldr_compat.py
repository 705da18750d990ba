"""Loading a tauLDR checkpoint (andrew-cr/tauLDR layout) as the teacher: key mapping, strictness, head.

Offline and without tauLDR's code: the key names and shapes below were read off tauLDR's
`GaussianTargetRateImageX0PredEMA` (lib/models/models.py, lib/networks/networks.py) built for the
smoke preset's size (C 1, 8x8, ch 8, ch_mult [1, 2], 1 res block, attention at scale 1 = 4x4).
"""
import math

import pytest
import torch

import cifar10_gaussian as m
from pretrained import tauldr

# (module under "net.", kind, in channels, out channels), in tauLDR's registration order
TAULDR_SMOKE_MODULES = [
    ("temb_modules.0", "linear", 8, 32), ("temb_modules.1", "linear", 32, 32), ("input_conv", "conv", 1, 8),
    ("downsampling_modules.0", "res", 8, 8), ("downsampling_modules.1", "resample", 8, 8),
    ("downsampling_modules.2", "res", 8, 16), ("downsampling_modules.3", "attn", 16, 16),
    ("middle_modules.0", "res", 16, 16), ("middle_modules.1", "attn", 16, 16), ("middle_modules.2", "res", 16, 16),
    ("upsampling_modules.0", "res", 32, 16), ("upsampling_modules.1", "attn", 16, 16),
    ("upsampling_modules.2", "res", 24, 16), ("upsampling_modules.3", "attn", 16, 16),
    ("upsampling_modules.4", "resample", 16, 16), ("upsampling_modules.5", "res", 24, 8),
    ("upsampling_modules.6", "res", 16, 8), ("output_modules.0", "norm", 8, 8), ("output_modules.1", "conv", 8, 2),
]


def tauldr_keys() -> list:
    """[(key, shape)] of tauLDR's checkpoint["model"] net.* entries for the smoke size, in order."""
    out = []
    for name, kind, cin, cout in TAULDR_SMOKE_MODULES:
        p = f"net.{name}."
        if kind == "linear":
            out += [(p + "weight", (cout, cin)), (p + "bias", (cout,))]
        elif kind == "conv":
            out += [(p + "weight", (cout, cin, 3, 3)), (p + "bias", (cout,))]
        elif kind == "norm":
            out += [(p + "weight", (cin,)), (p + "bias", (cin,))]
        elif kind == "resample":                                    # Downsample / Upsample: .conv
            out += [(p + "conv.weight", (cout, cin, 3, 3)), (p + "conv.bias", (cout,))]
        elif kind == "attn":
            out += [(p + "GroupNorm_0.weight", (cin,)), (p + "GroupNorm_0.bias", (cin,))]
            out += [(p + f"NIN_{j}.{w}", (cin, cin) if w == "W" else (cin,)) for j in range(4) for w in "Wb"]
        else:                                                       # ResBlock
            out += [(p + "groupnorm0.weight", (cin,)), (p + "groupnorm0.bias", (cin,)),
                    (p + "conv0.weight", (cout, cin, 3, 3)), (p + "conv0.bias", (cout,)),
                    (p + "dense0.weight", (cout, 32)), (p + "dense0.bias", (cout,)),
                    (p + "groupnorm1.weight", (cout,)), (p + "groupnorm1.bias", (cout,)),
                    (p + "conv1.weight", (cout, cout, 3, 3)), (p + "conv1.bias", (cout,))]
            if cin != cout:
                out += [(p + "nin.W", (cin, cout)), (p + "nin.b", (cout,))]
    return out


def tauldr_model_sd(seed=0, prefix="net.") -> dict:
    """tauLDR checkpoint["model"]: raw weights under net.*, EMA weights in ema_shadow_params."""
    g = torch.Generator().manual_seed(seed)
    keys = tauldr_keys()
    sd = {k.replace("net.", prefix, 1): 0.1 * torch.randn(s, generator=g) for k, s in keys}
    sd["ema_decay"], sd["ema_num_updates"] = 0.9999, 1999999
    sd["ema_shadow_params"] = [0.1 * torch.randn(s, generator=g) for _, s in keys]
    return sd


def save_tauldr(path, model_sd) -> str:
    torch.save({"model": model_sd, "optimizer": {"state": {}, "param_groups": []}, "n_iter": 1999999}, path)
    return str(path)


def smoke_cfg(ckpt):
    return m.parse_config(m.Config, ["--preset", "smoke", "--teacher_ckpt", ckpt])


def test_smoke_size_key_list_is_complete():
    """The key list read off tauLDR against our UNet of the smoke size (the network load_net
    builds), which is built without the key mapping: the same number of parameters (a module
    left out of the list, a stray one or a wrong width shows), and tauldr_to_ours, the loading
    direction, maps the list onto exactly the network's keys with their shapes. 144 tensors is
    what tauLDR's own state dict holds at this size."""
    keys = tauldr_keys()
    assert len(keys) == len(dict(keys)) == 144
    net = m.build_unet(m.make_config(m.Config, preset="smoke"), 1, 8, lam=False)
    assert sum(math.prod(s) for _, s in keys) == sum(p.numel() for p in net.parameters())
    mapped = tauldr.tauldr_to_ours({k: torch.zeros(s) for k, s in keys}, ema=False)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == \
        {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("prefix", ["net.", "net.module."])             # plain and DDP-trained
def test_tauldr_checkpoint_loads_strictly_with_ema_weights(tmp_path, prefix):
    sd = tauldr_model_sd(prefix=prefix)
    net, st = m.load_net(smoke_cfg(save_tauldr(tmp_path / "ckpt_0001999999.pt", sd)), "teacher", 1, 8, False, "cpu")
    assert st["format"].startswith("tauLDR")
    ema = dict(zip([k for k, _ in tauldr_keys()], sd["ema_shadow_params"]))
    torch.testing.assert_close(net.temb[2].weight, ema["net.temb_modules.1.weight"])
    torch.testing.assert_close(net.down[2].skip.weight[:, :, 0, 0], ema["net.downsampling_modules.2.nin.W"].t())
    qkv = net.mid[1].qkv.weight[:, :, 0, 0]
    for j in range(3):
        torch.testing.assert_close(qkv[16 * j:16 * (j + 1)], ema[f"net.middle_modules.1.NIN_{j}.W"].t())
    torch.testing.assert_close(net.up[4].conv.bias, ema["net.upsampling_modules.4.conv.bias"])
    torch.testing.assert_close(net.out[2].weight, ema["net.output_modules.1.weight"])
    raw = tauldr.tauldr_to_ours(sd, ema=False)                           # the other choice
    torch.testing.assert_close(raw["out.2.weight"], sd[f"{prefix}output_modules.1.weight"])
    logits = net(torch.randint(0, 17, (2, 64)), torch.tensor([0.1, 0.9]))
    assert logits.shape == (2, 64, 17) and torch.isfinite(logits).all()


@pytest.mark.parametrize("change", ["drop", "stray", "shape"])
def test_tauldr_checkpoint_mismatch_is_a_clear_error(tmp_path, change):
    sd = tauldr_model_sd()
    key = "net.middle_modules.1.NIN_1.W"
    if change == "drop":
        del sd[key]
    elif change == "stray":
        key = "net.middle_modules.1.NIN_4.W"
        sd[key] = torch.zeros(16, 16)
    else:
        sd[key] = torch.zeros(16, 8)
    with pytest.raises(SystemExit, match=r"tauLDR checkpoint .*does not match.*" + key.replace(".", r"\.")):
        m.load_net(smoke_cfg(save_tauldr(tmp_path / "ckpt.pt", sd)), "teacher", 1, 8, False, "cpu")


def test_tauldr_checkpoint_for_another_size_is_refused(tmp_path):
    cfg = m.parse_config(m.Config, ["--preset", "smoke", "--ch", "16",
                                    "--teacher_ckpt", save_tauldr(tmp_path / "ckpt.pt", tauldr_model_sd())])
    with pytest.raises(SystemExit, match="does not match this network"):
        m.load_net(cfg, "teacher", 1, 8, False, "cpu")


def test_ema_list_out_of_line_is_refused():
    sd = tauldr_model_sd()
    sd["ema_shadow_params"] = sd["ema_shadow_params"][:-1]
    with pytest.raises(ValueError, match="ema_shadow_params"):
        tauldr.tauldr_to_ours(sd)


def test_mapping_round_trips_and_names_match_tauldr():
    cfg = m.make_config(m.Config, preset="smoke")
    ours = m.build_unet(cfg, 1, 8, lam=False).state_dict()
    theirs = tauldr.ours_to_tauldr(ours)
    assert [(k, tuple(v.shape)) for k, v in theirs.items()] == tauldr_keys()    # names, shapes, order
    back = tauldr.tauldr_to_ours(theirs, ema=False)
    assert back.keys() == ours.keys()
    for k in ours:
        torch.testing.assert_close(back[k], ours[k])


def test_output_head_gives_tauldr_logits_for_a_hand_set_bias(tmp_path):
    """All weights 0 except the output conv's bias (mu 0.3, log-scale -1): every pixel's logits are
    tauLDR's log((1 + 1e-6) sigmoid(r) - sigmoid(l)), mu = tanh(centred x + 0.3), s = exp(-1 - 2)."""
    sd = {k: torch.zeros(s) for k, s in tauldr_keys()}
    sd["net.output_modules.1.bias"] = torch.tensor([0.3, -1.0])
    sd.update({"ema_decay": 0.9999, "ema_num_updates": 1, "ema_shadow_params": [v.clone() for v in sd.values()]})
    net, _ = m.load_net(smoke_cfg(save_tauldr(tmp_path / "ckpt.pt", sd)), "teacher", 1, 8, False, "cpu")
    x = torch.arange(64).remainder(17).view(1, 64)
    logits = net(x, torch.tensor([0.5])).double()                               # (1, 64, 17)
    mu = torch.tanh(x.double() / 16 * 2 - 1 + 0.3)[..., None]
    edges = torch.linspace(-1, 1, 18, dtype=torch.float64)
    s = math.exp(-1.0 - 2.0)
    hi, lo = torch.sigmoid((edges[1:] - mu) / s), torch.sigmoid((edges[:-1] - mu) / s)
    want = (1 + 1e-6) * hi - lo                                                  # bin mass (+ 1e-6 sigma(r))
    big = want > 1e-4                      # far above mu the 1e-6 floor is float32-limited, so there
    torch.testing.assert_close(logits[big], want[big].log(), atol=1e-4, rtol=1e-5)    # compare masses
    torch.testing.assert_close(logits.exp(), want, atol=3e-7, rtol=1e-4)
    bins = ((mu[..., 0] + 1) / 2 * 17).floor().clamp(max=16)
    assert (logits.argmax(-1) == bins).all()


def test_our_own_checkpoint_still_loads_as_teacher_ckpt(tmp_path):
    cfg = m.make_config(m.Config, preset="smoke")
    net = m.build_unet(cfg, 1, 8, lam=False)
    path = str(tmp_path / "teacher.pt")
    torch.save({"model": net.state_dict(), "config": m.dataclasses.asdict(cfg)}, path)
    loaded, st = m.load_net(smoke_cfg(path), "teacher", 1, 8, False, "cpu")
    assert "format" not in st
    torch.testing.assert_close(loaded.out[2].weight, net.out[2].weight)
