"""imagenet_masked.py: MaskGIT schedule and confidence steps, student == teacher at init, smoke
end to end, exact resume, 2-process torchrun, checkpoint formats (MaskGIT-pytorch transformer,
taming VQGAN), ImageFolder + VQ-VAE tokenizer, clear errors. CPU, offline."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import imagenet_masked as m
from tests.runs import metrics_without_timings, second_di4c_round
from pretrained.maskgit import maskgit_to_ours

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(tmp_path, name="run", **kw):
    return m.make_config(m.Config, preset="smoke", out_dir=str(tmp_path / name), **kw)


def tiny_net(lam_dim=0, dropout=0.1, K=17, D=64, C=10):
    return m.MaskTransformer(K, D, C, n_layer=2, E=32, H=4, mlp=64, dropout=dropout,
                             lam_dim=lam_dim)


# -----------------------------------------------------------------------------
# Schedule, confidence steps, sampler


def test_reveal_counts_reproduce_the_spec_table():
    assert m.reveal_counts(2, 256) == [85, 171]
    assert m.reveal_counts(4, 256) == [41, 44, 53, 118]
    assert m.reveal_counts(8, 256) == [20, 21, 22, 22, 25, 28, 36, 82]
    for K in (1, 3, 12, 16, 32):
        c = m.reveal_counts(K, 256)
        assert len(c) == K and sum(c) == 256 and min(c) >= 1
    assert sum(m.reveal_counts(16, 64)) == 64
    with pytest.raises(SystemExit, match="cannot reveal"):
        m.reveal_counts(64, 16)


def test_confidence_step_reveals_exactly_n_and_never_remasks():
    g = torch.Generator().manual_seed(0)
    N, D, K = 6, 40, 9
    x = torch.randint(0, K, (N, D), generator=g)
    x[torch.rand(N, D, generator=g) < 0.6] = K                       # [MASK]
    log_p = torch.log_softmax(torch.randn(N, D, K + 1, generator=g), -1)
    log_p[..., K] = -1e6
    log_p = torch.log_softmax(log_p, -1)
    n = torch.tensor([0, 1, 5, 17, 100, 3])
    for noise in (torch.zeros(N), torch.full((N,), 4.5)):
        out = m.confidence_reveal(x, log_p, n, noise, K, g)
        masked = x == K
        assert torch.equal(out[~masked], x[~masked])                  # revealed tokens stay
        newly = (masked & (out != K)).sum(1)
        assert torch.equal(newly, torch.minimum(n, masked.sum(1)))    # exactly n, capped
        assert (out[masked & (out != K)] < K).all()


def test_teacher_step_reveal_count_and_clamped_gumbel_ramp():
    cfg = m.make_config(m.Config, preset="smoke")
    D, K = 64, 17
    step = m.make_teacher_step(cfg, D, K)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, K, (8, D), generator=g)
    t = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.05, 0.02])
    x_t = m.make_process({"K": K}).add_noise(x0, t, g)
    u = (t - m.R_DELTA).clamp_min(0)
    logits = torch.randn(8, D, K + 1, generator=g)
    logits[..., K] = -1e6                                            # never [MASK]
    x_u = step(torch.log_softmax(logits, -1), x_t, t, u, g)
    masked = (x_t == K).sum(1)
    want = ((1 - m.gamma(1 - u.double())) * D - (D - masked)).floor().long()
    want = torch.minimum(want.clamp_min(0), masked)
    assert torch.equal(masked - (x_u == K).sum(1), want)
    assert torch.equal(x_u[x_t != K], x_t[x_t != K])
    assert (x_u[t == 0.02] != K).all()                               # r' = 1 reveals everything
    ramp = m.teacher_noise(torch.tensor([0.0, 0.5, 7 / 8, 0.95, 1.0]), 8)
    assert ramp[0] == 1 and (ramp >= 0).all() and (ramp[2:] == 0).all()


def test_sampler_follows_the_schedule_and_cfg_ramp():
    net = tiny_net().eval()
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.D, self.K, self.n_classes = net.D, net.K, net.n_classes

        def forward(self, x, t, lam, y):
            seen.append(((x == net.K).sum(1).tolist(), y.tolist()))
            return net(x, t, lam, y)

    cfg = m.make_config(m.Config, preset="smoke")
    y = torch.tensor([0, 3, 9])
    x = m.maskgit_sample(cfg, Recorder(), 0, y, 4, 2.0, torch.Generator().manual_seed(0))
    assert (x != net.K).all() and x.max() < net.K
    counts = m.reveal_counts(4, 64)
    cond = [s for s in seen if s[1] == [0, 3, 9]]
    uncond = [s for s in seen if s[1] == [10, 10, 10]]
    assert [c[0][0] for c in cond] == [64 - sum(counts[:k]) for k in range(4)]
    assert len(uncond) == 3                                          # w_0 = 0: no uncond call
    student, lams = tiny_net(lam_dim=1).eval(), []     # a student: lambda per image and step
    student.register_forward_pre_hook(lambda mod, a: lams.append(a[2][:, 0].clone()))
    m.maskgit_sample(cfg, student, 1, y, 4, 2.0, torch.Generator().manual_seed(0))
    assert len(lams) == 7 and lams[0].unique().numel() == 3               # 4 cond + 3 uncond
    assert torch.equal(lams[1], lams[2])                      # both CFG branches share a lambda
    assert not torch.equal(lams[0], lams[-1])                 # fresh at every step


# -----------------------------------------------------------------------------
# Student == teacher at init, checkpoint formats


def test_student_equals_teacher_at_init_for_every_lambda():
    torch.manual_seed(0)
    teacher = tiny_net().eval()
    with torch.no_grad():
        for p in teacher.parameters():                              # a non-trivial teacher
            p.add_(0.1 * torch.randn_like(p))
    student = tiny_net(lam_dim=1).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("lam_mlp.") for k in missing)
    x = torch.randint(0, 17, (3, 64))
    x[:, ::3] = 17
    y = torch.tensor([0, 4, 10])                                     # 10 = dropped label
    with torch.no_grad():
        want = teacher(x, None, None, y)
        for lam in (0.0, 0.37, 1.0):
            assert torch.equal(student(x, None, torch.full((3, 1), lam), y), want)
        lp = torch.log_softmax(want, -1)
        assert (lp[x != 17].max(-1).values == 0).all()               # revealed tokens copied
        assert (lp[x == 17][:, 17] < -1e5).all()                     # never predict [MASK]
        student.lam_mlp[-1].bias.add_(0.5)
        assert not torch.allclose(student(x, None, torch.full((3, 1), 0.5), y), want)


def test_init_student_copies_the_teacher_and_sets_its_own_dropout():
    meta = {"K": 17, "grid": 8, "n_classes": 10}
    cfg = m.make_config(m.Config, preset="smoke", dropout=(0.3, 0.0))
    torch.manual_seed(1)
    teacher = m.build_model(cfg, meta).eval()
    student = m.init_student(cfg, meta, teacher.state_dict(), "t.pt")
    ps = [mod.p for mod in student.modules() if isinstance(mod, torch.nn.Dropout)]
    ps += [mod.dropout for mod in student.modules() if isinstance(mod, torch.nn.MultiheadAttention)]
    assert ps and all(p == 0.0 for p in ps)
    x = torch.randint(0, 18, (4, 64))
    y = torch.tensor([0, 3, 9, 10])
    with torch.no_grad():     # no dropout: train mode = eval mode = teacher (not bitwise: kernels)
        torch.testing.assert_close(student.train()(x, None, torch.rand(4, 1), y),
                                   teacher(x, None, None, y))
    other = m.build_model(m.make_config(m.Config, preset="smoke", n_embd=16, n_head=2), meta)
    with pytest.raises(SystemExit, match="does not fit the student"):
        m.init_student(cfg, meta, other.state_dict(), "t.pt")


def maskgit_keys(net):
    """MaskGIT-pytorch's MaskTransformer state-dict names and shapes (Network/transformer.py)."""
    V, E = net.embed.weight.shape
    mlp = net.blocks[0].mlp[0].out_features
    keys = {"tok_emb.weight": (V, E), "pos_emb": (1, net.D + 1, E), "bias": (net.D + 1, V)}
    for i, shape in ((0, (E,)), (2, (E, E)), (4, (E,)), (6, (E, E))):
        keys[f"first_layer.{i}.weight"], keys[f"first_layer.{i}.bias"] = shape, (E,)
    for i, shape in ((0, (E,)), (2, (E, E)), (4, (E,))):
        keys[f"last_layer.{i}.weight"], keys[f"last_layer.{i}.bias"] = shape, (E,)
    for l in range(len(net.blocks)):
        p = f"transformer.layers.{l}"
        keys.update({f"{p}.0.norm.weight": (E,), f"{p}.0.norm.bias": (E,),
                     f"{p}.0.fn.mha.in_proj_weight": (3 * E, E),
                     f"{p}.0.fn.mha.in_proj_bias": (3 * E,),
                     f"{p}.0.fn.mha.out_proj.weight": (E, E), f"{p}.0.fn.mha.out_proj.bias": (E,),
                     f"{p}.1.norm.weight": (E,), f"{p}.1.norm.bias": (E,),
                     f"{p}.1.fn.net.0.weight": (mlp, E), f"{p}.1.fn.net.0.bias": (mlp,),
                     f"{p}.1.fn.net.3.weight": (E, mlp), f"{p}.1.fn.net.3.bias": (E,)})
    return keys


def test_maskgit_pytorch_transformer_checkpoint_loads_strictly(tmp_path):
    cfg = m.make_config(m.Config, preset="smoke", n_layer=2, n_embd=32, n_head=4, mlp_dim=64)
    meta = {"K": 17, "grid": 8, "n_classes": 10}
    keys = maskgit_keys(m.build_model(cfg, meta))
    torch.manual_seed(0)
    sd = {f"module.{k}": torch.randn(s) for k, s in keys.items()}    # saved from DDP
    assert set(maskgit_to_ours(sd)) == set(m.build_model(cfg, meta).state_dict())
    path = tmp_path / "MaskGIT_ImageNet_256.pth"
    torch.save({"iter": 1, "global_epoch": 0, "model_state_dict": sd,
                "optimizer_state_dict": {}}, path)
    net, lam_dim, _ = m.load_model(cfg, meta, str(path), torch.device("cpu"))
    assert lam_dim == 0
    assert torch.equal(net.embed.weight, sd["module.tok_emb.weight"])
    assert torch.equal(net.blocks[1].attn.in_proj_weight,
                       sd["module.transformer.layers.1.0.fn.mha.in_proj_weight"])
    assert torch.equal(net.blocks[0].mlp[3].bias, sd["module.transformer.layers.0.1.fn.net.3.bias"])
    assert torch.equal(net.last[4].weight, sd["module.last_layer.4.weight"])
    for bad, msg in ((dict(sd, **{"latent_projection.0.weight": torch.zeros(1)}), "unexpected"),
                     ({k: v for k, v in sd.items() if not k.endswith("pos_emb")}, "missing"),
                     (dict(sd, **{"module.bias": torch.zeros(3, 3)}), "shape")):
        torch.save({"model_state_dict": bad}, path)
        with pytest.raises(SystemExit, match=msg):
            m.load_model(cfg, meta, str(path), torch.device("cpu"))


def taming_keys(ch, ch_mult, n_res, attn_res, res, z, K):
    """taming-transformers VQModel state-dict names and shapes (Encoder, Decoder, quantizer)."""
    keys = {}

    def conv(n, cin, cout, k):
        keys[f"{n}.weight"], keys[f"{n}.bias"] = (cout, cin, k, k), (cout,)

    def norm(n, c):
        keys[f"{n}.weight"], keys[f"{n}.bias"] = (c,), (c,)

    def resnet(n, cin, cout):
        norm(f"{n}.norm1", cin), conv(f"{n}.conv1", cin, cout, 3)
        norm(f"{n}.norm2", cout), conv(f"{n}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{n}.nin_shortcut", cin, cout, 1)

    def attn(n, c):
        norm(f"{n}.norm", c)
        for q in ("q", "k", "v", "proj_out"):
            conv(f"{n}.{q}", c, c, 1)

    def mid(n, c):
        resnet(f"{n}.mid.block_1", c, c), attn(f"{n}.mid.attn_1", c)
        resnet(f"{n}.mid.block_2", c, c)

    conv("encoder.conv_in", 3, ch, 3)
    in_mult, cur = (1,) + tuple(ch_mult), res
    for i, mult in enumerate(ch_mult):
        c = ch * in_mult[i]
        for j in range(n_res):
            resnet(f"encoder.down.{i}.block.{j}", c, ch * mult)
            c = ch * mult
            if cur in attn_res:
                attn(f"encoder.down.{i}.attn.{j}", c)
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
            cur //= 2
    mid("encoder", c), norm("encoder.norm_out", c), conv("encoder.conv_out", c, z, 3)
    c, cur = ch * ch_mult[-1], res // 2 ** (len(ch_mult) - 1)
    conv("decoder.conv_in", z, c, 3), mid("decoder", c)
    for i in reversed(range(len(ch_mult))):
        for j in range(n_res + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
            if cur in attn_res:
                attn(f"decoder.up.{i}.attn.{j}", c)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
            cur *= 2
    norm("decoder.norm_out", c), conv("decoder.conv_out", c, 3, 3)
    keys["quantize.embedding.weight"] = (K, z)
    conv("quant_conv", z, z, 1), conv("post_quant_conv", z, z, 1)
    return keys


def test_vqgan_checkpoint_loads_strictly_and_quantisation_round_trips(tmp_path):
    """A random VQGAN in MaskGIT's checkpoint layout loads strictly. Its codes round-trip through
    the codebook (codes -> code vectors -> nearest code = the same codes); image -> codes -> image
    does not for random weights (encode(decode(codes)) != codes), so encode and decode are checked
    against the definition instead: code (i, j) of the h x w grid, at index i w + j, is the nearest
    codebook entry to quant_conv(encoder(x)) there, and decode puts each code's vector back at
    (i, j) before post_quant_conv and the decoder."""
    from pretrained import taming_vqgan
    keys = taming_keys(32, (1, 2, 2), 1, (2,), 8, 8, 16)
    assert set(keys) == set(taming_vqgan.build_vqgan(codes=16, dim=8, ch=32, ch_mult=(1, 2, 2),
                                                     res_blocks=1, attn_res=(2,), img_size=8)
                            .state_dict())
    torch.manual_seed(0)
    sd = {k: 0.1 * torch.randn(s) for k, s in keys.items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2)          # VQGAN-training only
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 3}, path)
    vq = taming_vqgan.load_vqgan(str(path), 8).eval()      # sizes read off the state dict
    E = sd["quantize.embedding.weight"]                              # (16, 8)
    assert torch.equal(vq.quantize.embedding.weight, E)
    assert torch.cdist(E, E).add(torch.eye(16)).min() > 0.05         # distinct code vectors
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    codes = vq.encode(x)
    assert codes.shape == (2, 4) and codes.max() < 16
    assert torch.equal(vq.encode(x), codes)
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(x))                             # (2, 8, 2, 2)
        h, w = z.shape[2:]
        for n in range(2):
            for i in range(h):
                for j in range(w):
                    dist = ((z[n, :, i, j][None] - E) ** 2).sum(1)
                    assert codes[n, i * w + j] == dist.argmin(), (n, i, j)
        some = torch.randint(0, 16, (5, h * w), generator=torch.Generator().manual_seed(1))
        z_q = torch.zeros(5, 8, h, w)
        for n in range(5):
            for i in range(h):
                for j in range(w):
                    z_q[n, :, i, j] = E[some[n, i * w + j]]
        assert torch.equal(vq._nearest(z_q), some)                   # codes -> vectors -> codes
        want = vq.decoder(vq.post_quant_conv(z_q))
    got = vq.decode(some)
    assert got.shape == (5, 3, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, vq.decode(some.flip(1)), atol=1e-4)   # positions matter
    for bad, msg in (({k: v for k, v in sd.items() if "conv_out" not in k}, "missing"),
                     (dict(sd, **{"encoder.conv_out.weight": torch.zeros(8, 64, 1, 1)}), "shape"),
                     ({k: v for k, v in sd.items() if "conv_in" not in k}, "not a taming")):
        torch.save({"state_dict": bad}, path)
        with pytest.raises(SystemExit, match=msg):
            taming_vqgan.load_vqgan(str(path), 8)
    with pytest.raises(SystemExit, match="not found"):
        taming_vqgan.load_vqgan(str(tmp_path / "none.ckpt"), 8)


def test_paper_sizes_match_maskgit_pytorch():
    """MaskGIT-pytorch's README: 174.161M transformer, 72.142M VQGAN parameters."""
    from pretrained import taming_vqgan
    cfg = m.make_config(m.Config)
    with torch.device("meta"):
        vit = m.build_model(cfg, {"K": 1024, "grid": 16, "n_classes": 1000})
        vq = taming_vqgan.build_vqvae(cfg.img_size)
    assert round(sum(p.numel() for p in vit.parameters()) / 1e6, 3) == 174.161
    assert round(sum(p.numel() for p in vq.parameters()) / 1e6, 3) == 72.142
    assert vq.f == 16 and cfg.L == 32 and m.R_DELTA == 0.05 and cfg.alpha_const == 0.1


# -----------------------------------------------------------------------------
# Data, stages, resume, torchrun, errors


def make_folder(root, sizes=((20, 24), (24, 20), (30, 30))):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for j, (h, w) in enumerate(sizes):
            img = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(img).save(root / cls / f"{j}.png")


def test_image_folder_resize_crop_and_vqvae_tokenizer(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs", sizes=((20, 24), (24, 20), (30, 30)) * 4)
    cfg = smoke(tmp_path, dataset="folder", data_dir=str(tmp_path / "imgs"), vqgan_ckpt="",
                img_size=16, batch_size=4, stage="tokenize")
    ds = m.image_folder(cfg, "train")
    assert ds.classes == ["cat", "dog"] and ds[0][0].shape == (3, 16, 16)
    m.main(cfg)
    meta = m.codes_meta(cfg)
    assert meta["codes"].shape == (48, 64) and meta["K"] == 16 and meta["grid"] == 8
    assert meta["labels"].tolist() == [0] * 24 + [1] * 24 and meta["codes"].max() < 16
    assert os.path.exists(os.path.join(cfg.out_dir, "vqvae.pt"))
    m.main(m.make_config(m.Config, **{**asdict(cfg), "stage": "teacher", "teacher_iters": 2}))
    net, _, _ = m.load_model(cfg, meta, m.ckpt_path(cfg, "teacher"), torch.device("cpu"))
    vq = m.tokenizer(cfg, m.Ctx(0, 1, torch.device("cpu"), cfg.out_dir, "float32"))
    x = m.maskgit_sample(cfg, net, 0, torch.tensor([0, 1]), 2, 1.0)
    assert m.decode(vq, x, meta).shape == (2, 3, 16, 16)
    from eval import image_metrics, inception, maskgit_eval      # Inception without weights:
    proj = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))

    def features(imgs):                                              # pixels -> (N, 6), (N, 5)
        assert imgs.dtype == torch.uint8 and imgs.shape[1:] == (3, 16, 16)
        pooled = nn.functional.avg_pool2d(imgs.float() / 255, 4).flatten(1)   # (N, 48)
        return pooled @ proj, (pooled @ proj)[:, :5]
    monkeypatch.setattr(inception, "inception_features", features)
    monkeypatch.setattr(m, "package_needs", lambda packages: [])     # torch-fidelity: mocked
    run = {**asdict(cfg), "teacher_iters": 2, "distil_iters": 1, "control_iters": 0}
    for stage in ("distill", "sample"):
        m.main(m.make_config(m.Config, **{**run, "stage": stage}))
    with pytest.raises(SystemExit, match="teacher@2_w0: precision / recall with k = 3 need more "
                                         "than 3 points per split .*--n_per_class"):
        m.main(m.make_config(m.Config, **{**run, "stage": "eval"}))   # 4 samples, 5 splits
    for stage in ("sample", "eval"):
        m.main(m.make_config(m.Config, **{**run, "stage": stage, "n_per_class": 10}))
    ev = json.load(open(os.path.join(cfg.out_dir, "metrics.json")))["eval"]
    # the numbers are image_metrics' (MaskGIT-pytorch's protocol) on the written PNGs' features
    # against the reference's, both remapped min-max per image
    def read(folder):
        return torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(folder, n))))
                            .permute(2, 0, 1) for n in sorted(os.listdir(folder))])
    ref = read(os.path.join(cfg.out_dir, "fid_ref"))
    assert len(ref) == 24 and os.path.exists(os.path.join(cfg.out_dir, "fid_ref_features.pt"))
    real = features(maskgit_eval.remap_uint8(ref.float()))[0]
    sample = read(os.path.join(cfg.out_dir, "samples", "teacher@4_w1_png"))
    assert len(sample) == 20 and sample.amin((1, 2, 3)).eq(0).all()
    assert sample.amax((1, 2, 3)).eq(255).all()
    want = image_metrics.metrics_from_features(real, *features(sample), "maskgit")
    got = ev["teacher@4_w1"]
    assert got.pop("steps") == 4 and got.pop("w") == 1.0
    assert got == pytest.approx(want) and set(got) == {"fid", "is_mean", "is_std", "precision",
                                                       "recall", "density", "coverage"}
    assert got["fid"] > 0 and got["is_mean"] >= 1


def test_imagenet_tokens_validate_against_the_validation_images(tmp_path, monkeypatch):
    """On ImageNet's layout (data_dir/{train,val}/<class>/, a VQ-VAE trained here) Di4C's
    validation scores teacher and student by the FID of the eval's Inception features (mocked
    here) to the validation images, never the training ones; --dataset folder has no held-out
    split and is not validated."""
    make_folder(tmp_path / "inet" / "train", sizes=((20, 24), (24, 20), (30, 30)) * 2)
    make_folder(tmp_path / "inet" / "val", sizes=((24, 24), (20, 20)))
    from eval import inception
    proj = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))
    seen = []

    def features(imgs):                                              # pixels -> (N, 6), (N, 5)
        seen.append(imgs)
        pooled = nn.functional.avg_pool2d(imgs.float() / 255, 4).flatten(1)   # (N, 48)
        return pooled @ proj, (pooled @ proj)[:, :5]
    monkeypatch.setattr(inception, "inception_features", features)
    monkeypatch.setattr(m, "package_needs", lambda packages: [])     # torch-fidelity: mocked
    cfg = smoke(tmp_path, dataset="imagenet", data_dir=str(tmp_path / "inet"), vqgan_ckpt="",
                img_size=16, batch_size=4, teacher_iters=2, distil_iters=1, control_iters=0)
    for stage in ("tokenize", "teacher", "distill"):
        m.main(m.make_config(m.Config, **{**asdict(cfg), "stage": stage}))
    assert len(os.listdir(os.path.join(cfg.out_dir, "fid_ref"))) == 4          # val: 2 x 2
    ref, *scored = seen
    assert len(ref) == 4 and all(len(x) == 2 * cfg.n_per_class for x in scored)
    assert len(scored) == 3 * 2                     # teacher, steps 0 and 1; w = 0 and w = 1
    v = json.load(open(os.path.join(cfg.out_dir, "metrics.json")))["student"]["validation"]
    assert [c["step"] for c in v["curve"]] == [0, 1] and set(v["teacher"]) == {"@2_w0", "@2_w1"}
    folder = m.make_config(m.Config, **{**asdict(cfg), "dataset": "folder"})
    assert m.selection(folder, None, {}, None) is None


def test_smoke_end_to_end_is_deterministic_and_learns(tmp_path):
    """Two identical runs give identical metrics (timings aside); a teacher trained for 300
    steps samples far closer to the digits, and to its labels, than uniform noise does."""
    for run in ("a", "b"):
        m.main(smoke(tmp_path, run, teacher_iters=300))
    assert metrics_without_timings(tmp_path / "a" / "metrics.json") == \
        metrics_without_timings(tmp_path / "b" / "metrics.json")
    cfg = smoke(tmp_path, "a")
    metrics = json.load(open(os.path.join(cfg.out_dir, "metrics.json")))
    from eval import digits
    clf = digits.load_or_train_classifier(os.path.join(cfg.out_dir, "digits_classifier.pt"))
    real, _ = digits.load_digits_uint()
    noise = torch.randint(0, 17, (20, 8, 8), generator=torch.Generator().manual_seed(0))
    fd_noise = digits.digits_frechet(clf, noise, real)
    assert metrics["eval"]["teacher@4_w0"]["frechet"] < 0.5 * fd_noise, fd_noise
    ev = metrics["eval"]
    want = {"teacher@2_w0", "teacher@2_w1", "teacher@4_w0", "teacher@4_w1", "student@2_w0",
            "student@2_w1", "control@2_w0", "control@2_w1"}
    assert set(ev) == want
    assert all(v["frechet"] > 0 and 0 <= v["class_acc"] <= 1 for v in ev.values())
    assert "2" in metrics["latency"] and metrics["student"]["iters"] == 3
    assert metrics["control"]["iters"] >= 1
    assert os.path.exists(os.path.join(cfg.out_dir, "samples", "student@2_w1.png"))
    assert os.path.exists(os.path.join(cfg.out_dir, "samples", "teacher@4_w0", "class_0001.png"))
    s = torch.load(os.path.join(cfg.out_dir, "samples", "teacher@4_w0.pt"), weights_only=True)
    assert s["codes"].shape == (20, 64) and s["codes"].max() <= 16


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path):
    common = dict(control_iters=0, ckpt_every=100, ema=(0.0, 0.9), lam_lr_mult=10.0)
    full = smoke(tmp_path, "full", teacher_iters=4, distil_iters=3, **common)
    for stage in ("tokenize", "teacher", "distill"):
        m.main(m.make_config(m.Config, **{**asdict(full), "stage": stage}))
    cut = smoke(tmp_path, "cut", **common)
    for stage, resume, iters in (("tokenize", False, {}),
                                 ("teacher", False, dict(teacher_iters=2)),
                                 ("teacher", True, dict(teacher_iters=4)),
                                 ("distill", False, dict(distil_iters=1)),
                                 ("distill", True, dict(distil_iters=3))):
        m.main(m.make_config(m.Config, **{**asdict(cut), "stage": stage, "resume": resume,
                                          **iters}))
    for name in ("teacher", "student"):
        a = torch.load(os.path.join(full.out_dir, f"{name}.pt"), weights_only=True)
        b = torch.load(os.path.join(cut.out_dir, f"{name}.pt"), weights_only=True)
        assert a["step"] == b["step"] > 0
        for key in ("model", "ema") if name == "student" else ("model",):
            for k in a[key]:
                assert torch.equal(a[key][k], b[key][k]), (name, key, k)
    assert b["optimizer"] is None                      # finished model; training state apart
    b = torch.load(os.path.join(cut.out_dir, "student_state.pt"), weights_only=True)
    groups = b["optimizer"]["param_groups"]            # the student's lambda path learns 10x faster
    n_lam = sum(k.startswith("lam_mlp.") for k in b["model"])
    assert len(groups) == 2 and len(groups[1]["params"]) == n_lam == 4
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"]) and groups[0]["lr"] > 0

def test_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="preset"):
        m.make_config(m.Config, preset="huge")
    with pytest.raises(SystemExit, match="unknown"):
        m.make_config(m.Config, stepz=3)
    for field, value in (("stage", "train"), ("sampler", "bpe"), ("dataset", "cifar")):
        with pytest.raises(SystemExit, match=f"--{field} must be"):
            m.main(smoke(tmp_path, **{field: value}))
    with pytest.raises(SystemExit, match="run --stage tokenize"):
        m.main(smoke(tmp_path, "empty", stage="teacher"))
    with pytest.raises(SystemExit, match="not a folder"):
        m.main(smoke(tmp_path, dataset="folder", data_dir=str(tmp_path / "nope"),
                     vqgan_ckpt="", stage="tokenize"))
    with pytest.raises(SystemExit, match="--lr and --ema take two values"):
        m.main(smoke(tmp_path, ema=(0.9,)))
    cfg = smoke(tmp_path, "ok", stage="tokenize")
    m.main(cfg)
    m.main(m.make_config(m.Config, **{**asdict(cfg), "stage": "teacher"}))
    with pytest.raises(SystemExit, match="another config"):
        m.main(m.make_config(m.Config, **{**asdict(cfg), "stage": "distill", "n_embd": 16}))
    with pytest.raises(SystemExit, match="run --stage distill"):
        m.main(m.make_config(m.Config, **{**asdict(cfg), "stage": "eval"}))
    m.main(m.make_config(m.Config, **{**asdict(cfg), "stage": "distill", "control_iters": 0}))
    with pytest.raises(SystemExit, match="run --stage sample"):
        m.main(m.make_config(m.Config, **{**asdict(cfg), "stage": "eval", "control_iters": 0}))
    for argv, msg in ((["--L", "abc"], "invalid int"), (["--bogus", "1"], "unrecognized"),
                      (["--lfg", "maybe"], "choose from 'true', 'false'"),
                      (["--ste", "2"], "unrecognized")):
        r = subprocess.run([sys.executable, "imagenet_masked.py", *argv], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert m.parse_config(m.Config, ["--preset", "demo", "--steps", "2", "3"]).steps == (2, 3)


def test_pair_labels_tokenize_and_errors(tmp_path):
    from eval import digits
    cfg = smoke(tmp_path, "pairs", stage="tokenize", label_div=2)
    m.main(cfg)
    meta = m.codes_meta(cfg)
    images, labels, val, val_labels = digits.digits_split("digits")     # 80 % trained on
    assert meta["n_classes"] == 5 and meta["classes"] == ["0|1", "2|3", "4|5", "6|7", "8|9"]
    assert torch.equal(meta["labels"], labels // 2)
    assert torch.equal(meta["codes"].long(), images.flatten(1))
    assert torch.equal(meta["val_codes"].long(), val.flatten(1))       # 20 % held out
    assert torch.equal(meta["val_labels"], val_labels // 2)
    with pytest.raises(SystemExit, match="another config"):         # codes of 10 labels differ
        m.codes_meta(m.make_config(m.Config, **{**asdict(cfg), "label_div": 1}))
    for bad in (dict(label_div=0), dict(label_div=11),
                dict(label_div=2, dataset="folder", vqgan_ckpt="")):
        with pytest.raises(SystemExit, match="--label_div"):
            m.main(smoke(tmp_path, "bad", **bad))


def test_lr_factor_warmup_then_constant_or_cosine():
    assert [m.lr_factor(s, 4) for s in (0, 1, 3, 10, 1000)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cos = [m.lr_factor(s, 4, 104) for s in (0, 3, 4, 54, 104, 200)]
    assert cos[:3] == [0.25, 1.0, 1.0] and cos[3] == pytest.approx(0.5) and cos[4:] == [0.0, 0.0]
    assert all(a >= b for a, b in zip(cos[1:], cos[2:]))           # never rises after warm-up


def test_the_cfg_sweep():
    """The paper preset samples every model at w = 0 and each of cfg_ws (the FID-IS sweep of
    Fig. 3, cfg_w = 3 first); cfg_ws may be empty (no CFG) or fractional, from the CLI too."""
    paper = m.make_config(m.Config)
    ws = sorted({w for *_, w in m.sample_runs(paper)})
    assert ws == [0.0, 1.0, 2.0, 3.0, 4.0, 6.0]
    assert len(m.sample_runs(paper)) == 6 * (len(paper.steps) + 2 * len(paper.student_steps))
    m.check(m.make_config(m.Config, preset="smoke", cfg_ws=()))       # no CFG
    assert m.parse_config(m.Config, ["--cfg_ws"]).cfg_ws == ()        # from the CLI too
    assert m.parse_config(m.Config, ["--cfg_ws", "1.5", "2"]).cfg_ws == (1.5, 2.0)
    with pytest.raises(SystemExit, match="--cfg_ws must be values in"):
        m.check(m.make_config(m.Config, preset="smoke", cfg_ws=(2.0, -1.0)))


def test_second_di4c_round_from_a_student(tmp_path):
    second_di4c_round(m, lambda path, **kw: smoke(path.parent, path.name, **kw), tmp_path,
                      "samples/{model}@2_w0.pt", "codes")


def test_photos_the_second_embedded_set_end_to_end(tmp_path):
    """--dataset photos: the tokens are the photo patches, labels grouped by --label_div; the
    whole pipeline runs and scores with the classifier trained on the photos."""
    from eval import digits
    cfg = smoke(tmp_path, "photos", dataset="photos", label_div=2)
    m.main(cfg)
    meta = m.codes_meta(cfg)
    images, labels, _, _ = digits.digits_split("photos")
    assert torch.equal(meta["codes"].long(), images.flatten(1))
    assert torch.equal(meta["labels"], labels // 2) and meta["classes"][2] == "china4|flower0"
    ev = json.load(open(os.path.join(cfg.out_dir, "metrics.json")))["eval"]
    assert ev and all(v["frechet"] > 0 for v in ev.values())
    assert os.path.exists(os.path.join(cfg.out_dir, "photos_classifier.pt"))
