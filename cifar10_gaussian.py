"""
Di4C on pixels with a discretized-Gaussian CTMC (tauLDR teacher; Sec. 5.1 of arXiv:2410.08709):
a tauLDR U-Net x0-predictor trained with the continuous-time ELBO plus an auxiliary cross-entropy,
distilled into the same U-Net plus a zero-initialised lambda path (docs/method.md (30)-(31)).

CPU demo (8x8 photo patches, 17 grey levels):  python cifar10_gaussian.py --preset demo
CIFAR-10, paper settings (GPU):  python cifar10_gaussian.py --data_dir data/cifar10 --download true
Multi-GPU:  torchrun --standalone --nproc_per_node=8 cifar10_gaussian.py ...
Stages: --stage teacher | distill | sample | eval | all (each reads what earlier stages wrote).
"""
import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import di4c_core as core
from eval import report, validation
from eval.preflight import check_round, checkpoint_needs, preflight
from eval.results_table import update_metrics

# -----------------------------------------------------------------------------
# Config: defaults are the paper preset (tauLDR's CIFAR-10 settings); presets override a few


@dataclass
class Config:
    preset: str = "paper"          # paper | demo | smoke
    stage: str = "all"             # teacher | distill | sample | eval | all
    out_dir: str = "runs/cifar10"
    run_dir: str = ""              # read checkpoints and samples from here (default out_dir)
    # data: CIFAR-10 (random horizontal flips) or an embedded 8x8 set (no flips, eval/digits.py)
    dataset: str = "cifar10"       # cifar10 | digits | photos | scenes (embedded 8x8)
    data_dir: str = "data/cifar10"
    download: bool = False         # let torchvision download CIFAR-10 into data_dir
    S: int = 256                   # grey levels per channel
    # forward process (tauLDR, docs/method.md (4)-(5)): target sigma 2 S (build_process)
    rate_sigma: float = 6.0
    time_base: float = 3.0         # beta_bar(t) = time_base (100^t - 1)
    # network (tauLDR U-Net + the lambda path, docs/method.md (14))
    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_res: tuple = (16,)
    dropout: float = 0.1
    # teacher training
    teacher_ckpt: str = ""         # use this teacher instead of training one (ours or tauLDR's)
    student_ckpt: str = ""         # "" = out_dir/student.pt; or the authors' tldr-di4c.pt
    teacher_iters: int = 2000000
    teacher_batch: int = 128
    teacher_lr: float = 2e-4
    nll_weight: float = 0.001      # auxiliary cross-entropy weight of the tauLDR objective
    # Di4C (tauLDR variant, docs/method.md (30)-(31))
    distil_iters: int = 320000
    batch_size: int = 8            # x_t per step (global); the network sees batch_size * L rows
    L: int = 16
    lr: float = 2e-4
    lam_lr_mult: float = 1.0       # learning-rate multiplier of the lambda path (zero-initialised)
    alpha_const: float = 1.0       # alpha(t) = alpha_const sigmoid(20 (t - 1/2))
    control_variate: bool = True   # the data term's dimension-wise control variate
                                   # (docs/method.md (23)); false = the plain estimator
    control_iters: int = 0         # the control: N steps of the teacher's loss; -1 = Di4C's compute
    # optimisation (AdamW without weight decay = Adam, grad clip 1)
    ema_decay: float = 0.9999
    micro_batch: int = 0           # rows per forward and GPU (gradient accumulation); 0 = all
    compile: bool = False          # torch.compile the network in training
    # sampling / eval
    steps: tuple = (10, 20, 40)
    student_steps: tuple = (10, 20, 40)
    hybrid_teacher_steps: int = 3  # hybrid sampler: last NFEs by the teacher
    n_samples: int = 50000
    sample_batch: int = 50
    fid_stats: str = ""            # FID reference, e.g. pigm's cifar10.train.npz ("": computed)
    # system
    seed: int = 0
    device: str = ""
    dtype: str = "float32"         # float32 | bfloat16 (autocast; draws stay float64)
    log_every: int = 100
    ckpt_every: int = 5000
    resume: bool = False           # continue every training stage from out_dir/<name>_state.pt


# demo: 8x8 patches of scikit-learn's two photographs (digits: --dataset digits), S = 17, D = 64;
# why each value: docs/cifar10.md. smoke: the demo's recipe at a few steps, on the digits.
DEMO = dict(dataset="photos", S=17, rate_sigma=1.5, time_base=0.3, ch=32, ch_mult=(1, 2),
            num_res_blocks=1, attn_res=(4,), dropout=0.0, teacher_iters=1500, teacher_batch=64,
            teacher_lr=1e-3, nll_weight=100.0, distil_iters=400, batch_size=8, L=16, lr=2e-4,
            lam_lr_mult=10.0, ema_decay=0.99, control_iters=-1, steps=(2, 4, 8, 16, 32),
            student_steps=(2, 4, 8), hybrid_teacher_steps=1, n_samples=1000, sample_batch=500,
            log_every=100, ckpt_every=100, out_dir="runs/cifar10_demo")
PRESETS = {"paper": {}, "demo": DEMO, "smoke": dict(
    DEMO, dataset="digits", ch=8, teacher_iters=4, teacher_batch=8, distil_iters=4, batch_size=2,
    L=4, lr=1e-4, ema_decay=0.9, steps=(2, 4), student_steps=(2,), n_samples=16, sample_batch=8,
    log_every=1, ckpt_every=2, out_dir="runs/cifar10_smoke")}
STAGES = ("teacher", "distill", "sample", "eval")
EMBEDDED = ("digits", "photos", "scenes")   # 8x8, 17 grey levels, scored by eval/digits.py
TIME_EXP, MIN_TIME = 100.0, 0.01       # tauLDR's beta_bar base and the end of the time grid
ARCH_KEYS = ("dataset", "S", "ch", "ch_mult", "num_res_blocks", "attn_res")
RESUME_KEYS = ARCH_KEYS + ("data_dir", "L", "batch_size", "teacher_batch", "lr", "teacher_lr",
                           "seed", "rate_sigma", "time_base", "dropout", "nll_weight",
                           "lam_lr_mult", "alpha_const", "control_variate", "ema_decay")
SAMPLE_KEYS = ("n_samples", "seed")
CHOICES = {"stage": STAGES + ("all",), "dataset": ("cifar10",) + EMBEDDED,
           "dtype": ("float32", "bfloat16")}
INF, TINY = float("inf"), 1e-12
LIMITS = {                             # (lo, hi), inclusive; check_config applies them
    **dict.fromkeys(("ch_mult", "num_res_blocks", "attn_res", "teacher_iters", "teacher_batch",
                     "distil_iters", "batch_size", "L", "steps", "student_steps", "sample_batch",
                     "log_every", "ckpt_every"), (1, INF)),
    **dict.fromkeys(("nll_weight", "lam_lr_mult", "alpha_const", "hybrid_teacher_steps", "seed",
                     "micro_batch"), (0, INF)),
    **dict.fromkeys(("rate_sigma", "time_base"), (TINY, INF)),
    "S": (2, 256), "ch": (4, INF), "dropout": (0, 0.99), "teacher_lr": (TINY, 1), "lr": (TINY, 1),
    "control_iters": (-1, INF), "ema_decay": (0, 1 - 1e-9), "n_samples": (2, INF),
}

# -----------------------------------------------------------------------------
# Data: uint8 images (N, C, H, W) with values in 0..S-1, held in memory


def load_images(cfg: Config, split: str = "train") -> torch.Tensor:
    """CIFAR-10's training or test set (its python-pickle batches data_batch_1..5 / test_batch,
    256 grey levels), or an embedded 8x8 set of 17 (eval/digits.py: scikit-learn's digits, or
    patches of its two photographs; "train" its fixed 80 %, "val" the other 20 %), requantised
    to S levels. The "val" images are never trained on: Di4C's validation scores against them."""
    if cfg.dataset in EMBEDDED:
        from eval import digits
        part = digits.digits_split(cfg.dataset)[0 if split == "train" else 2]
        x, levels = part.to(torch.uint8)[:, None], 17
        return x if levels == cfg.S else (x.long() * cfg.S // levels).to(torch.uint8)
    import glob
    import pickle
    if cfg.download:
        import torchvision
        torchvision.datasets.CIFAR10(cfg.data_dir, train=True, download=True)
    folder = os.path.join(cfg.data_dir, "cifar-10-batches-py")
    parts = []
    for path in sorted(glob.glob(os.path.join(folder, "data_batch_*" if split == "train"
                                              else "test_batch"))):
        try:
            with open(path, "rb") as fh:
                data = pickle.load(fh, encoding="bytes")[b"data"]
            parts.append(torch.as_tensor(data, dtype=torch.uint8).view(-1, 3, 32, 32))
        except Exception as e:
            raise SystemExit(f"error: {path!r} is not a CIFAR-10 python batch "
                             f"({type(e).__name__})") from None
    if not parts:
        raise SystemExit(f"error: no CIFAR-10 {'training' if split == 'train' else 'test'} batches under {folder!r}; pass --data_dir "
                         "with the folder that holds cifar-10-batches-py, or add --download true")
    x = torch.cat(parts)
    return x if cfg.S == 256 else (x.long() * cfg.S // 256).to(torch.uint8)


def flip_batch(batch: tuple, g: torch.Generator, cfg: Config) -> torch.Tensor:
    """A Batches item -> x0 (B, D) long; CIFAR-10 images mirrored with probability 1/2 (from g,
    so independent of every later draw of the step)."""
    x = batch[0].long()                                                          # (B, C, H, W)
    if cfg.dataset in EMBEDDED:
        return x.flatten(1)
    flip = torch.rand(len(x), generator=g, device=g.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x).flatten(1)


# -----------------------------------------------------------------------------
# Forward process: tauLDR's Gaussian-target rate matrix (docs/method.md (4))


def gaussian_rate_matrix(S: int, rate_sigma: float, q_sigma: float) -> tuple:
    """Jumps from i toward the centre (to j with i < j < S - i, or S - i <= j < i) at rates
    exp(-(|j - i| - 1)^2 / rate_sigma^2), made reversible w.r.t. a discretised Gaussian pi.
    Returns (R, pi)."""
    k = torch.arange(S, dtype=torch.float64)
    log_pi = -((k + 1 - S / 2) ** 2) / (2 * q_sigma ** 2)
    i, j = k[:, None], k[None, :]                                                 # (S, 1), (1, S)
    inward = ((i < S / 2) & (i < j) & (j < S - i)) | ((i > S / 2) & (S - i <= j) & (j < i))
    R = torch.where(inward, torch.exp(-(((j - i).abs() - 1) ** 2) / rate_sigma ** 2), 0.0)
    i, j = torch.nonzero(R, as_tuple=True)
    R[j, i] = R[i, j] * torch.exp(log_pi[i] - log_pi[j])                         # detailed balance
    R -= torch.diag(R.sum(1))
    return R, log_pi.softmax(0)


def build_process(cfg: Config, device) -> core.CTMCProcess:
    """The target's sigma is 2 S (tauLDR: 512 for S = 256); beta_bar(t) = time_base (100^t - 1)."""
    R, pi = gaussian_rate_matrix(cfg.S, cfg.rate_sigma, 2.0 * cfg.S)
    return core.CTMCProcess(R, lambda t: cfg.time_base * (TIME_EXP ** t - 1), pi).to(device)


# -----------------------------------------------------------------------------
# Network: tauLDR's CIFAR-10 U-Net x0-predictor + logistic head (our module names: a tauLDR
# checkpoint loads through pretrained/tauldr.py), with the lambda path for a student


def sinusoid(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sin/cos embedding of 1000 x (x = t or lambda in [0, 1]): (N,) -> (N, dim), in the operation
    order of tauLDR's `transformer_timestep_embedding`, so the floats agree bit for bit."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=x.device)
                      * -(math.log(10000) / (half - 1)))
    args = (1000 * x.float())[:, None] * freqs[None]                           # (N, half)
    return torch.cat([args.sin(), args.cos()], -1)


def norm(c: int) -> nn.GroupNorm:
    """tauLDR's GroupNorm: min(c // 4, 32) groups, eps 1e-6 (c must be a multiple of 4)."""
    return nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)


class ResBlock(nn.Module):
    """(skip(x) + c2(drop(act(n2(c1(act(n1(x))) + t_proj(temb) [+ lam_proj(lemb)]))))) / sqrt 2."""

    def __init__(self, cin, cout, emb, dropout, lam):
        super().__init__()
        self.n1, self.c1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.t_proj, self.n2, self.drop = nn.Linear(emb, cout), norm(cout), nn.Dropout(dropout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()    # tauLDR's NiN
        self.lam_proj = nn.Linear(emb, cout) if lam else None   # lambda path, zero at init
        if lam:
            nn.init.zeros_(self.lam_proj.weight), nn.init.zeros_(self.lam_proj.bias)

    def forward(self, x, temb, lemb):
        h = self.c1(F.silu(self.n1(x))) + self.t_proj(F.silu(temb))[:, :, None, None]
        if self.lam_proj is not None:
            h = h + self.lam_proj(F.silu(lemb))[:, :, None, None]
        return (self.skip(x) + self.c2(self.drop(F.silu(self.n2(h))))) / math.sqrt(2)


class Attention(nn.Module):
    """Single-head self-attention over the H W positions, residual scaled by 1/sqrt 2."""

    def __init__(self, c):
        super().__init__()
        self.n, self.qkv, self.out = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x, *_):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.n(x)).flatten(2).transpose(1, 2).chunk(3, -1)      # (B, HW, C) each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return (x + self.out(h.transpose(1, 2).reshape(B, C, H, W))) / math.sqrt(2)


class Resample(nn.Module):
    """tauLDR's Downsample (pad bottom/right by 1, 3x3 conv, stride 2) or Upsample (nearest x2,
    3x3 conv)."""

    def __init__(self, c, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2) if down else nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, *_):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down
                         else F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """x_t (N, D) long -> logits (N, D, S), D = C H W (docs/method.md (14)): tauLDR's `UNet` and
    `ImageX0PredBase` head, `down`, `mid`, `up` holding its module lists' blocks in order. A
    student (lam) also takes lambda (N, 1): embeddings of (lambda, t), the second also of the
    bottleneck's mean, feed a zero-initialised `lam_proj` per ResBlock (so student = teacher)."""

    def __init__(self, C, H, S, ch, ch_mult, num_res_blocks, attn_res, dropout, lam=False):
        super().__init__()
        self.C, self.H, self.S, self.ch, self.lam_dim, emb = C, H, S, ch, int(bool(lam)), 4 * ch
        block = functools.partial(ResBlock, emb=emb, dropout=dropout, lam=lam)
        self.temb = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(C, ch, 3, padding=1)
        self.down, chans, c, res = nn.ModuleList(), [ch], ch, H
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(c, ch * m))
                c = ch * m
                if res in attn_res:
                    self.down.append(Attention(c))
                chans.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(Resample(c, down=True))
                chans.append(c)
                res //= 2
        self.mid = nn.ModuleList([block(c, c), Attention(c), block(c, c)])
        self.up, c_mid = nn.ModuleList(), c
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(c + chans.pop(), ch * m))
                c = ch * m
                if res in attn_res:
                    self.up.append(Attention(c))
            if i > 0:
                self.up.append(Resample(c, down=False))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, 2 * C, 3, padding=1))
        if lam:                                                      # (lambda, t) sinusoids: 2 ch
            self.lam_emb_down = nn.Sequential(nn.Linear(2 * ch, ch), nn.SiLU(), nn.Linear(ch, emb),
                                              nn.SiLU(), nn.Linear(emb, emb))
            self.lam_emb_up = nn.Sequential(nn.Linear(2 * ch + c_mid, ch), nn.SiLU(),
                                            nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))

    def forward(self, x_t, t, lam=None, cond=None):
        N, dt = x_t.shape[0], self.conv_in.weight.dtype          # float32 unless .double()
        x = x_t.view(N, self.C, self.H, self.H).to(dt) / (self.S - 1) * 2 - 1       # (N, C, H, W)
        e_t = sinusoid(t, self.ch).to(dt)                                           # (N, ch)
        temb, lemb = self.temb(e_t), None
        if self.lam_dim:
            e_lam = sinusoid(lam[:, 0], self.ch).to(dt)                             # (N, ch)
            lemb = self.lam_emb_down(torch.cat([e_lam, e_t], -1))
        h = self.conv_in(x)
        skips = [h]
        for blk in self.down:                        # an Attention replaces its input's skip
            h = blk(h, temb, lemb)
            skips = skips[:-1] + [h] if isinstance(blk, Attention) else skips + [h]
        if self.lam_dim:
            lemb = self.lam_emb_up(torch.cat([e_lam, e_t, h.mean((2, 3))], -1))    # + bottleneck
        for blk in self.mid:
            h = blk(h, temb, lemb)
        for blk in self.up:                          # a ResBlock takes its skip connection
            skip = isinstance(blk, ResBlock)
            h = blk(torch.cat([h, skips.pop()], 1), temb, lemb) if skip else blk(h)
        return logistic_logits(x, self.out(h), self.S)                             # (N, D, S)


def logistic_logits(x: torch.Tensor, raw: torch.Tensor, S: int) -> torch.Tensor:
    """tauLDR's head (fix_logistic False): the log-mass of a logistic(mu, s) over S equal bins of
    [-1, 1], mu = tanh(x + raw_mu), s = exp(raw_log_scale - 2), log sigma(r) + log1p(1e-6 - exp(log
    sigma(l) - log sigma(r))). x (N, C, H, W) in [-1, 1], raw (N, 2C, H, W) -> (N, C*H*W, S)."""
    C = x.shape[1]
    mu = torch.tanh(x + raw[:, :C]).flatten(1)[..., None]                           # (N, D, 1)
    inv_s = torch.exp(-(raw[:, C:] - 2)).flatten(1)[..., None]
    w = 2.0 / S
    centres = torch.linspace(-1 + w / 2, 1 - w / 2, S, device=x.device, dtype=raw.dtype)  # (S,)
    lo = F.logsigmoid((centres - w / 2 - mu) * inv_s)                             # (N, D, S)
    hi = F.logsigmoid((centres + w / 2 - mu) * inv_s)
    return hi + torch.log1p(-torch.exp(lo - hi) + 1e-6)


def build_unet(cfg: Config, C: int, H: int, lam: bool) -> UNet:
    """The U-Net of cfg, with the lambda path (a Di4C student) or without (a product model)."""
    return UNet(C, H, cfg.S, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res,
                cfg.dropout, lam)


def student_from_teacher(teacher: UNet, cfg: Config) -> UNet:
    """Student = the teacher's weights + a fresh, zero-initialised lambda path (strict)."""
    student = build_unet(cfg, teacher.C, teacher.H, lam=True).to(next(teacher.parameters()).device)
    try:
        return core.student_from_teacher(student, teacher.state_dict())
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# -----------------------------------------------------------------------------
# Teacher objective: tauLDR continuous-time ELBO (one-forward-pass form) + auxiliary CE


def teacher_loss(model, proc: core.CTMCProcess, x0: torch.Tensor, cfg: Config, g) -> torch.Tensor:
    """Per-image loss (B,): neg-ELBO ~ sum_{x' != x~} R^_t(x~, x') - Z_t(x_t) log R^_t(x~, x_t),
    x~ = x_t after one forward jump (the network sees x~ only), reverse rates R^_t(x, x'^d = b) =
    R_t(b, x^d) sum_a p^d(a | x) Q_{t|0}(a, b) / Q_{t|0}(a, x^d) (tauLDR's CT-ELBO), plus
    nll_weight times the cross-entropy of p_{0|t}(x0 | x~)."""
    (B, D), S, R, ar = x0.shape, proc.S, proc.R, torch.arange(x0.shape[0], device=x0.device)
    t = MIN_TIME + (1 - MIN_TIME) * torch.rand(B, generator=g, device=x0.device)
    x_t = proc.add_noise(x0, t, g)
    beta = cfg.time_base * math.log(TIME_EXP) * TIME_EXP ** t.double()            # (B,)
    out_rate = -R.diagonal()[x_t] * beta[:, None]                                   # (B, D)
    d_star = torch.multinomial(out_rate.float(), 1, generator=g)[:, 0]              # jumping dim
    old = x_t[ar, d_star]                                          # (B,) its state before
    rows = R[old].clone()                                                           # (B, S)
    rows[ar, old] = 0.0
    x_tilde = x_t.clone()
    x_tilde[ar, d_star] = torch.multinomial(rows.float(), 1, generator=g)[:, 0]
    log_p0 = core.log_probs(model(x_tilde, t.float(), None))                         # (B, D, S)
    Q = proc.transition(t)                                                          # (B, S, S)
    idx = x_tilde[:, None, :].expand(B, S, D)
    ratio = log_p0.double().exp() / (Q.gather(2, idx).transpose(1, 2) + proc.eps + 1e-12)
    back = torch.bmm(ratio, Q) * (R.T[x_tilde] * beta[:, None, None])    # (B, D, S) R^(x~, b)
    back = back.scatter(2, x_tilde[..., None], 0.0)
    term2 = out_rate.sum(1) * torch.log(back[ar, d_star, old] + 1e-30)
    ce = -log_p0.gather(-1, x0[..., None]).squeeze(-1).mean(1)
    return ((back.sum((1, 2)) - term2) / D).float() + cfg.nll_weight * ce


def teacher_objective(cfg: Config, proc):
    """fit's loss_fn for the teacher and the control: the tauLDR loss of a (flipped) batch."""
    return lambda net, batch, g: (teacher_loss(net, proc, flip_batch(batch, g, cfg), cfg, g), {})


# -----------------------------------------------------------------------------
# Di4C step: the tauLDR variant (docs/method.md (30), (31)) on the core's losses


def di4c_step(student, student_raw, teacher_fns, proc, x0, cfg: Config, g):
    """delta ~ LogU[1e-3, 1e-2], t ~ U[MIN_TIME + delta, 1], u = t - delta; a separate x_tau at
    tau = MIN_TIME or U[MIN_TIME, MIN_TIME + 0.01]; alpha(t) = alpha_const sigmoid(20 (t - 1/2)).
    Returns (loss (B,), terms)."""
    B, dev = x0.shape[0], x0.device
    rand = lambda: torch.rand(B, generator=g, device=dev)
    delta = 10 ** (-3 + rand())
    t = MIN_TIME + delta + (1 - MIN_TIME - delta) * rand()
    u = t - delta
    tau = MIN_TIME + (rand() < 0.5).float() * rand() * 0.01
    x_t, x_tau = proc.add_noise(x0, t, g), proc.add_noise(x0, tau, g)
    weights = core.variant_weights("tauldr", t, alpha_const=cfg.alpha_const)
    return core.di4c_loss(student, x0, x_t, t, u, weights=weights, teacher_marginal=teacher_fns[0],
                          teacher_step=teacher_fns[1], L=cfg.L, lam_dim=student_raw.lam_dim,
                          x_tau=x_tau, tau=tau, control_variate=cfg.control_variate, generator=g)


# -----------------------------------------------------------------------------
# Training stages: teacher (tauLDR objective), distill (Di4C, then the control)


def stage_teacher(cfg: Config, ctx, images: torch.Tensor, proc):
    """Train the tauLDR teacher from scratch (skipped when --teacher_ckpt is given)."""
    if cfg.teacher_ckpt:
        return ctx.log(f"teacher: using --teacher_ckpt {cfg.teacher_ckpt}, nothing to train")
    torch.manual_seed(cfg.seed)
    raw = build_unet(cfg, images.shape[1], images.shape[2], lam=False).to(ctx.device)
    data = epoch_batches((images,), cfg, ctx, cfg.teacher_batch)
    ctx.log(f"teacher: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, "
            f"{len(images)} images {tuple(images.shape[1:])}, S = {cfg.S}")
    out = fit(cfg, ctx, "teacher", raw, teacher_objective(cfg, proc), data, cfg.teacher_iters,
              cfg.teacher_lr, cfg.teacher_batch, ema_decay=cfg.ema_decay)
    update_metrics(cfg, ctx, {"teacher": dict(iters=out["step"], train_seconds=out["wall"])})


def stage_distill(cfg: Config, ctx, images: torch.Tensor, proc):
    """Di4C (tauLDR variant) from the teacher (a product model, or a student: another round), then
    (--control_iters) the control: the teacher fine-tuned with its own loss for the same compute."""
    teacher, t_state = load_net(cfg, "teacher", *images.shape[1:3], False, ctx.device)
    lam_T, parents = t_state["lam_dim"], {"teacher": t_state["id"]}
    check_round(cfg, lam_T)
    student = student_from_teacher(teacher, cfg).train()
    fns = core.make_teacher(teacher, proc.step, lam_T, cfg.L)
    data = epoch_batches((images,), cfg, ctx, cfg.batch_size)
    ctx.log(f"distill: {'mixture (multi-round)' if lam_T else 'product'} teacher, L = {cfg.L}")
    out = fit(cfg, ctx, "student", student,
              lambda model, batch, g: di4c_step(model, student, fns, proc,
                                                flip_batch(batch, g, cfg), cfg, g),
              data, cfg.distil_iters, cfg.lr, cfg.batch_size, ema_decay=cfg.ema_decay,
              parents=parents, validate=selection(cfg, ctx, proc, teacher))
    update_metrics(cfg, ctx, {"student": dict(iters=out["step"], train_seconds=out["wall"],
                                              validation=out["validation"])})
    if cfg.control_iters:
        control = copy.deepcopy(teacher).train().requires_grad_(True)
        data = epoch_batches((images,), cfg, ctx, cfg.teacher_batch)
        out = fit(cfg, ctx, "control", control, teacher_objective(cfg, proc), data,
                  control_steps(cfg), cfg.lr, cfg.teacher_batch, ema_decay=cfg.ema_decay,
                  parents=parents)
        update_metrics(cfg, ctx, {"control": dict(iters=out["step"], train_seconds=out["wall"])})


def selection(cfg: Config, ctx, proc, teacher) -> validation.Selection:
    """Di4C's validation (eval/validation.py), rank 0: n_samples samples (at most the held-out
    count) at each student step count, scored against images never trained on (load_images
    "val"): the classifier's Frechet distance to an embedded set's held-out 20 %, or the FID to
    CIFAR-10's test batch (the eval's package; its statistics cached as fid_stats_pigm_val.npz)."""
    val = load_images(cfg, "val")
    key, metric = report.image_scorer(val, cfg.S, cfg.dataset, cfg.out_dir, split="val") \
        if ctx.rank == 0 else (None, None)
    n = min(cfg.n_samples, len(val))

    def score(net) -> dict:
        return {f"@{N}": metric(sample_images(net, proc, cfg, N, n, seed=cfg.seed + 23)[0])[key]
                for N in cfg.student_steps}
    return validation.Selection.against(ctx, score, teacher)


def control_steps(cfg: Config) -> int:
    """--control_iters, or for -1 the Di4C run's compute in network rows (3 with gradients, 1
    without): a Di4C step runs the student on 2 B L rows with, the target on B L and the teacher
    on 2 B without; a step of the teacher's own loss costs 3 per image."""
    if cfg.control_iters >= 0:
        return cfg.control_iters
    B, L = cfg.batch_size, cfg.L
    return math.ceil(cfg.distil_iters * (3 * 2 * B * L + B * L + 2 * B) / (3 * cfg.teacher_batch))


def load_net(cfg: Config, name: str, C: int, H: int, lam: bool, dev) -> tuple:
    """`{name}.pt` of this run (EMA weights), or --teacher_ckpt / --student_ckpt: ours (built as
    its checkpoint says: a student as teacher is a mixture, docs/method.md (35)) or tauLDR's
    layout (pretrained/tauldr.py), loaded strictly. Returns (net in eval mode, state with "id"
    and "lam_dim")."""
    given = {"teacher": cfg.teacher_ckpt, "student": cfg.student_ckpt}.get(name, "")
    path = given or run_path(cfg, f"{name}.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path!r} not found: run --stage "
                         f"{'teacher' if name == 'teacher' else 'distill'} first (same --out_dir), "
                         "or pass --teacher_ckpt")
    net = build_unet(cfg, C, H, lam).to(dev)
    sd = None
    if given:
        from pretrained import tauldr
        sd = tauldr.load_ema_weights(path, net)          # None: not in tauLDR's layout
    if sd is not None:
        st = {"ema": sd, "format": "tauLDR (EMA weights)", "id": weights_id(sd),
              "lam_dim": int(lam)}
    else:                              # ours: also refuse one written with another config
        st = load_checkpoint(path, asdict(cfg), ARCH_KEYS)
        sd = st["ema"] if st.get("ema") is not None else st["model"]
        st["lam_dim"] = int(any(core.is_lam_param(k) for k in sd))
        if st["lam_dim"] or lam:       # a student runs as it was trained (a teacher too: round 2)
            net = build_unet(cfg, C, H, bool(st["lam_dim"])).to(dev)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise SystemExit(f"error: {path!r} does not match this network ({str(e)[:300]})") from None
    return net.eval().requires_grad_(False), st


# -----------------------------------------------------------------------------
# Sampling: the student's, the teacher's, the hybrid's and the control's sample sets


@torch.no_grad()
def sample_images(net, proc, cfg: Config, n_steps: int, n: int, teacher=None, n_teacher: int = 0,
                  seed: int = 0) -> tuple:
    """docs/method.md (37): N NFEs on linspace(1, MIN_TIME, N), a fresh lambda per sample per
    step, the last NFE an argmax; the hybrid (38) hands its last n_teacher NFEs to the teacher.
    Returns (images (n, C, H, H) uint8, NFE per sample)."""
    times, shape = torch.linspace(1, MIN_TIME, n_steps), (net.C, net.H, net.H)
    out, nfe = [], 0
    for i in range(0, n, cfg.sample_batch):
        b = min(cfg.sample_batch, n - i)
        g = torch.Generator(device=proc.R.device).manual_seed(seed * 1_000_003 + i)
        x, nfe = core.ancestral_sample(proc, proc.prior(b, math.prod(shape), g), times, net,
                                       lam_dim=net.lam_dim, teacher=teacher, n_teacher=n_teacher,
                                       teacher_lam_dim=getattr(teacher, "lam_dim", 0), generator=g)
        out.append(x.view(b, *shape).to(torch.uint8).cpu())
    return torch.cat(out), nfe


def sampler_runs(cfg: Config) -> list:
    """(label, net name, steps, teacher NFEs) for every sample set of the eval table."""
    runs = [(f"teacher@{n}", "teacher", n, 0) for n in cfg.steps]
    runs += [(f"student@{n}", "student", n, 0) for n in cfg.student_steps]
    runs += [(f"hybrid@{n}", "student", n, cfg.hybrid_teacher_steps) for n in cfg.student_steps
             if n > cfg.hybrid_teacher_steps]
    runs += [(f"control@{n}", "control", n, 0) for n in cfg.student_steps if cfg.control_iters]
    return runs


def load_nets(cfg: Config, C: int, H: int, dev) -> tuple:
    """The teacher, the student and (with --control_iters) the control, each checked to descend
    from the current teacher (a released student records none): ({name: net}, {name: id})."""
    nets, ids = {}, {}
    for name in ("teacher", "student", "control")[:3 if cfg.control_iters else 2]:
        nets[name], st = load_net(cfg, name, C, H, name == "student", dev)
        ids[name] = st["id"]
        if name == "control" or (name == "student" and not cfg.student_ckpt):
            check_lineage(run_path(cfg, f"{name}.pt"), st, {"teacher": ids["teacher"]})
    return nets, ids


def stage_sample(cfg: Config, ctx, images: torch.Tensor, proc):
    """Every sample set of sampler_runs, split over ranks -> out_dir/samples_<label>.pt (uint8
    images, the ids of their network and of the teacher) and grid_<label>.png."""
    import torchvision
    nets, ids = load_nets(cfg, images.shape[1], images.shape[2], ctx.device)
    share = math.ceil(cfg.n_samples / ctx.world_size)
    lo, hi = ctx.rank * share, min(cfg.n_samples, (ctx.rank + 1) * share)
    for label, name, n_steps, n_teacher in sampler_runs(cfg):
        x, nfe = sample_images(nets[name], proc, cfg, n_steps, hi - lo, teacher=nets["teacher"],
                               n_teacher=n_teacher, seed=cfg.seed + lo)
        parts = ctx.gather(x)                                  # every rank's share, in order
        if ctx.rank == 0:
            allx = torch.cat(parts)
            save_checkpoint(os.path.join(cfg.out_dir, f"samples_{label}.pt"),
                            {"images": allx, "nfe": nfe, "steps": n_steps, "model": name,
                             "config": asdict(cfg),
                             "parents": {name: ids[name], "teacher": ids["teacher"]}})
            torchvision.utils.save_image(allx[:256].float() / (cfg.S - 1),
                                         os.path.join(cfg.out_dir, f"grid_{label}.png"), nrow=16)
            ctx.log(f"sample: {label}: {len(allx)} images, {nfe} NFE")
        ctx.barrier()


# -----------------------------------------------------------------------------
# Evaluation: pigm's FID / IS or the 8x8 sets' classifier Frechet distance (eval/), latency


def stage_eval(cfg: Config, ctx, images: torch.Tensor, proc):
    """Score every sample set of sampler_runs (after checking that all of them are there and
    descend from the current networks) and time student and teacher at the student's steps."""
    if ctx.rank != 0:
        return ctx.barrier()
    (nets, ids), sets = load_nets(cfg, images.shape[1], images.shape[2], ctx.device), {}
    for label, name, _, _ in sampler_runs(cfg):
        path = run_path(cfg, f"samples_{label}.pt")
        sets[label] = load_checkpoint(path, asdict(cfg), SAMPLE_KEYS)
        check_lineage(path, sets[label], {name: ids[name], "teacher": ids["teacher"]})
    key, score = report.image_scorer(images, cfg.S, cfg.dataset, cfg.out_dir, cfg.fid_stats)
    bar, res = ctx.progress(len(sets), "eval", unit="set"), {}
    for label, s in sets.items():
        bar.update(1)
        res[label] = {**score(s["images"]), "nfe": s["nfe"], "steps": s["steps"]}
    bar.close()

    def draw(k, n, r):                 # one sampler call (the latency's unit): sample_batch images
        return sample_images(nets[k], proc, cfg, n, cfg.sample_batch, seed=r)
    report.finish(cfg, ctx, res, key, draw, os.path.basename(__file__))
    ctx.barrier()


# -----------------------------------------------------------------------------
# Main: teacher -> distill (+ control) -> sample -> eval


def run_needs(cfg: Config) -> list:
    """What the stages of this run need beyond the config, checked before any work (preflight):
    the given checkpoints, and on CIFAR-10 the FID / IS package (Di4C's validation, the eval),
    --fid_stats (the eval) and the test batch (the validation's images)."""
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    needs = checkpoint_needs(cfg, stages)
    if {"distill", "eval"} & set(stages) and cfg.dataset not in EMBEDDED:
        from eval import inception
        needs += inception.pigm_needs(cfg.fid_stats if "eval" in stages else "")
        test = os.path.join(cfg.data_dir, "cifar-10-batches-py", "test_batch")
        if "distill" in stages and not cfg.download and not os.path.exists(test):
            needs.append((f"{test!r} not found (Di4C's validation scores against it)",
                          "put CIFAR-10's test batch there, or add --download true"))
    return needs


def main(cfg: Config):
    check_config(cfg)
    if cfg.ch % 4:
        raise SystemExit(f"error: --ch must be a multiple of 4 (GroupNorm), got {cfg.ch}")
    preflight(run_needs(cfg))
    torch.manual_seed(cfg.seed)
    run_stages(cfg, "cifar10_gaussian.py", {"teacher": stage_teacher, "distill": stage_distill,
                                            "sample": stage_sample, "eval": stage_eval},
               load_images(cfg), lambda cfg, ctx: build_process(cfg, ctx.device))


# -----------------------------------------------------------------------------
# Plumbing: the infrastructure block shared by the three domain scripts, then __main__
# -----------------------------------------------------------------------------
# Infrastructure (identical in the three domain scripts; tests/test_layout.py checks it whole):
# config and CLI, processes and logging, atomic checkpoints with their lineage, per-step RNG,
# the training loop. It uses the script's Config, PRESETS, CHOICES, LIMITS, RESUME_KEYS.


def parse_config(cls, argv=None):
    """CLI -> Config: `--preset` picks a preset, then every `--field value` wins."""
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for f in fields.values():
        elem = float if f.type is tuple and any(isinstance(x, float) for x in f.default) else int
        kind = {bool: dict(type=str.lower, choices=("true", "false")),
                tuple: dict(type=elem, nargs="*")}.get(f.type, dict(type=f.type))
        p.add_argument(f"--{f.name}", default=None, help=f"default: {f.default}", **kind)
    return make_config(cls, **{k: v == "true" if fields[k].type is bool else v
                               for k, v in vars(p.parse_args(argv)).items() if v is not None})


def make_config(cls, **overrides):
    """Config = dataclass defaults (the paper preset) <- PRESETS[preset] <- explicit overrides."""
    preset = overrides.get("preset", "paper")
    if preset not in PRESETS:
        raise SystemExit(f"error: --preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise SystemExit(f"error: unknown config field(s) {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check_config(cfg):
    """Before any work: CHOICES (allowed values), LIMITS ((lo, hi) for every element), out_dir."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"error: --{name} must be one of {', '.join(map(str, allowed))}; "
                             f"got {getattr(cfg, name)!r}")
    for name, (lo, hi) in LIMITS.items():
        v = getattr(cfg, name)
        vs = v if isinstance(v, tuple) else (v,)
        if not vs or any(not lo <= x <= hi for x in vs):
            raise SystemExit(f"error: --{name} must be {'values ' if isinstance(v, tuple) else ''}"
                             f"in [{lo}, {hi}]; got {v}")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise SystemExit(f"error: --out_dir {cfg.out_dir!r} is a file, not a folder")


def setup_dist(device: str = "", timeout_min: float = 60.0):
    """torchrun: one process per GPU (nccl) or CPU worker (gloo); plain python: one process."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_min))
    return rank, world, dev


@dataclass
class Ctx:
    """This process. Every collective goes through barrier / sum / gather, with tensors on the
    training device (nccl serves CUDA tensors only; tests/test_scale.py checks it)."""
    rank: int
    world_size: int
    device: torch.device
    out_dir: str
    dtype: str

    def log(self, *msg):               # rank 0: print through tqdm (bars stay intact), log.txt
        if self.rank == 0:
            tqdm.write(" ".join(map(str, msg)))
            with open(os.path.join(self.out_dir, "log.txt"), "a") as f:
                f.write(" ".join(map(str, msg)) + "\n")

    def progress(self, total=None, desc: str = "", initial: int = 0, unit: str = "it"):
        return tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
                    disable=self.rank != 0, mininterval=1.0)

    def autocast(self):
        return (nullcontext() if self.dtype == "float32"
                else torch.autocast(self.device.type, dtype=torch.bfloat16))

    def barrier(self):
        if self.world_size > 1:
            dist.barrier(**{"device_ids": [self.device.index]} if self.device.type == "cuda"
                         else {})

    def sum(self, x: torch.Tensor) -> torch.Tensor:   # float32, on the training device
        x = x.detach().float().to(self.device).clone()
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def gather(self, obj) -> list:     # every rank's picklable obj (CPU tensors), rank order
        parts = [obj] if self.world_size == 1 else [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(parts, obj)
        return parts


def run_stages(cfg, script: str, stages: dict, *args):
    """Start this process, then run --stage (or all stages in order), logging each one's wall
    time (metrics.json too). stages: {name: f(cfg, ctx, *args)}; an arg may be f(cfg, ctx)."""
    rank, world_size, device = setup_dist(cfg.device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ctx = Ctx(rank, world_size, device, cfg.out_dir, cfg.dtype)
    ctx.log(f"{script} | torch {torch.__version__} | python {platform.python_version()} | "
            f"device {device} | world size {world_size}")
    ctx.log("config " + json.dumps(asdict(cfg)))
    walls, t_start = {}, time.time()
    args = [a(cfg, ctx) if callable(a) else a for a in args]
    for name in stages if cfg.stage == "all" else (cfg.stage,):
        t0 = time.time()
        stages[name](cfg, ctx, *args)
        walls[name] = time.time() - t0
        ctx.log(f"stage {name} done in {walls[name]:.1f} s")
    update_metrics(cfg, ctx, {"wall_seconds": {**walls, "total": time.time() - t_start}})
    if world_size > 1:
        ctx.barrier()                  # without it gloo aborts intermittently at exit
        dist.destroy_process_group()


def save_checkpoint(path: str, state: dict):
    """Atomic: write a temporary file in the same folder, then rename it over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: could not write checkpoint {path!r} ({e}); the old one is kept")


def load_checkpoint(path: str, cfg_dict: dict, keys_that_must_match=()) -> dict:
    """Load a checkpoint of this script; refuse a foreign one or one from another config."""
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict) or "config" not in state:
        raise SystemExit(f"error: {path!r} is not a checkpoint written by this script")
    bad = [f"{k}: checkpoint {state['config'].get(k)!r} vs now {cfg_dict.get(k)!r}"
           for k in keys_that_must_match if state["config"].get(k) != cfg_dict.get(k)]
    if bad:
        raise SystemExit(f"error: checkpoint {path!r} was written with another config "
                         f"({', '.join(bad)})")
    return state


def weights_id(state_dict: dict) -> str:
    """A content hash of a state dict: the identity its children and samples record."""
    h = hashlib.sha1()
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu().reshape(-1).contiguous()
        h.update(f"{k}{tuple(state_dict[k].shape)}{v.dtype}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def check_lineage(path: str, state: dict, parents: dict):
    """Refuse a checkpoint or sample file made from other parents ({name: weights_id})."""
    have = state.get("parents", {})
    bad = [f"{k} {have.get(k)} vs now {v}" for k, v in parents.items() if have.get(k) != v]
    if bad:
        raise SystemExit(f"error: {path!r} was made from another {', '.join(bad)}; rerun the "
                         "stage that writes it (or start in a fresh --out_dir)")


def ckpt_path(cfg, name: str) -> str:
    return os.path.join(cfg.out_dir, f"{name}.pt")


def run_path(cfg, *parts: str) -> str:  # what a stage reads: --run_dir (a finished run) or out_dir
    return os.path.join(cfg.run_dir or cfg.out_dir, *parts)


def batch_plan(ctx: Ctx, global_batch: int, micro_batch: int = 0) -> list:
    """This rank's rows of a global batch, one slice per micro-step: the first B mod W ranks take
    a row more, each share is cut into micro-batches of at most micro_batch rows (0: one), and
    every rank has the same number of micro-steps (its last one, the DDP sync, is non-empty)."""
    B, W, r = global_batch, ctx.world_size, ctx.rank
    if B < W:
        raise SystemExit(f"error: a global batch of {B} cannot be split over {W} ranks (each "
                         "rank needs a row); use fewer GPUs or a larger batch")
    share, start = B // W + (r < B % W), r * (B // W) + min(r, B % W)
    k = 1 if micro_batch <= 0 else -(-(-(-B // W)) // micro_batch)     # ceil(ceil(B/W) / m)
    cut = [start + share * j // k for j in range(k + 1)]
    return [slice(a, b) for a, b in zip(cut, cut[1:])]


def lr_factor(step: int, warmup: int, decay_iters: int = 0) -> float:
    """Linear warm-up, then constant or (decay_iters > 0) cosine to 0 at step decay_iters."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if decay_iters <= 0 or step < warmup:
        return warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, decay_iters - warmup))))


def fit(cfg, ctx: Ctx, name: str, raw: nn.Module, loss_fn, batches, iters: int, lr: float,
        global_batch: int, *, betas=(0.9, 0.999), weight_decay: float = 0.0, warmup: int = 0,
        cosine: bool = False, ema_decay: float = 0.0, parents: Optional[dict] = None,
        validate=None) -> dict:
    """Every stage's training loop: AdamW on core.lam_param_groups, lr_factor, grad clip 1, EMA
    warmed up as min(decay, (1 + n) / (10 + n)); a step's gradient is that of the mean loss over
    `global_batch` rows at any world size. batches(step, rows, g) -> those rows of batch `step`;
    loss_fn(model, batch, g) -> (loss (b,), {term: (b,)}). <name>_state.pt is written every
    ckpt_every steps and on Ctrl-C; --resume continues from it exactly unless its config or
    `parents` ({name: weights_id}) differ. A non-finite loss or gradient stops before the update.
    validate(step, model) (eval/validation.Selection) scores the weights fit writes at step 0,
    every ckpt_every steps and at the end, and keeps the best. Writes <name>.pt (the best
    weights with validate); returns {ema, step, wall, validation}."""
    parents, plan = parents or {}, batch_plan(ctx, global_batch, cfg.micro_batch)
    state_path = ckpt_path(cfg, f"{name}_state")
    opt = torch.optim.AdamW(core.lam_param_groups(raw, lr, cfg.lam_lr_mult), betas=betas,
                            weight_decay=weight_decay)
    ema = copy.deepcopy(raw).requires_grad_(False) if ema_decay else None
    kept = lambda: raw if ema is None else ema          # the weights <name>.pt holds
    step, wall, record = 0, 0.0, None
    if cfg.resume and os.path.exists(state_path):
        state = load_checkpoint(state_path, asdict(cfg), RESUME_KEYS)
        check_lineage(state_path, state, parents)
        raw.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, wall = state["step"], state["wall"]
        if validate is not None:
            validate.load_state_dict(state["validation"])
        ctx.log(f"{name}: resumed from {state_path} at step {step}")

    def snapshot(path, finished=False):  # training state (with optimizer) or finished model
        if ctx.rank == 0:
            save_checkpoint(path, dict(
                model=raw.state_dict(), ema=ema.state_dict() if ema else None, step=step, wall=wall,
                config=asdict(cfg), kind=name, lam_dim=getattr(raw, "lam_dim", 0),
                parents=parents, id=weights_id(kept().state_dict()) if finished else None,
                optimizer=None if finished else opt.state_dict(),
                validation=validate.state_dict() if validate and not finished else None))

    # no batch norm, so buffers are constants: not broadcasting them lets a rank with fewer
    # rows skip an empty micro-step while the others run forward
    ddp = DDP(raw, broadcast_buffers=False) if ctx.world_size > 1 else raw
    model = torch.compile(ddp) if cfg.compile else ddp
    raw.train()
    ctx.log(f"{name}: global batch {global_batch} = {ctx.world_size} rank(s) x {len(plan)} "
            f"micro-step(s) of <= {max(r.stop - r.start for r in plan)} rows")
    bar = ctx.progress(iters, name, step)
    if validate is not None and step == 0:
        validate(0, kept())
    try:
        while step < iters:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr * group["mult"] * lr_factor(step, warmup, iters if cosine else 0)
            opt.zero_grad(set_to_none=True)
            names, sums = accumulate(cfg, ctx, name, model, ddp, loss_fn, batches, step, plan,
                                     global_batch)
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
            vals = ctx.sum(torch.cat([sums / global_batch, norm.float()[None] / ctx.world_size]))
            names.append("grad_norm")
            if not torch.isfinite(vals).all():
                bad = [k for k, v in zip(names, vals.tolist()) if not math.isfinite(v)]
                raise SystemExit(f"error: {name} step {step}: non-finite {', '.join(bad)}; stopped "
                                 f"before the update, {state_path} (if any) is the last good "
                                 "state; try a lower --lr")
            opt.step()
            if ema is not None:        # warm-up: early EMAs must not keep the random init
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), raw.parameters()):
                        pe.lerp_(pm, 1 - min(ema_decay, (1 + step) / (10 + step)))
            step, wall = step + 1, wall + time.perf_counter() - t0
            bar.update(1)
            if step % cfg.log_every == 0 or step == iters:
                bar.set_postfix(loss=f"{vals[0].item():.4f}")
                ctx.log(f"{name} step {step:06d} | " + " | ".join(
                    f"{k} {v:.4f}" for k, v in zip(names, vals.tolist()))
                    + f" | lr {opt.param_groups[0]['lr']:.1e} | {1000 * wall / step:.0f} ms/it")
            if validate is not None and (step % cfg.ckpt_every == 0 or step == iters):
                validate(step, kept())
            if step % cfg.ckpt_every == 0:
                snapshot(state_path)
    except KeyboardInterrupt:
        snapshot(state_path)
        raise SystemExit(f"interrupted: {name} state at step {step} saved to {state_path}; "
                         "rerun with --resume true to continue") from None
    finally:
        bar.close()
    snapshot(state_path)
    if validate is not None:
        record = validate.restore_best(kept())
    snapshot(ckpt_path(cfg, name), finished=True)
    ctx.barrier()
    return {"ema": ema, "step": step, "wall": wall, "validation": record}


def accumulate(cfg, ctx: Ctx, name: str, model, ddp, loss_fn, batches, step: int, plan: list,
               global_batch: int) -> tuple:
    """One step's backward passes over this rank's micro-batches (`plan`), each row's loss
    weighted W / B so that DDP's mean over ranks is the global batch's mean. Per micro-batch, one
    generator seeded by (seed, stage, step, first global row), which also seeds the global RNG
    (dropout): resume is exact without saved RNG state, at any rank count (docs/scale.md).
    Returns (names, (n,) row sums of the loss and of every term)."""
    names, sums = [], torch.zeros(0)
    for j, rows in enumerate(plan):
        if rows.start == rows.stop:    # a rank with fewer rows: nothing to do (not a sync step)
            continue
        seed = (cfg.seed * 1_000_003 + sum(map(ord, name)) * 7919 + rows.start * 2 ** 32
                + step) % (2 ** 63)
        torch.manual_seed(seed)
        g = torch.Generator(device=ctx.device).manual_seed(seed)
        batch = batches(step, rows, g)
        with nullcontext() if j == len(plan) - 1 or ctx.world_size == 1 else ddp.no_sync():
            with ctx.autocast():
                loss, terms = loss_fn(model, batch, g)
            (loss.sum() * (ctx.world_size / global_batch)).backward()
        names = ["loss", *terms]
        row_sums = torch.stack([v.detach().float().sum() for v in (loss, *terms.values())])
        sums = row_sums if not len(sums) else sums + row_sums
    return names, sums


def epoch_batches(tensors: tuple, cfg, ctx: Ctx, global_batch: int):
    """fit's `batches` over in-memory tensors, a pure function of (seed, step): epoch e is a
    permutation drawn from seed + e (as DistributedSampler), its batch s the items [s B, (s + 1) B),
    the rest of the epoch dropped; a rank takes its batch_plan rows (int16/32 -> long)."""
    n, per_epoch = len(tensors[0]), len(tensors[0]) // global_batch
    if per_epoch == 0:
        raise SystemExit(f"error: {n} training items cannot fill a global batch of {global_batch}")
    order = functools.lru_cache(1)(
        lambda e: torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + e)))

    def batch(step: int, rows: slice, g=None) -> tuple:
        i = step % per_epoch * global_batch
        idx = order(step // per_epoch)[i + rows.start:i + rows.stop]
        return tuple(t[idx].to(ctx.device).long() if t.dtype in (torch.int16, torch.int32)
                     else t[idx].to(ctx.device) for t in tensors)
    return batch


# End of the infrastructure block.


if __name__ == "__main__":
    main(parse_config(Config))
