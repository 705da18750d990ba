"""
Di4C on a masked diffusion language model (Sec. 5.3 of arXiv:2410.08709; teacher = MDLM/SDTT).

An MDLM teacher (MDLM's DiT, SUBS, log-linear schedule), trained with its NELBO or SDTT's
release, is distilled into a Di4C mixture student in the SDTT variant (docs/method.md (30),
(33)); samples of the ancestral sampler (37) are scored by generative perplexity under a judge
LM, unigram entropy and prefix-conditional self-BLEU. Lab notes: docs/owt.md.

python owt_masked.py [--preset demo | smoke]   (8 GPUs: torchrun --nproc_per_node=8 owt_masked.py)
--stage teacher | distill | sample | eval | all: each reads what the previous ones wrote in
--out_dir; --resume true continues a stage exactly.
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
from eval import plot, results_table, text_data, text_metrics, validation
from eval.preflight import check_round, checkpoint_needs, package_needs, preflight
from eval.results_table import update_metrics
from eval.text_data import Corpus

# -----------------------------------------------------------------------------
# Config (defaults = the paper preset; --preset demo / smoke override a few fields)

SDTT7 = "pretrained_sdtt/sdtt7/model.safetensors"
SDTT7_GET = ("huggingface-cli download jdeschena/sdtt model.safetensors --revision "
             "baselines_kld_step_70000 --local-dir pretrained_sdtt/sdtt7")


@dataclass
class Config:
    preset: str = "paper"          # paper | demo | smoke
    stage: str = "all"             # teacher | distill | sample | eval | all
    out_dir: str = "runs/owt"
    run_dir: str = ""              # read checkpoints and samples from here (default out_dir)
    resume: bool = False           # continue every stage from its checkpoint in out_dir
    # data (GPT-2 BPE; tokenised once into text_tokens/ beside out_dir)
    dataset: str = "Skylion007/openwebtext"  # HF hub, or offline: pydoc (CPython's docs) | stdlib
    data_files: str = ""           # comma-separated local .txt/.json(l)/.parquet globs
    seq_len: int = 1024            # D, tokens per sequence (MDLM wraps documents in 1024)
    val_docs: int = 100_000        # last documents held out (MDLM's openwebtext-split)
    remap_vocab: bool = False      # ids seen in training + UNK instead of all 50257 (demo)
    # model (MDLM-small DiT)
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    cond_dim: int = 128            # adaLN condition width
    dropout: float = 0.1
    # teacher (MDLM NELBO) and the autoregressive judge
    teacher_iters: int = 1_000_000
    judge_iters: int = 100_000
    batch_size: int = 512          # global sequences per teacher / judge / control step
    lr: tuple = (3e-4, 3e-5)       # AdamW: the teacher's and judge's; Di4C's and the control's
    ema: tuple = (0.9999, 0.0)     # EMA decay: the teacher's (it samples with it, MDLM); the
                                   # student's and control's (sampled with it if > 0)
    teacher_cosine: bool = False   # cosine decay of the teacher LR to 0 after warm-up (demo)
    # di4c (SDTT variant, docs/method.md (30), (33))
    distil_iters: int = 50_000
    distil_batch: int = 2          # global sequences per Di4C step, each with L lambdas
    lam_lr_mult: float = 1.0       # learning-rate multiplier of the lambda path (zero-initialised)
    warmup: int = 2500
    L: int = 16                    # lambda-samples per x_t
    delta: float = 0.02            # distillation region t < delta
    T: int = 1024                  # SDTT time grid {k / T}
    teacher_ckpt: str = SDTT7      # SDTT round 7 (SDTT7_GET); "" = train MDLM; a student.pt
                                   # (another round); a released MDLM / SDTT / Di4C-SDTT file
    student_ckpt: str = ""         # "" = out_dir/student.pt; or a released Di4C-SDTT student
    control_iters: int = -1        # teacher fine-tuned with its loss: -1 = Di4C's compute, 0 = none
    # sampling and evaluation (docs/method.md (37); MDLM's gen-PPL protocol)
    steps: tuple = (8, 16, 32, 64, 128, 256, 512, 1024)  # teacher step counts
    student_steps: tuple = (8, 16, 32, 64)               # student and control step counts
    n_samples: int = 1024
    sample_batch: int = 16
    sampler: str = "ours"          # ours (float64 draws; a new student takes lambda through
                                   # adaLN) | sdtt (the authors': SDTT's sampler, lambda token)
    prefix: tuple = (256, 50, 50)  # prefix-conditional samples: N_CONT continuations of cont_len
                                   # tokens after n_prefix held-out prefixes of prefix_len tokens:
                                   # (n_prefix, prefix_len, cont_len)
    judge: str = "gpt2-large"      # gen-PPL judge: gpt2-large (the papers') | trained (here)
    # system
    device: str = ""               # "" = cuda if available else cpu
    dtype: str = "bfloat16"        # float32 | bfloat16 (autocast; draws stay float64)
    seed: int = 0
    micro_batch: int = 0           # rows per forward pass and GPU (0: the GPU's whole share)
    compile: bool = False          # torch.compile the network in training
    log_every: int = 100
    ckpt_every: int = 5000


PRESETS = {
    "paper": {},
    # CPython's bundled docs, exact GPT-2 BPE, remapped ids; why each value: docs/owt.md
    "demo": dict(out_dir="runs/owt_demo", dataset="pydoc", teacher_ckpt="", seq_len=32, val_docs=8,
                 remap_vocab=True, n_layer=4, n_embd=128, n_head=4, cond_dim=64,
                 teacher_iters=4000, judge_iters=600, batch_size=32, lr=(1e-3, 1e-4),
                 teacher_cosine=True, ema=(0.995, 0.99), distil_iters=400, distil_batch=4, lam_lr_mult=10.0, warmup=20, L=8, T=32, delta=0.047,
                 steps=(4, 8, 16, 32, 64), student_steps=(4, 8, 16), n_samples=1024,
                 sample_batch=128, prefix=(24, 8, 24), dtype="float32",
                 log_every=50, ckpt_every=100, judge="trained"),
    # seconds, for tests
    "smoke": dict(out_dir="runs/owt_smoke", dataset="pydoc", teacher_ckpt="", seq_len=32,
                  val_docs=4, remap_vocab=True, n_layer=1, n_embd=32, n_head=2, cond_dim=16,
                  dropout=0.0, teacher_iters=4, judge_iters=4, batch_size=8,
                  lr=(1e-3, 1e-4), ema=(0.9, 0.0), distil_iters=3, distil_batch=2,
                  warmup=2, L=4, control_iters=2, steps=(2, 4), student_steps=(2,),
                  n_samples=4, sample_batch=4, prefix=(2, 8, 24),
                  dtype="float32", log_every=1, ckpt_every=2, judge="trained"),
}
DISTIL_PROB = 0.3                   # probability of drawing t in [0, delta) (SDTT's)
ALPHA_CONST = 0.1                   # alpha(t) = 0.1 sigmoid(20 (t - 1/2)) (SDTT variant, (28))
N_CONT = 5                          # continuations per prefix (self-BLEU)
LATENCY_RUNS = 3                    # timed sampler calls per model and step count
STAGES = ("teacher", "distill", "sample", "eval")
ARCH_KEYS = ("n_layer", "n_embd", "n_head", "cond_dim", "remap_vocab", "dataset", "data_files")
RESUME_KEYS = ARCH_KEYS + ("seq_len", "batch_size", "distil_batch", "L", "lr",
                           "warmup", "seed", "dropout", "ema", "teacher_cosine", "lam_lr_mult",
                           "sampler", "delta", "T")
SAMPLE_KEYS = ("seq_len", "n_samples", "prefix", "seed", "dtype",
               "sampler")
CHOICES = {"stage": STAGES + ("all",), "dtype": ("float32", "bfloat16"),
           "judge": ("gpt2-large", "trained"),
           "sampler": ("ours", "sdtt")}
INF, TINY = float("inf"), 1e-12
LIMITS = {k: (1, INF) for k in (      # (lo, hi), inclusive; check_config applies them
    "val_docs", "n_layer", "n_embd", "n_head", "cond_dim", "teacher_iters", "judge_iters",
    "batch_size", "distil_iters", "distil_batch", "L", "T", "steps", "student_steps", "n_samples",
    "sample_batch", "prefix", "log_every", "ckpt_every")}
LIMITS.update(seq_len=(2, INF), dropout=(0, 0.99), lr=(TINY, 1), ema=(0, 1 - 1e-9),
              delta=(TINY, 0.999),
              control_iters=(-1, INF),
              **dict.fromkeys(("lam_lr_mult", "warmup", "seed", "micro_batch"), (0, INF)))

# -----------------------------------------------------------------------------
# Data: eval/text_data.Corpus: the documents in exact GPT-2 BPE joined by <|endoftext|>,
# tokenised once, in blocks of D model ids (remap_vocab: the ids seen in training + UNK)


def random_blocks(corpus: Corpus):  # fit's `batches`: blocks drawn with the step's generator
    return lambda step, rows, g: corpus.batch(rows.stop - rows.start, g)


# -----------------------------------------------------------------------------
# Network: MDLM's DiT (rotary attention, adaLN, SUBS output; arXiv 2406.07524) module for module,
# under MDLM's parameter names, so that MDLM / SDTT files load by name (pretrained/mdlm.py)

NEG = -1e6                                 # SUBS "impossible" logit


def rotary(D: int, head_dim: int, device) -> tuple:
    """cos, sin tables (D, head_dim / 2) of rotary position embeddings."""
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    ang = torch.arange(D, device=device).float()[:, None] * inv[None]       # (D, hd/2)
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)                                              # (N, H, D, hd/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).type_as(x)


def sinusoid(v: torch.Tensor, dim: int = 128) -> torch.Tensor:
    """Transformer timestep embedding of 1000 v: half sin, half cos. v (N, k) -> (N, k dim)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=v.device) / (dim // 2 - 1))
    ang = 1000 * v[..., None].float() * freqs                                # (N, k, dim/2)
    return torch.cat([ang.sin(), ang.cos()], -1).flatten(1)


def zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)
    return layer


class SigmaMap(nn.Module):
    """MDLM's noise-level embedding: [cos, sin] of sigma 10000^(-i/128), i < 128, then
    Linear -> SiLU -> Linear. sigma (N,) -> (N, cond_dim)."""

    def __init__(self, cond_dim: int, n_freq: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_freq, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma):
        half = self.mlp[0].in_features // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device) / half)
        ang = sigma[:, None].float() * freqs                                  # (N, half)
        return self.mlp(torch.cat([ang.cos(), ang.sin()], -1))


class VocabEmbed(nn.Module):
    """The token table (S, E) under MDLM's name; F.embedding, as MDLM's `embedding[x]` has a
    backward that sums repeated ids in a varying order on CPU (training would not repeat)."""

    def __init__(self, S: int, E: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(S, E))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x):
        return F.embedding(x, self.embedding)


class Block(nn.Module):
    """MDLM's DDiTBlock: pre-LN (weight, no bias) modulated by c, branches gated by c
    (adaLN-Zero), no dropout inside attention."""

    def __init__(self, E: int, H: int, cond_dim: int, dropout: float, causal: bool):
        super().__init__()
        self.H, self.causal = H, causal
        self.norm1 = nn.LayerNorm(E, bias=False)
        self.attn_qkv = nn.Linear(E, 3 * E, bias=False)
        self.attn_out = nn.Linear(E, E, bias=False)
        self.norm2 = nn.LayerNorm(E, bias=False)
        self.mlp = nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * E, E))
        self.adaLN_modulation = zero(nn.Linear(cond_dim, 6 * E))
        self.drop = nn.Dropout(dropout)

    def forward(self, h, c, cos, sin):
        N, D, E = h.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, -1)  # (N, 1, E)
        a = self.norm1(h) * (1 + sc1) + sh1                                   # (N, D, E)
        q, k, v = self.attn_qkv(a).view(N, D, 3, self.H, E // self.H).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)          # (N, H, D, hd)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        h = h + g1 * self.drop(self.attn_out(a.transpose(1, 2).reshape(N, D, E)))
        return h + g2 * self.drop(self.mlp(self.norm2(h) * (1 + sc2) + sh2))  # (N, D, E)


class DiT(nn.Module):
    """denoiser(x_t (N, D) long, t (N,), lam (N, 1) | None) -> SUBS logits (N, D, S).

    No time input (MDLM's time_conditioning False): c = SiLU(sigma_map(0)), so the sampler may
    reuse an unchanged input's output. A student (lam_dim 1, lambda ~ U[0, 1]) maps
    sinusoid(1000 lam) through Linear(128, 512) -> GELU -> Linear: "adaln" (ours) adds it to c
    through a zero-initialised last layer, so the student starts as the teacher (docs/method.md
    (14)); "token" (the authors') appends it as one more token. SUBS: revealed tokens are copied,
    [MASK] is never predicted, the head runs at masked positions only. causal: the AR judge.
    """

    def __init__(self, S: int, n_layer: int, E: int, H: int, cond_dim: int, dropout: float,
                 lam_dim: int = 0, causal: bool = False, lam_inject: str = "adaln"):
        super().__init__()
        assert lam_inject in ("adaln", "token") and lam_dim in (0, 1), (lam_inject, lam_dim)
        self.S, self.mask_id, self.lam_dim, self.causal, self.hd = S, S - 1, lam_dim, causal, E // H
        self.lam_inject = lam_inject if lam_dim else ""
        self.vocab_embed = VocabEmbed(S, E)
        self.sigma_map = SigmaMap(cond_dim)
        self.blocks = nn.ModuleList(Block(E, H, cond_dim, dropout, causal) for _ in range(n_layer))
        self.output_layer = nn.ModuleDict(dict(                  # MDLM's final layer, zero-init
            norm_final=nn.LayerNorm(E, bias=False), linear=zero(nn.Linear(E, S)),
            adaLN_modulation=zero(nn.Linear(cond_dim, 2 * E))))
        lam_mlp = lambda out: nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, out))
        if self.lam_inject == "adaln":
            self.lam_mlp = lam_mlp(cond_dim)
            zero(self.lam_mlp[-1])
        elif self.lam_inject == "token":
            self.lam_token = lam_mlp(E)

    def trunk(self, x, lam):
        N, D = x.shape
        c = self.sigma_map(torch.zeros(N, device=x.device))                   # (N, C)
        if self.lam_inject == "adaln":
            c = c + self.lam_mlp(sinusoid(lam))
        c = F.silu(c)
        cos, sin = rotary(D, self.hd, x.device)
        h = self.vocab_embed(x)                                               # (N, D, E)
        if self.lam_inject == "token":
            from pretrained import mdlm
            h, cos, sin = mdlm.append_lam_token(h, self.lam_token(sinusoid(lam)), cos, sin)
        for block in self.blocks:
            h = block(h, c, cos, sin)
        sh, sc = self.output_layer.adaLN_modulation(c)[:, None].chunk(2, -1)
        return self.output_layer.norm_final(h[:, :D]) * (1 + sc) + sh         # (N, D, E)

    def forward(self, x_t, t=None, lam=None, cond=None, masked_only: bool = False):
        h = self.trunk(x_t, lam)
        head = self.output_layer.linear
        if self.causal:
            return head(h)                                                    # (N, D, S)
        masked = x_t == self.mask_id                                          # (N, D)
        out = head(h[masked]).float()                                         # (M, S)
        out[:, self.mask_id] = NEG
        if masked_only:                                # the MDLM loss needs only these rows
            return out, masked
        logits = torch.full((*x_t.shape, self.S), NEG, device=x_t.device)     # (N, D, S)
        logits.scatter_(-1, x_t[..., None], 0.0)
        logits[masked] = out
        return logits


def build_model(cfg: Config, S: int, lam_dim: int = 0, causal: bool = False,
                lam_inject: Optional[str] = None) -> DiT:
    """lam_dim 0: a product teacher (or the judge, causal); 1: a Di4C student."""
    return DiT(S, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.cond_dim, cfg.dropout, lam_dim, causal,
               lam_inject or ("token" if cfg.sampler == "sdtt" else "adaln"))


# -----------------------------------------------------------------------------
# Teacher: masked diffusion, MDLM's log-linear schedule and NELBO (docs/method.md (6)-(8))

EPS = 1e-3                                 # m(t) = (1 - EPS) t, MDLM's log-linear schedule
T_MIN_TRAIN, T_MIN_SAMPLE = 1e-3, 1e-5     # MDLM's sampling_eps and the sampler's last time


def mask_rate(t: torch.Tensor) -> torch.Tensor:
    """m(t) = 1 - exp(-sigma(t)) with sigma(t) = -log(1 - (1 - EPS) t)."""
    return (1 - EPS) * t


def make_process(S: int) -> core.MaskedProcess:
    return core.MaskedProcess(S, mask_rate)


def mdlm_loss(model, x0: torch.Tensor, process, g: torch.Generator) -> tuple:
    """Continuous-time NELBO per token: E_t[(m'(t) / m(t)) sum_{d masked} -log p(x0^d | x_t)] / D,
    t stratified over the batch (MDLM's antithetic sampling). x0 (B, D) -> (loss (B,), {})."""
    B, D = x0.shape
    t = (torch.rand(1, generator=g, device=x0.device) + torch.arange(B, device=x0.device) / B) % 1
    t = T_MIN_TRAIN + (1 - T_MIN_TRAIN) * t                                   # (B,)
    x_t = process.add_noise(x0, t, g)                                         # (B, D)
    logits, masked = model(x_t, t, masked_only=True)                          # (M, S), (B, D)
    nll = torch.zeros(B, D, device=x0.device)
    nll[masked] = F.cross_entropy(logits, x0[masked], reduction="none")
    loss = (1 - EPS) / mask_rate(t) * nll.sum(1) / D                          # (B,)
    return loss, {}


@torch.no_grad()
def val_nelbo(cfg: Config, ctx, corpus: Corpus, net, n_blocks: int = 256,
              n_t: int = 8) -> float:
    """Validation NELBO (nats/token), n_t stratified times per block; exp() bounds the PPL."""
    process, total = make_process(corpus.S), torch.zeros(2, device=ctx.device)
    idx = np.arange(min(n_blocks, corpus.n_blocks("val")))[ctx.rank::ctx.world_size]
    g = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 17)
    for i in range(0, len(idx), 16):
        x0 = corpus.get("val", idx[i:i + 16]).repeat_interleave(n_t, 0)     # (b n_t, D)
        with ctx.autocast():
            loss, _ = mdlm_loss(net, x0, process, g)
        total += torch.stack([loss.sum(), torch.tensor(float(len(loss)), device=ctx.device)])
    total = ctx.sum(total)
    return (total[0] / total[1]).item()


def stage_teacher(cfg: Config, ctx, corpus: Corpus):
    """Train the MDLM teacher (unless --teacher_ckpt is given); its validation NELBO (EMA)."""
    if cfg.teacher_ckpt:
        ctx.log(f"teacher: using --teacher_ckpt {cfg.teacher_ckpt}, nothing to train")
        return
    torch.manual_seed(cfg.seed)
    raw = build_model(cfg, corpus.S).to(ctx.device)
    process = make_process(corpus.S)
    ctx.log(f"teacher: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, "
            f"S = {corpus.S}, D = {cfg.seq_len}, {corpus.n_blocks('train')} train blocks")
    out = fit(cfg, ctx, "teacher", raw, lambda model, x0, g: mdlm_loss(model, x0, process, g),
              random_blocks(corpus), cfg.teacher_iters, cfg.lr[0], cfg.batch_size,
              warmup=cfg.warmup, cosine=cfg.teacher_cosine, ema_decay=cfg.ema[0])
    nelbo = val_nelbo(cfg, ctx, corpus, out["ema"].eval())
    ctx.log(f"teacher: val NELBO {nelbo:.4f} nats/token, PPL <= {math.exp(nelbo):.1f}")
    update_metrics(cfg, ctx, {"teacher": dict(val_nelbo=nelbo, val_ppl_bound=math.exp(nelbo),
                                              iters=out["step"], train_seconds=out["wall"])})


RELEASED = (".ckpt", ".safetensors", ".bin")   # released files, read by pretrained/mdlm.py


def load_model(cfg: Config, corpus: Corpus, path: str, use_ema: bool = True) -> tuple:
    """A frozen model from a finished checkpoint of this script or a released MDLM / SDTT /
    Di4C-SDTT file (pretrained/mdlm.py; the architecture flags and GPT-2's vocabulary must
    match) -> (model in eval mode, lam_dim, {"id", "parents"}), its EMA weights if it has them."""
    if path.endswith(RELEASED):
        from pretrained import mdlm
        want = dict(S=corpus.S, E=cfg.n_embd, n_layer=cfg.n_layer, cond_dim=cfg.cond_dim)
        net, lam_dim = mdlm.load_released(path, want, lambda lam_dim, inject: build_model(
            cfg, corpus.S, lam_dim, lam_inject=inject), use_ema)
        meta = {"id": weights_id(net.state_dict()), "parents": {}}
    else:
        state = load_checkpoint(path, asdict(cfg), ARCH_KEYS)
        lam_dim = state["lam_dim"]                     # a student runs as it was trained
        inject = "token" if any(k.startswith("lam_token.") for k in state["model"]) else "adaln"
        net = build_model(cfg, corpus.S, lam_dim, lam_inject=inject)
        net.load_state_dict(state["ema"] if use_ema and state["ema"] is not None
                            else state["model"])
        meta = {"id": state.get("id"), "parents": state.get("parents", {})}
    return net.to(corpus.device).eval().requires_grad_(False), lam_dim, meta


# -----------------------------------------------------------------------------
# Di4C step (SDTT variant, docs/method.md (30), (33)) and the compute-matched control


def di4c_times(cfg: Config, B: int, g: torch.Generator) -> tuple:
    """Per-sample t (SDTT draws one t per batch): t ~ U[0, delta) with probability
    DISTIL_PROB, else U[delta, 1]; snapped once to {k / T, k = 1..T} (SDTT snaps twice); the
    teacher step goes to u = t - min(1/T, t/2) (docs/method.md (33)). Returns t, u (B,)."""
    dev = g.device
    U = torch.rand(B, generator=g, device=dev)
    distil = torch.rand(B, generator=g, device=dev) < DISTIL_PROB
    t = torch.where(distil, cfg.delta * U, cfg.delta + (1 - cfg.delta) * U)
    t = ((t * cfg.T).floor().clamp_max(cfg.T - 1) + 1) / cfg.T
    return t, t - torch.minimum(torch.full_like(t, 1 / cfg.T), t / 2)


def di4c_loss(cfg: Config, teacher, student, process: core.MaskedProcess, lam_T: int = 0):
    """fit's loss_fn of Di4C in the SDTT variant (docs/method.md (30), (33)): t, u from
    di4c_times, x_t masked at t, weights 1[t < delta] (distillation on x_t), 1[t >= delta]
    (consistency), ALPHA_CONST sigmoid(20 (t - 1/2)); the teacher's step t -> u is the analytic
    masked step (a Di4C student as teacher, lam_T > 0: its L-lambda marginal and a fresh lambda
    per row for its step, docs/method.md (35))."""
    marginal, teacher_step = core.make_teacher(teacher, process.step, lam_T, cfg.L)

    def loss_fn(model, x0, g):
        t, u = di4c_times(cfg, x0.shape[0], g)
        x_t = process.add_noise(x0, t, g)                                     # (B, D)
        weights = core.variant_weights("sdtt", t, cfg.delta, ALPHA_CONST)
        return core.di4c_loss(model, x0, x_t, t, u, weights=weights, teacher_marginal=marginal,
                              teacher_step=teacher_step, L=cfg.L, lam_dim=student.lam_dim,
                              generator=g)
    return loss_fn


def stage_distill(cfg: Config, ctx, corpus: Corpus):
    """Di4C from the teacher (a product MDLM, or a Di4C student for another round), then the
    control: the teacher fine-tuned with its own MDLM loss for the same compute (so that a gain
    is Di4C's, not extra training's)."""
    t_path = cfg.teacher_ckpt or run_path(cfg, "teacher.pt")
    teacher, lam_T, t_meta = load_model(cfg, corpus, t_path)
    check_round(cfg, lam_T)
    torch.manual_seed(cfg.seed)
    try:
        student = core.student_from_teacher(build_model(cfg, corpus.S, lam_dim=1),
                                            teacher.state_dict()).to(ctx.device)
    except ValueError as e:
        hint = (" (the teacher is a lambda-token student: add --sampler sdtt)"
                if "lam_token" in str(e) and cfg.sampler != "sdtt" else "")
        raise SystemExit(f"error: {t_path}: {e}{hint}") from None
    process, parents = make_process(corpus.S), {"teacher": t_meta["id"]}
    ctx.log(f"distill: {'mixture (multi-round)' if lam_T else 'product'} teacher {t_path}, "
            f"{cfg.distil_batch} sequences x L = {cfg.L} lambdas per step")
    out = fit(cfg, ctx, "student", student, di4c_loss(cfg, teacher, student, process, lam_T),
              random_blocks(corpus), cfg.distil_iters, cfg.lr[1], cfg.distil_batch,
              warmup=cfg.warmup, ema_decay=cfg.ema[1], parents=parents,
              validate=selection(cfg, ctx, corpus, teacher))
    update_metrics(cfg, ctx, {"student": dict(iters=out["step"], train_seconds=out["wall"],
                                              validation=out["validation"])})
    if cfg.control_iters == 0:
        return
    control = build_model(cfg, corpus.S).to(ctx.device)
    control.load_state_dict(teacher.state_dict())
    cout = fit(cfg, ctx, "control", control, lambda model, x0, g: mdlm_loss(model, x0, process, g),
               random_blocks(corpus), control_steps(cfg), cfg.lr[1], cfg.batch_size,
               warmup=cfg.warmup, ema_decay=cfg.ema[1], parents=parents)
    nelbo = val_nelbo(cfg, ctx, corpus, (cout["ema"] or control).eval())
    update_metrics(cfg, ctx, {"control": dict(iters=cout["step"], train_seconds=cout["wall"],
                                              val_nelbo=nelbo)})


def selection(cfg: Config, ctx, corpus: Corpus, teacher) -> validation.Selection:
    """Di4C's validation (eval/validation.py), rank 0: the eval's gen-PPL (--judge: the judge
    trained here, trained now and reused by the eval, or GPT-2 Large) of n_samples unconditional
    samples at each student step count; the sampling seed is the validation's own."""
    judge = train_judge(cfg, ctx, corpus) if cfg.judge == "trained" else None
    one = dataclasses.replace(ctx, rank=0, world_size=1)             # rank 0 alone: no collective
    x_T = make_process(corpus.S).prior(cfg.n_samples, cfg.seq_len)
    if ctx.rank == 0:
        score_ids, key = judge_scorer(cfg, ctx, corpus, judge)

    def score(net) -> dict:
        return {f"@{N}": score_ids(generate(cfg, one, corpus, net, net.lam_dim, N, x_T,
                                            f"validation{N}")[0], 1)[key]
                for N in cfg.student_steps}
    return validation.Selection.against(ctx, score, teacher)


def control_steps(cfg: Config) -> int:
    """--control_iters, or for -1 the Di4C run's compute in network rows (a backward costs two
    rows): the student on B L rows with gradients, the target on B L and the teacher on B rows
    without; a step of the teacher's own loss costs 3 rows per item."""
    if cfg.control_iters >= 0:
        return cfg.control_iters
    B, L = cfg.distil_batch, cfg.L
    return math.ceil(cfg.distil_iters * (3 * B * L + B * L + B) / (3 * cfg.batch_size))


# -----------------------------------------------------------------------------
# Sampling: ancestral (docs/method.md (37)), unconditional and prefix-conditional


def sample_sets(cfg: Config) -> list:
    """(model, kind, steps) of every sample set of this configuration: unconditional at each
    step count, prefix-conditional at the student's step counts."""
    models = {"teacher": cfg.steps, "student": cfg.student_steps}
    if cfg.control_iters:
        models["control"] = cfg.student_steps
    return [(name, kind, N) for name, steps in models.items() for N in steps
            for kind in ("uncond", "cond") if kind == "uncond" or N in cfg.student_steps]


def load_models(cfg: Config, corpus: Corpus) -> dict:
    """{name: (net, lam_dim, meta)} of the teacher, the student and (if --control_iters) the
    control, each checked to descend from the current teacher."""
    paths = {"teacher": cfg.teacher_ckpt or run_path(cfg, "teacher.pt"),
             "student": cfg.student_ckpt or run_path(cfg, "student.pt")}
    if cfg.control_iters:
        paths["control"] = run_path(cfg, "control.pt")
    for name, path in paths.items():
        if not os.path.exists(path):
            raise SystemExit(f"error: {path!r} not found: run --stage "
                             f"{'teacher' if name == 'teacher' else 'distill'} first")
    nets = {name: load_model(cfg, corpus, path) for name, path in paths.items()}
    for name in nets.keys() - {"teacher"}:
        if not paths[name].endswith(RELEASED):     # a released student has no recorded parents
            check_lineage(paths[name], nets[name][2], {"teacher": nets["teacher"][2]["id"]})
    return nets


def sample_times(N: int, device) -> torch.Tensor:
    return torch.linspace(1, T_MIN_SAMPLE, N + 1, dtype=torch.float64, device=device)


@torch.no_grad()
def generate(cfg: Config, ctx, corpus: Corpus, net, lam_dim: int, n_steps: int,
             x_T: torch.Tensor, salt: str) -> tuple:
    """Ancestral sampling of the rows of x_T (a revealed prefix stays: SUBS), split over ranks:
    times linspace(1, 1e-5, N + 1) in float64, one more NFE if a [MASK] is left; a product model
    reuses its output for an unchanged input, a mixture draws a fresh lambda per sample per
    step (--sampler sdtt: SDTT's sampler). Returns (x0 (N, D) long on CPU, mean NFE)."""
    process, times = make_process(corpus.S), sample_times(n_steps, ctx.device)
    seed = cfg.seed + 1000 * ctx.rank + sum(map(ord, salt))
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    if cfg.sampler == "sdtt":                   # SDTT draws from the global RNG: seeded here
        from pretrained import mdlm
        torch.manual_seed(seed)
    rows, nfes = [], []
    mine = x_T[ctx.rank::ctx.world_size]
    for i in range(0, mine.shape[0], cfg.sample_batch):
        x = mine[i:i + cfg.sample_batch].to(ctx.device)
        with ctx.autocast():
            x0, nfe = (mdlm.sdtt_sample(net, x, n_steps, lam_dim) if cfg.sampler == "sdtt" else
                       core.ancestral_sample(process, x, times, net, lam_dim=lam_dim,
                                             final_nfe=True, reuse_unchanged=lam_dim == 0,
                                             generator=g))
        rows.append(x0.cpu())
        nfes += [nfe] * x0.shape[0]
    parts = ctx.gather((torch.cat(rows) if rows else torch.zeros(0, x_T.shape[1],
                                                                 dtype=torch.long), nfes))
    x0 = torch.empty_like(x_T)
    for r, (xr, _) in enumerate(parts):
        x0[r::ctx.world_size] = xr
    nfes = [n for _, nr in parts for n in nr]
    return x0, sum(nfes) / len(nfes)


def stage_sample(cfg: Config, ctx, corpus: Corpus):
    """Unconditional and prefix-conditional samples of teacher, student and control at their
    step counts -> out_dir/samples/<model>_<uncond|cond>_<N>.{pt,txt}; the latency of student
    vs teacher at the student's step counts (one batch, no caching: equal NFEs)."""
    sample_dir = os.path.join(cfg.out_dir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    nets = load_models(cfg, corpus)
    process = make_process(corpus.S)
    n_prefix, prefix_len, cont_len = cfg.prefix
    n_prefix = min(n_prefix, corpus.n_blocks("val"))
    prefix = corpus.get("val", np.arange(n_prefix))[:, :prefix_len].cpu()     # (P, prefix_len)
    x_cond = process.prior(n_prefix * N_CONT, prefix_len + cont_len)
    x_cond[:, :prefix_len] = prefix.repeat_interleave(N_CONT, 0)              # (P C, D')
    x_uncond = process.prior(cfg.n_samples, cfg.seq_len)                      # (N, D)
    sets = sample_sets(cfg)
    bar = ctx.progress(len(sets), "sample", unit="set")
    for name, kind, N in sets:
        net, lam_dim, meta = nets[name]
        t0 = time.time()
        x0, nfe = generate(cfg, ctx, corpus, net, lam_dim, N,
                           x_uncond if kind == "uncond" else x_cond, f"{kind}{N}")
        if ctx.rank == 0:
            stem = os.path.join(sample_dir, f"{name}_{kind}_{N}")
            save_checkpoint(stem + ".pt", {"tokens": x0, "nfe": nfe, "steps": N,
                                           "parents": {name: meta["id"]}, "config": asdict(cfg)})
            with open(stem + ".txt", "w") as f:
                f.write("\n\n=====\n\n".join(corpus.decode(r) for r in x0.tolist()))
        ctx.log(f"sample: {name} {kind} N={N}: {x0.shape[0]} x {x0.shape[1]} tokens, "
                f"NFE {nfe:.1f}, {time.time() - t0:.1f} s")
        bar.update(1)
    bar.close()
    x_T = process.prior(cfg.sample_batch, cfg.seq_len, device=ctx.device)
    lat = {str(N): text_metrics.latency({k: functools.partial(
        core.ancestral_sample, process, x_T, sample_times(N, ctx.device), nets[k][0],
        lam_dim=nets[k][1], generator=torch.Generator(device=ctx.device).manual_seed(cfg.seed))
        for k in ("teacher", "student")}, LATENCY_RUNS, ctx.device, ctx.autocast)
        for N in cfg.student_steps}
    ctx.log("latency, s per call (teacher / student): " + ", ".join(
        f"N={N} {r['teacher_s']:.3f} / {r['student_s']:.3f}" for N, r in lat.items()))
    update_metrics(cfg, ctx, {"latency": lat})


# -----------------------------------------------------------------------------
# Evaluation: gen-PPL under a judge, unigram entropy, self-BLEU (eval/text_metrics.py)


def train_judge(cfg: Config, ctx, corpus: Corpus) -> nn.Module:
    """The offline autoregressive judge (the DiT, causal), trained or reused from judge.pt.
    It is part of the metric, not of the experiment: it trains with seed 0 whatever --seed is,
    so runs of several training seeds are scored by one judge (a seed run may reuse it)."""
    cfg = dataclasses.replace(cfg, seed=0)
    torch.manual_seed(cfg.seed + 1)
    judge = build_model(cfg, corpus.S, causal=True).to(ctx.device)
    path = run_path(cfg, "judge.pt")
    state = load_checkpoint(path, asdict(cfg)) if os.path.exists(path) else None
    if state and all(state["config"].get(k) == asdict(cfg)[k]
                     for k in RESUME_KEYS + ("judge_iters",)):
        judge.load_state_dict(state["model"])
        ctx.log(f"eval: reusing the judge {path}")
    else:
        def ar_loss(model, x, g):                      # next-token NLL
            logits = model(x)[:, :-1].float()                                 # (B, D - 1, S)
            return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1), {}

        fit(cfg, ctx, "judge", judge, ar_loss, random_blocks(corpus), cfg.judge_iters,
            cfg.lr[0], cfg.batch_size, warmup=cfg.warmup)
    return judge.eval()


def judge_scorer(cfg: Config, ctx, corpus: Corpus, judge) -> tuple:
    """text_metrics.scorer with the trained judge (model ids, no padding) or GPT-2 Large (None)."""
    def judge_fn(x, attention_mask=None):
        with ctx.autocast():
            return judge(x.to(ctx.device)).float()                            # (N, D, S)
    return text_metrics.scorer(judge_fn if judge else None, corpus, ctx.device, cfg.seq_len,
                               cfg.sample_batch)


def stage_eval(cfg: Config, ctx, corpus: Corpus):
    """Score every sample set of this configuration, each drawn by the current checkpoint:
    gen-PPL under --judge (text_metrics.scorer: GPT-2 Large's protocols or the judge trained
    here), unigram entropy, prefix-conditional self-BLEU."""
    ids = {name: meta["id"] for name, (_, _, meta) in load_models(cfg, corpus).items()}
    paths = {s: run_path(cfg, "samples", "{}_{}_{}.pt".format(*s)) for s in sample_sets(cfg)}
    for path in paths.values():
        if not os.path.exists(path):
            raise SystemExit(f"error: {path!r} not found: run --stage sample")
    judge = train_judge(cfg, ctx, corpus) if cfg.judge == "trained" else None
    if ctx.rank != 0:
        return
    score, key = judge_scorer(cfg, ctx, corpus, judge)
    val = corpus.get("val", np.arange(min(cfg.n_samples, corpus.n_blocks("val")))).cpu()
    res = {"data": {**score(val, 1), "entropy": text_metrics.unigram_entropy(val)}}
    for (model, kind, N), path in paths.items():
        s = load_checkpoint(path, asdict(cfg), SAMPLE_KEYS)
        check_lineage(path, s, {model: ids[model]})
        first = 0 if kind == "uncond" else cfg.prefix[1]                   # continuation only
        row = {**score(s["tokens"], max(first, 1)), "nfe": s["nfe"],
               "entropy": text_metrics.unigram_entropy(s["tokens"][:, first:])}
        if kind == "cond":
            groups = text_metrics.decode_groups(corpus.gpt2_ids(s["tokens"]), N_CONT)
            row["self_bleu"] = text_metrics.self_bleu(groups)
        res[f"{model}_{kind}_{N}"] = row
    rows = text_metrics.result_rows(res, key)
    update_metrics(cfg, ctx, {"eval": res, "results": rows, "primary": "gen_ppl",
                              "speedup": results_table.speedups(rows, "gen_ppl")})
    plot.plot_quality(cfg.out_dir, f"{os.path.basename(__file__)} --preset {cfg.preset}",
                      [r for r in rows if r["kind"] == "uncond"], "gen_ppl")
    text_metrics.print_table(res, key)
    update_metrics(cfg, ctx, {"worse_than_teacher": validation.warn_worse(ctx, rows, "gen_ppl")})


# -----------------------------------------------------------------------------
# Main


def run_needs(cfg: Config) -> list:
    """What the stages of this run need beyond the config, checked before any work (preflight):
    given checkpoints, local data files, nltk (self-BLEU) and, with --judge gpt2-large,
    transformers and the GPT-2 Large weights (in the HF cache when offline)."""
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    needs = checkpoint_needs(cfg, stages) + text_data.data_needs(cfg)
    if cfg.teacher_ckpt == SDTT7 and not os.path.exists(SDTT7):     # needs[0] is about it
        needs[0] = (f"the paper preset's teacher {SDTT7!r} is not there",
                    f"download it: {SDTT7_GET}; or --teacher_ckpt '' trains MDLM from scratch")
    if "eval" in stages:
        needs += package_needs({"nltk": ("nltk", "self-BLEU (stage eval)")})
    if {"distill", "eval"} & set(stages) and cfg.judge == "gpt2-large":   # also Di4C's validation
        needs += (package_needs({"transformers": ("transformers", "--judge gpt2-large")})
                  + text_metrics.gpt2_large_needs())
    return needs


def main(cfg: Config):
    check_config(cfg)
    preflight(run_needs(cfg))
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"error: --n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    if (len(cfg.lr), len(cfg.ema), len(cfg.prefix)) != (2, 2, 3):
        raise SystemExit("error: --lr and --ema take two values (the teacher's, then the student's), "
                         f"--prefix three; got {cfg.lr}, {cfg.ema}, {cfg.prefix}")
    if not 1 / cfg.T <= cfg.delta < 1:
        raise SystemExit(f"error: --delta {cfg.delta} must lie in [1/T, 1) = [{1 / cfg.T:.4g}, 1): "
                         "times are snapped to k/T, so a smaller delta never distils")
    run_stages(cfg, "owt_masked.py", {"teacher": stage_teacher, "distill": stage_distill,
                                      "sample": stage_sample, "eval": stage_eval}, Corpus)


# -----------------------------------------------------------------------------
# Plumbing: the infrastructure shared by the three domain scripts

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
