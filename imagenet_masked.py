"""
Di4C on class-conditional masked image generation (paper Sec. 5.2, teacher = MaskGIT). Paper
claim: a 4-step Di4C student matches or beats the 8-step MaskGIT teacher in FID-IS on ImageNet 256.

Images become tokens once (stage `tokenize`), a MaskGIT teacher (a bidirectional transformer with a
class token) is trained on them, a Di4C mixture student (the same network plus a lambda path that
starts at zero) is distilled from it with the core's losses in the MaskGIT variant (docs/method.md
(30), (32)) and sampled with MaskGIT's confidence sampler with CFG ((39)-(41)); eval/ scores them.

ImageNet: torchrun --standalone --nproc_per_node=8 imagenet_masked.py --data_dir data/imagenet \
              --teacher_ckpt pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_256.pth
CPU demo (8x8 digits as tokens, 5 pair labels): python imagenet_masked.py --preset demo
Stages: --stage tokenize | teacher | distill | sample | eval | all; --resume true continues one.
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import di4c_core as core
from eval import plot, validation
from eval.preflight import check_round, checkpoint_needs, package_needs, preflight
from eval.results_table import update_metrics

# -----------------------------------------------------------------------------
# Config (defaults = the paper preset; --preset demo / smoke override a few fields)


@dataclass
class Config:
    preset: str = "paper"          # paper | demo | smoke
    stage: str = "all"             # tokenize | teacher | distill | sample | eval | all
    out_dir: str = "runs/imagenet"
    run_dir: str = ""              # read checkpoints and samples from here (default out_dir)
    resume: bool = False           # continue every training stage from its checkpoint
    # data and tokens
    dataset: str = "imagenet"      # imagenet (data_dir/{train,val}/<class>/) | folder
                                   # (data_dir/<class>/) | digits | photos | scenes (8x8)
    label_div: int = 1             # embedded sets: condition on class // label_div (2: pairs)
    data_dir: str = "data/imagenet"
    img_size: int = 256            # Resize + CenterCrop, as MaskGIT-pytorch; the VQ-VAE's key
    vqgan_ckpt: str = "pretrained_maskgit/VQGAN/last.ckpt"  # "" = a VQ-VAE trained here
    # model (MaskGIT-pytorch's transformer)
    n_layer: int = 24
    n_embd: int = 768
    n_head: int = 16
    mlp_dim: int = 3072
    dropout: tuple = (0.1, 0.1)    # the teacher's and control's; the student's in training
    # teacher (MaskGIT)
    teacher_ckpt: str = ""         # ours or MaskGIT-pytorch's .pth; "" = out_dir/teacher.pt
    teacher_iters: int = 755_200
    batch_size: int = 512          # global images per teacher / control / VQ-VAE step
    lr: tuple = (1e-4, 1e-5)       # AdamW: the teacher's; Di4C's and the control's (constant)
    warmup: int = 2500             # the teacher's LR warm-up steps
    teacher_cosine: bool = False   # cosine decay of the teacher LR to 0 after warm-up (demo)
    label_smoothing: float = 0.1
    ema: tuple = (0.0, 0.0)        # EMA decay: the teacher's; the student's and control's
    # di4c (MaskGIT variant, docs/method.md (30), (32); the "di4c-d" defaults)
    student_ckpt: str = ""         # "" = out_dir/student.pt; or the authors' maskgit-di4c-d.pth
    distil_iters: int = 100_000
    distil_batch: int = 4          # global x_t per step (2 per GPU x 2 GPUs), L lambdas each
    lam_lr_mult: float = 1.0       # learning-rate multiplier of the lambda path
    L: int = 32
    alpha_const: float = 0.1       # alpha(t) = alpha_const sigmoid(20 (t - 1/2)); 0: "di4c"
    control_iters: int = -1        # the teacher trained on with its own loss: -1 = the Di4C
                                   # run's compute (control_steps), 0 = none, N = N steps
    # sampling and evaluation (docs/method.md (39)-(41))
    steps: tuple = (4, 8)          # teacher step counts
    student_steps: tuple = (4,)    # student and control step counts
    cfg_ws: tuple = (3.0, 1.0, 2.0, 4.0, 6.0)  # CFG weights besides w = 0 (FID-IS sweep, Fig. 3)
    r_temp: float = 4.5            # Gumbel temperature of the confidence, annealed to 0
    lfg: bool = False              # the teacher gives the unconditional CFG branch
    sampler: str = "ours"          # ours (method.md (39)-(41)) | di4c (the authors', lambda token)
    n_per_class: int = 50          # 50 x 1000 classes = the 50k FID samples
    sample_batch: int = 64
    # system
    device: str = ""               # "" = cuda if available else cpu
    dtype: str = "bfloat16"        # float32 | bfloat16 (autocast; draws stay float64)
    seed: int = 0
    micro_batch: int = 0           # rows per forward pass and GPU; 0 = the GPU's whole share
    compile: bool = False          # torch.compile the network in training
    log_every: int = 100
    ckpt_every: int = 10_000


PRESETS = {
    "paper": {},
    # the 8x8 digits as 64 pixel tokens, 5 digit-pair labels; why each value: docs/imagenet.md
    "demo": dict(out_dir="runs/imagenet_demo", dataset="digits", label_div=2, img_size=8,
                 n_layer=3, n_embd=64, n_head=4, mlp_dim=256, dropout=(0.0, 0.0),
                 teacher_iters=5000, batch_size=64, lr=(1e-3, 1e-4), warmup=100,
                 teacher_cosine=True, label_smoothing=0.0, ema=(0.995, 0.99), distil_iters=400,
                 distil_batch=16, lam_lr_mult=10.0, L=16, alpha_const=1.0, steps=(2, 4, 8, 16),
                 student_steps=(2, 4), cfg_ws=(1.0,), r_temp=20.0, n_per_class=1000,
                 sample_batch=500, dtype="float32", log_every=100, ckpt_every=100),
    # seconds, for tests
    "smoke": dict(out_dir="runs/imagenet_smoke", dataset="digits", img_size=16, n_layer=1,
                  n_embd=32, n_head=2, mlp_dim=64, dropout=(0.0, 0.1), teacher_iters=4,
                  batch_size=8, lr=(1e-3, 1e-4), warmup=2, distil_iters=3, distil_batch=2, L=4,
                  steps=(2, 4), student_steps=(2,), cfg_ws=(1.0,), n_per_class=2,
                  sample_batch=10, dtype="float32", log_every=1, ckpt_every=2),
}
STAGES = ("tokenize", "teacher", "distill", "sample", "eval")
TOKEN_KEYS = ("dataset", "label_div", "data_dir", "img_size", "vqgan_ckpt")
ARCH_KEYS = ("dataset", "img_size", "n_layer", "n_embd", "n_head", "mlp_dim")
RESUME_KEYS = ARCH_KEYS + ("vqgan_ckpt", "batch_size", "distil_batch", "L", "lr", "warmup",
                           "seed", "dropout", "label_smoothing", "ema", "lam_lr_mult",
                           "alpha_const", "r_temp", "teacher_cosine", "sampler")
SAMPLE_KEYS = ("n_per_class", "r_temp", "lfg", "seed", "dtype", "sampler")
CHOICES = {"stage": STAGES + ("all",), "dataset": ("imagenet", "folder", "digits", "photos", "scenes"),
           "dtype": ("float32", "bfloat16"), "sampler": ("ours", "di4c")}
EMBEDDED = ("digits", "photos", "scenes")   # 8x8, 17 grey levels as tokens, eval/digits.py
INF, TINY = float("inf"), 1e-12
LIMITS = {                             # (lo, hi), inclusive; check_config applies them
    **dict.fromkeys(("n_layer", "n_embd", "n_head", "mlp_dim", "teacher_iters", "batch_size",
                     "distil_iters", "distil_batch", "L", "steps", "student_steps", "n_per_class",
                     "sample_batch", "log_every", "ckpt_every"), (1, INF)),
    **dict.fromkeys(("warmup", "lam_lr_mult", "alpha_const", "r_temp", "seed", "micro_batch"),
                    (0, INF)),
    "dropout": (0, 0.99), "label_smoothing": (0, 0.99), "ema": (0, 1 - 1e-9), "lr": (TINY, 1),
    "label_div": (1, 10), "img_size": (8, INF), "control_iters": (-1, INF)}
LABEL_DROP = 0.1                       # training labels dropped (index n_classes) for CFG
R_DELTA = 0.05                         # teacher step r -> r + R_DELTA; distil where r >= 1 - it
SM_TEMP = 1.0                          # the samplers' inverse temperature (multiplies logits)
K_T = 8                                # the training-time teacher step's Gumbel ramp (34)
WEIGHT_DECAY = 1e-5                    # AdamW's, every training stage (MaskGIT-pytorch's)
GRID_CLASSES, WORKERS = 10, min(8, os.cpu_count() or 1)   # PNG grids of the first classes
VAL_PER_CLASS = 10                     # ImageNet validation: 10 x 1000 samples per cell (FID-10k)

# -----------------------------------------------------------------------------
# Data and tokens: images resized as MaskGIT-pytorch (pretrained/maskgit.py) through its VQGAN or
# a VQ-VAE (pretrained/taming_vqgan.py), or the embedded 8x8 images' 17 grey levels (D = 64)


def token_kind(cfg: Config) -> str:
    """pixels (embedded sets), vqgan (--vqgan_ckpt) or vqvae (--vqgan_ckpt '')."""
    return "pixels" if cfg.dataset in EMBEDDED else "vqgan" if cfg.vqgan_ckpt else "vqvae"


def image_folder(cfg: Config, split: str):
    """data_dir/<split>/<class>/ (imagenet) or data_dir/<class>/ (folder): (3, R, R) uint8."""
    from pretrained import maskgit
    root = os.path.join(cfg.data_dir, split) if cfg.dataset == "imagenet" else cfg.data_dir
    return maskgit.image_folder(root, cfg.img_size)


def val_images(cfg: Config):
    """The validation images (the FID reference of the eval and of Di4C's validation), one
    (R, R, 3) uint8 array at a time."""
    from pretrained import maskgit
    return (img.permute(1, 2, 0).numpy() for x, _ in maskgit.image_batches(
        image_folder(cfg, "val"), WORKERS) for img in x)


def tokenizer(cfg: Config, ctx: "Ctx", ds=None):
    """The VQ model, frozen on the device: MaskGIT-pytorch's VQGAN, or the VQ-VAE trained on ds
    (stage tokenize, resumable) or read from vqvae.pt; None for pixel tokens."""
    if token_kind(cfg) == "pixels":
        return None
    from pretrained import maskgit, taming_vqgan as tv
    if token_kind(cfg) == "vqgan":
        vq = tv.load_vqgan(cfg.vqgan_ckpt, cfg.img_size)
    elif ds is None:
        vq = tv.build_vqvae(cfg.img_size)
        vq.load_state_dict(load_checkpoint(run_path(cfg, "vqvae.pt"), asdict(cfg),
                                           TOKEN_KEYS)["model"])
    else:
        images, labels = maskgit.load_images(ds, WORKERS)
        ctx.log(f"vqvae: {len(images)} images {tuple(images.shape[1:])}, "
                f"{tv.VQVAE[cfg.img_size]}")
        torch.manual_seed(cfg.seed)
        vq = tv.build_vqvae(cfg.img_size).to(ctx.device)
        fit(cfg, ctx, "vqvae", vq, tv.vqvae_loss(vq), epoch_batches((images, labels), cfg, ctx,
                                                               cfg.batch_size),
            tv.VQVAE_ITERS[cfg.img_size], tv.VQVAE_LR, cfg.batch_size, betas=(0.5, 0.9),
            weight_decay=WEIGHT_DECAY)
    return vq.to(ctx.device).eval().requires_grad_(False)


def stage_tokenize(cfg: Config, ctx: "Ctx"):
    """Images -> token ids, once, into out_dir/codes.pt (training never runs the encoder): the
    embedded images' pixels, or every training image and its mirror (rows 2i, 2i + 1) through
    the VQ encoder (each rank encodes a contiguous share; gathered on every rank)."""
    path = ckpt_path(cfg, "codes")
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if all(state["config"].get(k) == asdict(cfg).get(k) for k in TOKEN_KEYS) and (
                "val_codes" in state or token_kind(cfg) != "pixels"):
            ctx.log(f"tokenize: reusing {path} ({len(state['codes'])} items)")
            return
    if token_kind(cfg) == "pixels":
        from eval import digits
        images, labels, val, val_labels = digits.digits_split(cfg.dataset)   # 80 / 20, fixed
        codes, K, grid, labels = images.flatten(1), digits.LEVELS, 8, labels // cfg.label_div
        held_out = {"val_codes": val.flatten(1).to(torch.int16),      # validation (Di4C) only
                    "val_labels": val_labels // cfg.label_div}
        classes = digits.class_names(cfg.dataset, cfg.label_div)
    else:
        from pretrained import maskgit, taming_vqgan
        ds = image_folder(cfg, "train")
        vq, n, r, W = tokenizer(cfg, ctx, ds), len(ds), ctx.rank, ctx.world_size
        share = torch.utils.data.Subset(ds, range(r * n // W, (r + 1) * n // W))
        mine = maskgit.image_batches(share, WORKERS)
        parts = ctx.gather(taming_vqgan.encode_mirrored(vq, mine, ctx.device))   # rank order
        codes, labels = (torch.cat(c) for c in zip(*filter(None, parts)))
        K, grid, classes, held_out = vq.K, cfg.img_size // vq.f, ds.classes, {}
    if ctx.rank == 0:
        small = torch.int16 if K < 2 ** 15 else torch.int32
        save_checkpoint(path, {"codes": codes.to(small), "labels": labels.long(), "K": K,
                               "grid": grid, "n_classes": len(classes), "classes": classes,
                               "config": asdict(cfg), **held_out})
    ctx.barrier()
    ctx.log(f"tokenize: {len(codes)} items of {grid}x{grid} tokens, K = {K}, "
            f"{len(classes)} classes -> {path}")


def codes_meta(cfg: Config) -> dict:
    """codes.pt -> {"codes" (N, D) int16, "labels" (N,), "K", "grid", "n_classes", "classes"}."""
    path = run_path(cfg, "codes.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path!r} not found: run --stage tokenize first (same --out_dir)")
    return load_checkpoint(path, asdict(cfg), TOKEN_KEYS)


# -----------------------------------------------------------------------------
# Network: MaskGIT-pytorch's bidirectional transformer + the lambda path (docs/method.md (14))

NEG = -1e6                                 # logit of an impossible state


def sinusoid(v: torch.Tensor, dim: int = 128) -> torch.Tensor:
    """Timestep embedding of 1000 v, half sin, half cos: (N, 1) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=v.device) / (half - 1))
    ang = 1000 * v.float()[..., None] * freqs                                   # (N, k, dim/2)
    return torch.cat([ang.sin(), ang.cos()], -1).flatten(1)


class Block(nn.Module):
    """Pre-LN block: h + MHA(LN(h)), then h + MLP(LN(h)); dropout on attention weights and MLP."""

    def __init__(self, E: int, H: int, mlp: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, H, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(E, mlp), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp, E), nn.Dropout(dropout))

    def forward(self, h):
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class MaskTransformer(nn.Module):
    """denoiser(x_t (N, D) long, t, lam (N, 1) | None, y (N,) long) -> logits (N, D, S), S = K + 1.
    MaskGIT-pytorch's network (no time input; class n_classes = "dropped"), which never predicts
    [MASK] and copies revealed tokens (log-prob 0: zero in every Di4C term); `raw_logits` is
    upstream's output. A student (lam_dim 1) adds MLP(sinusoid(lam)), zero at init, to every
    token (docs/method.md (14)); lam_inject "token": the authors' lambda token instead."""

    def __init__(self, K: int, D: int, n_classes: int, n_layer: int, E: int, H: int, mlp: int,
                 dropout: float, lam_dim: int = 0, lam_inject: str = "add"):
        super().__init__()
        self.K, self.D, self.n_classes, self.lam_dim = K, D, n_classes, lam_dim
        V = K + 1 + n_classes + 1
        self.embed = nn.Embedding(V, E)
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, D + 1, E), 0.0, 0.02))
        self.first = nn.Sequential(nn.LayerNorm(E, eps=1e-12), nn.Dropout(dropout),
                                   nn.Linear(E, E), nn.GELU(), nn.LayerNorm(E, eps=1e-12),
                                   nn.Dropout(dropout), nn.Linear(E, E))
        self.blocks = nn.ModuleList(Block(E, H, mlp, dropout) for _ in range(n_layer))
        self.last = nn.Sequential(nn.LayerNorm(E, eps=1e-12), nn.Dropout(dropout),
                                  nn.Linear(E, E), nn.GELU(), nn.LayerNorm(E, eps=1e-12))
        self.out_bias = nn.Parameter(torch.zeros(D + 1, V))
        if lam_dim and lam_inject == "token":
            from pretrained.maskgit import LambdaToken
            self.lam_token = LambdaToken(E)
        elif lam_dim:
            self.lam_mlp = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, E))
            nn.init.zeros_(self.lam_mlp[-1].weight), nn.init.zeros_(self.lam_mlp[-1].bias)

    def raw_logits(self, x_t, lam=None, y=None):
        """MaskGIT-pytorch's output: (N, D, K + 1) float logits, [MASK] included."""
        N, D = x_t.shape
        tokens = torch.cat([x_t, y[:, None] + self.K + 1], 1)                   # (N, D + 1)
        h = self.embed(tokens) + self.pos                                       # (N, D + 1, E)
        if hasattr(self, "lam_token"):
            h = self.lam_token.append(h, sinusoid(lam))                         # (N, D + 2, E)
        elif self.lam_dim:
            h = h + self.lam_mlp(sinusoid(lam))[:, None]
        h = self.first(h)
        for block in self.blocks:
            h = block(h)
        h = self.last(h)[:, :D]                                                 # (N, D, E)
        return (h @ self.embed.weight[:self.K + 1].T).float() + self.out_bias[:D, :self.K + 1]

    def forward(self, x_t, t=None, lam=None, y=None):
        logits = self.raw_logits(x_t, lam, y)                                   # (N, D, S)
        logits[..., self.K] = NEG                                               # never [MASK]
        revealed = (x_t != self.K)[..., None]                                   # (N, D, 1)
        copy = torch.full_like(logits, NEG).scatter_(-1, x_t[..., None].clamp_max(self.K), 0.0)
        return torch.where(revealed, copy, logits)                              # (N, D, S)


def build_model(cfg: Config, meta: dict, lam_dim: int = 0, dropout=None,
                lam_inject=None) -> MaskTransformer:
    """lam_dim: 0 = product network, 1 = student (the authors' lambda token with --sampler di4c)."""
    return MaskTransformer(meta["K"], meta["grid"] ** 2, meta["n_classes"], cfg.n_layer,
                           cfg.n_embd, cfg.n_head, cfg.mlp_dim,
                           cfg.dropout[0] if dropout is None else dropout, lam_dim,
                           lam_inject or ("token" if cfg.sampler == "di4c" else "add"))


# -----------------------------------------------------------------------------
# MaskGIT: arccos schedule, teacher objective (docs/method.md (7))


def gamma(r: torch.Tensor) -> torch.Tensor:
    """Mask ratio at progress r in [0, 1]: arccos(r) / (pi / 2) (1 = all masked)."""
    return torch.arccos(r.clamp(0, 1)) / (math.pi / 2)


def mask_rate(t: torch.Tensor) -> torch.Tensor:
    """The same schedule in diffusion time t = 1 - r: m(t) = arccos(1 - t) / (pi / 2)."""
    return gamma(1 - t)


def make_process(meta: dict) -> core.MaskedProcess:
    return core.MaskedProcess(meta["K"] + 1, mask_rate, mask_id=meta["K"])


def maskgit_loss(cfg: Config, process: core.MaskedProcess, n_classes: int):
    """MaskGIT's objective (teacher, control): r ~ U(0, 1) per image (t = 1 - r), tokens masked
    w.p. gamma(r), label-smoothed cross-entropy on the masked ones (MaskGIT-pytorch also scores
    revealed ones, ours copies them), labels dropped w.p. LABEL_DROP; the batch's mean CE."""
    K = process.mask_id

    def loss_fn(model, batch, g):
        x0, y = batch                                                           # (B, D), (B,)
        B, dev = x0.shape[0], x0.device
        y = torch.where(torch.rand(B, generator=g, device=dev) < LABEL_DROP, n_classes, y)
        x_t = process.add_noise(x0, torch.rand(B, generator=g, device=dev), g)  # (B, D)
        logits = model(x_t, None, None, y)                                      # (B, D, S)
        masked = x_t == K
        ce = torch.zeros(x0.shape, device=dev)
        ce[masked] = F.cross_entropy(logits[masked][:, :K].float(), x0[masked],
                                     label_smoothing=cfg.label_smoothing, reduction="none")
        loss = ce.sum(1) * B / masked.sum().clamp_min(1)                         # (B,)
        acc = (logits[masked].argmax(-1) == x0[masked]).float().mean() if masked.any() else ce.sum()
        return loss, {"acc": acc.detach().expand(B)}
    return loss_fn


# -----------------------------------------------------------------------------
# Di4C: the step (MaskGIT variant), its teacher step, the student; the training stages


def di4c_loss(cfg: Config, teacher: MaskTransformer, student: MaskTransformer,
              process: core.MaskedProcess, n_classes: int, lam_T: int = 0):
    """The Di4C objective, MaskGIT variant (docs/method.md (30), (32)), in t = 1 - r: labels
    dropped w.p. LABEL_DROP (the core's `cond`), teacher step r -> r + R_DELTA, distillation on
    x_t where t <= R_DELTA, consistency elsewhere. lam_T > 0: a Di4C student as teacher."""
    teacher_marginal, teacher_step = core.make_teacher(
        teacher, make_teacher_step(cfg, student.D, process.mask_id), lam_T, cfg.L)

    def loss_fn(model, batch, g):
        x0, y = batch                                                           # (B, D), (B,)
        B, dev = x0.shape[0], x0.device
        y = torch.where(torch.rand(B, generator=g, device=dev) < LABEL_DROP, n_classes, y)
        t = torch.rand(B, generator=g, device=dev)                              # t = 1 - r
        u = (t - R_DELTA).clamp_min(0)
        x_t = process.add_noise(x0, t, g)                                       # (B, D)
        weights = core.variant_weights("maskgit", t, R_DELTA, cfg.alpha_const)
        return core.di4c_loss(model, x0, x_t, t, u, weights=weights, cond=y,
                              teacher_marginal=teacher_marginal, teacher_step=teacher_step,
                              L=cfg.L, lam_dim=student.lam_dim, generator=g)
    return loss_fn


def make_teacher_step(cfg: Config, D: int, mask_id: int):
    """ONE MaskGIT confidence step r -> r' of the teacher (docs/method.md (34)), from its log-probs
    at x_t (no CFG): n = floor((1 - gamma(r')) D - #revealed) revealed (clamped to [0, #masked]),
    tokens from softmax(SM_TEMP logits), Gumbel scale r_temp teacher_noise(r); t = 1 - r."""
    @torch.no_grad()
    def teacher_step(log_p, x_t, t, u, generator=None):
        r, r_next = 1 - t.double(), 1 - u.double()                               # (B L,)
        masked = (x_t == mask_id).sum(1)                                        # (B L,)
        n = ((1 - gamma(r_next)) * D - (D - masked)).floor().long()
        n = torch.minimum(n.clamp_min(0), masked)
        noise = cfg.r_temp * teacher_noise(r, K_T)
        return confidence_reveal(x_t, core.log_probs(SM_TEMP * log_p), n, noise, mask_id,
                                 generator)
    return teacher_step


def teacher_noise(r: torch.Tensor, K_T: int) -> torch.Tensor:
    """The teacher step's Gumbel ramp (docs/method.md (34)): 1 - r K_T / (K_T - 1), clamped at 0."""
    return (1 - r * K_T / (K_T - 1)).clamp_min(0)


def confidence_reveal(x: torch.Tensor, log_p: torch.Tensor, n: torch.Tensor,
                      noise: torch.Tensor, mask_id: int, generator=None) -> torch.Tensor:
    """One MaskGIT step (docs/method.md (40)): x_hat^d ~ p^d (float64 Gumbel-max), confidence
    log p^d(x_hat^d) + noise * Gumbel; the min(n, #masked) most confident masked tokens revealed
    (ties by position). x (N, D) long; log_p (N, D, S); n (N,) long; noise (N,) >= 0."""
    N, D = x.shape
    x_hat = core.sample_categorical(log_p, generator)                          # (N, D)
    conf = log_p.gather(-1, x_hat[..., None])[..., 0].double()                  # (N, D)
    u = torch.rand(N, D, generator=generator, dtype=torch.float64, device=x.device)
    conf = conf + noise.double()[:, None] * -torch.log(-torch.log(u.clamp_min(1e-300)))
    masked = x == mask_id
    conf = conf.masked_fill(~masked, -math.inf)
    order = conf.sort(dim=1, descending=True, stable=True).indices               # (N, D)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(D, device=x.device).expand(N, D))
    reveal = masked & (rank < n[:, None])
    return torch.where(reveal, x_hat, x)


def init_student(cfg: Config, meta: dict, init: dict, t_path: str) -> MaskTransformer:
    """The Di4C student: the teacher's weights `init`, a fresh lambda path (14), its --dropout."""
    torch.manual_seed(cfg.seed)
    student = build_model(cfg, meta, lam_dim=1, dropout=cfg.dropout[1])
    try:
        return core.student_from_teacher(student, init)
    except ValueError as e:
        raise SystemExit(f"error: {t_path} does not fit the student: {e}") from None


def load_model(cfg: Config, meta: dict, path: str, device, writer: str = "teacher") -> tuple:
    """Frozen network -> (model, lam_dim, {"id", "parents"}): a checkpoint of this script (EMA
    weights if any; lambda path read off its keys) or a MaskGIT-pytorch .pth (released)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {path!r} not found: run --stage {writer} first (same "
                         "--out_dir), or pass --teacher_ckpt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read {path!r} as a checkpoint ({e})") from None
    if isinstance(state, dict) and "model_state_dict" in state and "config" not in state:
        from pretrained import maskgit
        net = maskgit.load_released(state, lambda lam_dim: build_model(cfg, meta, lam_dim,
                                                                       lam_inject="token"), path)
        info = {"id": weights_id(net.state_dict()), "parents": {}}
    else:
        state = load_checkpoint(path, asdict(cfg), ARCH_KEYS)
        net = build_model(cfg, meta, state["lam_dim"], lam_inject="token" if any(
            k.startswith("lam_token.") for k in state["model"]) else "add")
        net.load_state_dict(state["model"] if state.get("ema") is None else state["ema"])
        info = {"id": state.get("id"), "parents": state.get("parents", {})}
    return net.to(device).eval().requires_grad_(False), net.lam_dim, info


def control_steps(cfg: Config) -> int:
    """--control_iters, or for -1 the Di4C run's compute in network rows (forward + backward = 3):
    student B L rows with gradients, target B L and teacher B without; a teacher step 3 per item."""
    if cfg.control_iters >= 0:
        return cfg.control_iters
    B, L = cfg.distil_batch, cfg.L
    return math.ceil(cfg.distil_iters * (3 * B * L + B * L + B) / (3 * cfg.batch_size))


def stage_teacher(cfg: Config, ctx: "Ctx"):
    """Train the MaskGIT teacher from scratch (skipped when --teacher_ckpt is given)."""
    meta = codes_meta(cfg)
    if cfg.teacher_ckpt:
        ctx.log(f"teacher: using --teacher_ckpt {cfg.teacher_ckpt}, nothing to train")
        return
    torch.manual_seed(cfg.seed)
    raw = build_model(cfg, meta).to(ctx.device)
    ctx.log(f"teacher: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, "
            f"D = {raw.D}, K = {raw.K}, {meta['n_classes']} classes, {len(meta['codes'])} items")
    train(cfg, ctx, meta, "teacher", raw, maskgit_loss(cfg, make_process(meta), meta["n_classes"]),
          cfg.batch_size, cfg.teacher_iters, cfg.lr[0], warmup=cfg.warmup,
          cosine=cfg.teacher_cosine, ema_decay=cfg.ema[0])


def train(cfg: Config, ctx: "Ctx", meta: dict, name: str, net, loss_fn, batch: int, iters: int,
          lr: float, **opt):
    """fit (AdamW, betas (0.9, 0.96)) on the codes in global batches of `batch` -> metrics.json
    (with the validation curve)."""
    out = fit(cfg, ctx, name, net, loss_fn, epoch_batches((meta["codes"], meta["labels"]), cfg, ctx,
                                                    batch), iters, lr, batch, betas=(0.9, 0.96),
              weight_decay=WEIGHT_DECAY, **opt)
    update_metrics(cfg, ctx, {name: dict(iters=out["step"], train_seconds=out["wall"],
                                         validation=out["validation"])})


def selection(cfg: Config, ctx: "Ctx", meta: dict, teacher) -> Optional[validation.Selection]:
    """Di4C's validation (eval/validation.py), rank 0: class-conditional samples at each student
    step count, with w = 0 and the first --cfg_ws, scored against images never trained on: the
    8x8 classifier's Frechet distance to an embedded set's held-out 20 % (their labels), or on
    ImageNet the eval's Inception features' FID to the validation images (VAL_PER_CLASS samples
    per class). None for --dataset folder (no held-out split, docs/validation.md)."""
    if cfg.dataset == "folder":
        return None
    one = dataclasses.replace(ctx, rank=0, world_size=1)             # rank 0 alone: no collective
    if token_kind(cfg) == "pixels":
        from eval import digits
        cache = os.path.join(cfg.out_dir, f"{cfg.dataset}_classifier.pt")
        clf = digits.load_or_train_classifier(cache, data=cfg.dataset) if ctx.rank == 0 else None
        real = meta["val_codes"].long().view(-1, 8, 8)
        y = meta["val_labels"][:cfg.n_per_class * meta["n_classes"]]

        def distance(codes):
            return digits.digits_frechet(clf, codes.view(-1, 8, 8), real)
    else:
        from eval import frechet, maskgit_eval
        vq = tokenizer(cfg, ctx) if ctx.rank == 0 else None
        ref = maskgit_eval.reference_features(os.path.join(cfg.out_dir, "fid_ref"), lambda: (
            val_images(cfg))) if ctx.rank == 0 else None
        y = torch.arange(meta["n_classes"]).repeat_interleave(min(cfg.n_per_class, VAL_PER_CLASS))

        def distance(codes):                         # decoded and remapped as the eval does
            pool = maskgit_eval.embed(decode(vq, c, meta) for c in codes.split(256))[1]
            return frechet.frechet_distance(ref[0], pool)

    def score(net) -> dict:
        return {f"@{N}_w{w:g}": distance(generate(cfg, one, net, net.lam_dim, y, N, w))
                for N in cfg.student_steps for w in dict.fromkeys((0.0, *cfg.cfg_ws[:1]))}
    return validation.Selection.against(ctx, score, teacher)


def stage_distill(cfg: Config, ctx: "Ctx"):
    """Di4C from the teacher (a product MaskGIT, or a Di4C student: another round), then the
    control: the teacher trained on with its own loss for the same compute (a gain is Di4C's)."""
    meta = codes_meta(cfg)
    t_path = cfg.teacher_ckpt or run_path(cfg, "teacher.pt")
    teacher, lam_T, t_info = load_model(cfg, meta, t_path, ctx.device)
    check_round(cfg, lam_T)
    init = teacher.state_dict()
    student = init_student(cfg, meta, init, t_path).to(ctx.device)
    process, n_classes = make_process(meta), meta["n_classes"]
    ctx.log(f"distill: {'mixture (multi-round)' if lam_T else 'product'} teacher {t_path}, "
            f"{cfg.distil_batch} x L = {cfg.L} rows per step, alpha_const {cfg.alpha_const}")
    opt = dict(ema_decay=cfg.ema[1], parents={"teacher": t_info["id"]})
    train(cfg, ctx, meta, "student", student, di4c_loss(cfg, teacher, student, process, n_classes,
                                                        lam_T),
          cfg.distil_batch, cfg.distil_iters, cfg.lr[1], validate=selection(cfg, ctx, meta, teacher),
          **opt)
    if cfg.control_iters == 0:
        return
    control = build_model(cfg, meta).to(ctx.device)
    control.load_state_dict(init)
    train(cfg, ctx, meta, "control", control, maskgit_loss(cfg, process, n_classes),
          cfg.batch_size, control_steps(cfg), cfg.lr[1], **opt)


# -----------------------------------------------------------------------------
# Sampling: MaskGIT's confidence sampler with CFG (docs/method.md (39)-(41)), or the authors'


def reveal_counts(K_steps: int, D: int) -> list:
    """Tokens revealed at each of K steps (docs/method.md (39)): n_k = round(D gamma(k / K)),
    count_k = n_k - n_{k+1}, zeros raised to 1, the last count absorbs the remainder (sum = D)."""
    n = (gamma(torch.linspace(0, 1, K_steps + 1, dtype=torch.float64)) * D).round().long()
    counts = n[:-1] - n[1:]
    counts[counts == 0] = 1
    counts[-1] += D - counts.sum()
    if K_steps < 1 or counts[-1] < 1:
        raise SystemExit(f"error: {K_steps} steps cannot reveal {D} tokens with MaskGIT's schedule")
    return counts.tolist()


@torch.no_grad()
def maskgit_sample(cfg: Config, net, lam_dim: int, y: torch.Tensor, n_steps: int, w: float,
                   generator=None, uncond=None) -> torch.Tensor:
    """MaskGIT's sampler with CFG (docs/method.md (39)-(41)): step k (ratio k / (K - 1)) reveals
    reveal_counts[k] tokens, Gumbel scale r_temp (1 - ratio), on (1 + w ratio) cond - w ratio
    uncond; uncond: the net, label dropped, same lambda, or `uncond` (--lfg). -> x_0 (N, D)."""
    D, K = net.D, net.K
    N, dev = y.shape[0], y.device
    x = torch.full((N, D), K, dtype=torch.long, device=dev)
    dropped = torch.full_like(y, net.n_classes)
    for k, n_k in enumerate(reveal_counts(n_steps, D)):
        ratio = k / max(n_steps - 1, 1)
        lam = core.draw_lambda(N, lam_dim, generator, dev) if lam_dim else None    # (N, 1)
        logits = net(x, None, lam, y).float()                                         # (N, D, S)
        if w * ratio > 0:
            u_logits = (uncond(x, None, None, dropped) if uncond is not None
                        else net(x, None, lam, dropped)).float()
            logits = (1 + w * ratio) * logits - w * ratio * u_logits
        n = torch.full((N,), n_k, device=dev)
        noise = torch.full((N,), cfg.r_temp * (1 - ratio), device=dev)
        x = confidence_reveal(x, core.log_probs(SM_TEMP * logits), n, noise, K, generator)
    return x


def generate(cfg: Config, ctx: "Ctx", net, lam_dim: int, y: torch.Tensor, n_steps: int, w: float,
             uncond=None) -> torch.Tensor:
    """Sample the rows y of a class list, split over ranks (row i on rank i mod W), gathered.
    The seed depends on (steps, w, rank), not on the model: common random numbers."""
    seed = cfg.seed * 1_000_003 + 10_007 * n_steps + round(1000 * w) + 7919 * ctx.rank
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    rng = np.random.RandomState(seed % 2 ** 32)                # --sampler di4c: its Gumbel
    mine, out = y[ctx.rank::ctx.world_size], []
    for i in range(0, len(mine), cfg.sample_batch):
        with ctx.autocast():
            y_i = mine[i:i + cfg.sample_batch].to(ctx.device)
            if cfg.sampler == "di4c":     # the authors' copy of MaskGIT-pytorch's, exactly
                from pretrained import maskgit
                x = maskgit.sample(net, lam_dim, y_i, reveal_counts(n_steps, net.D), w,
                                   SM_TEMP, cfg.r_temp, g, rng, uncond, "di4c")
            else:
                x = maskgit_sample(cfg, net, lam_dim, y_i, n_steps, w, g, uncond)
            out.append(x.cpu())
    parts = ctx.gather(torch.cat(out) if out else torch.zeros(0, net.D, dtype=torch.long))
    x0 = torch.empty(len(y), net.D, dtype=torch.long)
    for r, part in enumerate(parts):
        x0[r::ctx.world_size] = part
    return x0


@torch.no_grad()
def decode(vq, codes: torch.Tensor, meta: dict) -> torch.Tensor:
    """codes (N, D) -> float images (N, C, H, W) in [0, 1] (pixels: C = 1, 16 levels)."""
    if vq is None:
        return codes.view(-1, 1, meta["grid"], meta["grid"]).float() / (meta["K"] - 1)
    dev = next(vq.parameters()).device
    return ((torch.cat([vq.decode(c.to(dev)).cpu() for c in codes.split(64)]) + 1) / 2).clamp(0, 1)


def sample_runs(cfg: Config) -> list:
    """(label, checkpoint, steps, w) of every sample set: w = 0 and each of cfg_ws."""
    nets = [("teacher", cfg.steps), ("student", cfg.student_steps)]
    nets += [("control", cfg.student_steps)] if cfg.control_iters else []
    return [(f"{name}@{N}_w{w:g}", name, N, w) for name, steps in nets for N in steps
            for w in dict.fromkeys((0.0, *cfg.cfg_ws))]


def load_nets(cfg: Config, ctx: "Ctx", meta: dict) -> dict:
    """{name: (frozen net, lam_dim, info)}, each checked to descend from the current teacher."""
    paths = {"teacher": cfg.teacher_ckpt or run_path(cfg, "teacher.pt"),
             "student": cfg.student_ckpt or run_path(cfg, "student.pt")}
    if cfg.control_iters:
        paths["control"] = run_path(cfg, "control.pt")
    nets = {name: load_model(cfg, meta, path, ctx.device, "teacher" if name == "teacher"
                             else "distill") for name, path in paths.items()}
    for name in nets.keys() - {"teacher"} - ({"student"} if cfg.student_ckpt else set()):
        check_lineage(paths[name], nets[name][2], {"teacher": nets["teacher"][2]["id"]})
    return nets


def stage_sample(cfg: Config, ctx: "Ctx"):
    """n_per_class samples per class of every sample_runs set -> samples/<label>.pt, PNG grids."""
    meta = codes_meta(cfg)
    from eval import maskgit_eval
    nets = load_nets(cfg, ctx, meta)
    vq = tokenizer(cfg, ctx) if ctx.rank == 0 else None
    y = torch.arange(meta["n_classes"]).repeat_interleave(cfg.n_per_class)    # (N,)
    folder = os.path.join(cfg.out_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    if cfg.lfg and nets["teacher"][1]:
        raise SystemExit("error: --lfg needs a product teacher for the unconditional branch; "
                         "this teacher is a Di4C student (another round)")
    uncond = nets["teacher"][0] if cfg.lfg else None
    for label, name, N, w in sample_runs(cfg):
        net, lam_dim, info = nets[name]
        t0 = time.time()
        codes = generate(cfg, ctx, net, lam_dim, y, N, w, uncond if name != "teacher" else None)
        if ctx.rank == 0:
            save_checkpoint(os.path.join(folder, f"{label}.pt"),
                            {"codes": codes, "labels": y, "steps": N, "w": w, "model": name,
                             "parents": {name: info["id"]}, "config": asdict(cfg)})
            maskgit_eval.save_grids(folder, label, [decode(vq, codes[y == c][:16], meta) for c in
                                                    range(min(GRID_CLASSES, meta["n_classes"]))])
        ctx.log(f"sample: {label}: {len(codes)} images in {time.time() - t0:.1f} s")
    ctx.barrier()


# -----------------------------------------------------------------------------
# Evaluation: eval/digits.py (embedded images), eval/maskgit_eval.py (VQ tokens); latency


def stage_eval(cfg: Config, ctx: "Ctx"):
    """Score every sample set (rank 0: an 8x8 classifier's Frechet distance and class accuracy,
    or MaskGIT-pytorch's FID, IS, PRDC against the validation images), time the samplers (one
    batch, w = 0) -> metrics.json, the plot and the printed table."""
    meta = codes_meta(cfg)
    if ctx.rank == 0:
        from eval import maskgit_eval
        nets, sets = load_nets(cfg, ctx, meta), {}
        for label, name, *_ in sample_runs(cfg):      # each sample file read once
            path = run_path(cfg, "samples", f"{label}.pt")
            if not os.path.exists(path):
                raise SystemExit(f"error: {path!r} not found: run --stage sample first")
            sets[label] = load_checkpoint(path, asdict(cfg), SAMPLE_KEYS)
            check_lineage(path, sets[label], {name: nets[name][2]["id"]})
        if token_kind(cfg) == "pixels":
            from eval import digits
            key, res = "frechet", digits.score_sets(sets, cfg.dataset, cfg.label_div, os.path.join(
                cfg.out_dir, f"{cfg.dataset}_classifier.pt"))
        else:
            vq = tokenizer(cfg, ctx)
            key, res = "fid", maskgit_eval.score_sets(sets, lambda c: decode(vq, c, meta),
                                                      lambda: val_images(cfg), cfg.out_dir)
        y = torch.arange(cfg.sample_batch, device=ctx.device) % meta["n_classes"]
        lat = {str(N): maskgit_eval.latencies(
            lambda name, g: maskgit_sample(cfg, *nets[name][:2], y, N, 0.0, g), ctx.autocast,
            torch.Generator(device=ctx.device), cfg.seed, ctx.device) for N in cfg.student_steps}
        summary = maskgit_eval.summary(res, lat, key)           # also prints the table
        plot.plot_quality(cfg.out_dir, f"{os.path.basename(__file__)} --preset {cfg.preset}",
                          summary["results"], key)
        summary["worse_than_teacher"] = validation.warn_worse(ctx, summary["results"], key)
        update_metrics(cfg, ctx, summary)
    ctx.barrier()


# -----------------------------------------------------------------------------
# Main


def check(cfg: Config):
    """Reject bad values before any work, with the flag to fix."""
    check_config(cfg)
    if cfg.label_div > 1 and cfg.dataset not in EMBEDDED:
        raise SystemExit("error: --label_div must be 1..10, and 1 unless --dataset digits, "
                         f"photos or scenes; got {cfg.label_div}")
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"error: --n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    if any(len(v) != 2 for v in (cfg.dropout, cfg.lr, cfg.ema)):
        raise SystemExit("error: --dropout, --lr and --ema take two values (the teacher's, then "
                         f"the student's); got {cfg.dropout}, {cfg.lr}, {cfg.ema}")
    D = 64
    if token_kind(cfg) != "pixels":              # a VQGAN's own sizes are read at tokenize
        from pretrained.taming_vqgan import VQVAE
        if token_kind(cfg) == "vqvae" and cfg.img_size not in VQVAE:
            raise SystemExit(f"error: the VQ-VAE (--vqgan_ckpt '') has sizes for --img_size "
                             f"{list(VQVAE)}; got {cfg.img_size}")
        D = (cfg.img_size >> len(VQVAE.get(cfg.img_size, VQVAE[256])["ch_mult"]) - 1) ** 2
    for n in cfg.steps + cfg.student_steps:      # the schedule's own one-line errors, up front
        reveal_counts(n, D)
    if any(not w >= 0 for w in cfg.cfg_ws):      # may be empty (no CFG), unlike LIMITS lists
        raise SystemExit(f"error: --cfg_ws must be values in [0, inf]; got {cfg.cfg_ws}")


def run_needs(cfg: Config) -> list:
    """What the run's stages need beyond the config (checkpoints, FID reference, packages)."""
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    needs = []
    if "tokenize" in stages and token_kind(cfg) == "vqgan" and not os.path.exists(cfg.vqgan_ckpt):
        needs.append((f"--vqgan_ckpt {cfg.vqgan_ckpt!r} does not exist", "download MaskGIT-"
                      "pytorch's VQGAN (README 'Running the paper') or pass --vqgan_ckpt ''"))
    needs += checkpoint_needs(cfg, stages)
    validates = "distill" in stages and cfg.dataset == "imagenet"
    if ("eval" in stages or validates) and token_kind(cfg) != "pixels":
        needs += package_needs({"torch_fidelity": ("torch-fidelity", "FID / IS (Di4C's "
                                                   "validation, stage eval)")})
        ref = os.path.join(cfg.data_dir, "val")
        if cfg.dataset == "imagenet" and not os.path.isdir(ref) and \
                not os.path.isdir(os.path.join(cfg.out_dir, "fid_ref")):
            needs.append((f"FID reference images {ref!r} not found", "put the ImageNet "
                          "validation images there, one folder per class"))
    return needs


def main(cfg: Config):
    check(cfg)
    preflight(run_needs(cfg))
    run_stages(cfg, "imagenet_masked.py", {name: globals()[f"stage_{name}"] for name in STAGES})


# -----------------------------------------------------------------------------
# Plumbing: config and CLI, distributed setup, checkpoints, the training loop (shared block)


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
