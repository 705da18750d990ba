"""
Di4C on class-conditional masked image generation (Sec. 5.2 of arXiv:2410.08709; teacher =
MaskGIT). Paper claim: a 4-step Di4C student matches or beats the 8-step MaskGIT teacher in
FID-IS on ImageNet 256 (paper Sec. 5.2).

Images become tokens once (stage `tokenize`: the taming-transformers f16 VQGAN released with
MaskGIT-pytorch, a small VQ-VAE trained here on your images, or raw 17-level pixels of the 8x8
digits). A bidirectional transformer with a class token is trained as the MaskGIT teacher
(arccos schedule, masked cross-entropy, label dropout for classifier-free guidance), then a
Di4C mixture student (the same network plus a lambda path that starts at zero) is distilled from
it with the core's losses in the MaskGIT variant (docs/method.md (30), (32)). Samples come from
MaskGIT's confidence sampler with CFG (docs/method.md (39)-(41)); eval/ scores them.

ImageNet, paper settings:  python imagenet_masked.py --data_dir data/imagenet \\
                             --vqgan_ckpt pretrained_maskgit/VQGAN/last.ckpt \\
                             --teacher_ckpt pretrained_maskgit/MaskGIT/MaskGIT_ImageNet_256.pth
8 GPUs:                    torchrun --standalone --nproc_per_node=8 imagenet_masked.py ...
Your images (VQ-VAE):      python imagenet_masked.py --dataset folder --data_dir my_images \\
                             --tokenizer vqvae --img_size 64 --vq_ch_mult 1 2 2 4 ...
CPU demo (8x8 digits, 5 pair labels):  python imagenet_masked.py --preset demo
CPU smoke test:            python imagenet_masked.py --preset smoke --out_dir /tmp/smoke
2-proc CPU:                torchrun --standalone --nproc_per_node=2 imagenet_masked.py \\
                             --preset smoke
Stages:                    --stage tokenize | teacher | distill | sample | eval | all (each reads
                           what the earlier ones wrote in --out_dir); --resume true continues a
                           stage exactly.
"""
import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
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
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import di4c_core as core
from eval import plot, results_table

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
    dataset: str = "imagenet"      # imagenet (data_dir/{train,val}/<class>/) | folder | digits |
                                   # photos (embedded 8x8: digits, or patches of two photographs)
    label_div: int = 1             # digits: condition on digit // label_div (2: five classes
                                   # {0,1}, {2,3}, ...: the digit within a class is left open);
                                   # photos: on (5 photo + band) // label_div, eval/digits.py
    data_dir: str = "data/imagenet"
    img_size: int = 256            # Resize(img_size) + CenterCrop(img_size), as MaskGIT-pytorch
    flip: bool = True              # also cache the codes of every mirrored image
    tokenizer: str = "vqgan"       # vqgan (MaskGIT-pytorch's taming f16) | vqvae | pixels
    vqgan_ckpt: str = "pretrained_maskgit/VQGAN/last.ckpt"
    vq_codes: int = 1024           # K, codebook size
    vq_dim: int = 256              # codebook dimension = z channels
    vq_ch: int = 128
    vq_ch_mult: tuple = (1, 1, 2, 2, 4)   # downsampling factor f = 2^(len - 1) = 16
    vq_res_blocks: int = 2
    vq_attn_res: tuple = (16,)
    vqvae_iters: int = 100_000
    vqvae_lr: float = 2e-4
    num_workers: int = 8
    # model (MaskGIT-pytorch's transformer)
    n_layer: int = 24
    n_embd: int = 768
    n_head: int = 16
    mlp_dim: int = 3072
    dropout: float = 0.1
    label_drop: float = 0.1        # class index n_classes means "dropped" (CFG)
    # teacher (MaskGIT)
    teacher_ckpt: str = ""         # ours or MaskGIT-pytorch's .pth; "" = out_dir/teacher.pt
    student_ckpt: str = ""         # "" = out_dir/student.pt; or the authors' maskgit-di4c-d.pth
                                   # (--lam_inject token; sampled and scored, no distill stage)
    teacher_iters: int = 755_200
    batch_size: int = 512          # global images per teacher / control / VQ-VAE step
    teacher_lr: float = 1e-4
    warmup: int = 2500
    teacher_cosine: bool = False   # cosine decay of the teacher LR to 0 after warm-up (demo)
    label_smoothing: float = 0.1
    teacher_ema: float = 0.0       # MaskGIT-pytorch keeps no EMA
    # di4c (MaskGIT variant, docs/method.md (30), (32); the "di4c-d" defaults)
    distil_iters: int = 100_000
    distil_batch: int = 4          # global x_t per step (2 per GPU x 2 GPUs), L lambdas each
    lr: float = 1e-5               # Di4C and control; AdamW betas (0.9, 0.96), constant
    lam_lr_mult: float = 1.0       # learning-rate multiplier of the lambda path (zero-initialised)
    lam_inject: str = "add"        # how the student sees lambda: add (ours, to every token's
                                   # embedding; student = teacher at init) | token (the authors')
    weight_decay: float = 1e-5
    L: int = 32
    r_delta: float = 0.05          # teacher step r -> r + r_delta; distil where r >= 1 - r_delta
    teacher_steps: int = 8         # K_T of the Gumbel ramp of that step
    alpha_const: float = 0.1       # alpha(t) = alpha_const sigmoid(20 (t - 1/2)), t = 1 - r
    data_term: bool = True         # "di4c-d"; false gives "di4c" (no data correlation term)
    student_ema: float = 0.0
    student_dropout: float = 0.1   # dropout of the student in training (MaskGIT's 0.1, as the
                                   # official code); the demo uses 0, see init_student
    control_iters: int = -1        # the teacher fine-tuned with its own loss: -1 = the Di4C run's
                                   # compute (control_steps), 0 = none, N = N steps
    # sampling and evaluation (docs/method.md (39)-(41))
    steps: tuple = (4, 8)          # teacher step counts
    student_steps: tuple = (4,)    # student and control step counts
    cfg_w: float = 3.0             # every model is sampled with w = 0 and w = cfg_w
    cfg_ws: tuple = (1.0, 2.0, 4.0, 6.0)  # and at these CFG weights (the FID-IS sweep, Fig. 3)
    fid_ref: str = ""              # FID / precision-recall reference: "" = the validation images;
                                   # ADM's VIRTUAL_imagenet256_labeled.npz = the peers' reference
    metrics: str = "maskgit"       # maskgit (the paper's evaluator: PRDC k=3 over 5 splits, IS over
                                   # 10 chunks) | adm (ADM's: whole sets, IS splits of 5000);
                                   # eval/image_metrics.py, docs/imagenet.md "Metrics"
    sm_temp: float = 1.0           # multiplies the logits (an inverse temperature)
    r_temp: float = 4.5            # Gumbel temperature of the confidence, annealed to 0
    lfg: bool = False              # the teacher gives the unconditional CFG branch
    sampler: str = "ours"          # ours (docs/method.md (39)-(41)) | maskgit (MaskGIT-pytorch's
                                   # sample(), output over K + 1) | di4c (the authors' modified
                                   # sample(): our reveal counts, otherwise as maskgit)
    n_per_class: int = 50          # 50 x 1000 classes = the 50k FID samples
    sample_batch: int = 64
    grid_classes: int = 10         # PNG grids for the first classes
    latency_runs: int = 10
    # system
    device: str = ""               # "" = cuda if available else cpu
    dtype: str = "bfloat16"        # float32 | bfloat16 (autocast; draws stay float64)
    seed: int = 0
    micro_batch: int = 0           # rows per forward pass and GPU (gradient accumulation over
                                   # the rest of the global batch); 0 = the GPU's whole share
    dist_timeout: float = 60.0     # minutes a rank waits for the others in a collective
    compile: bool = False          # torch.compile the network in training
    count_flops: bool = False      # count the FLOPs of each training stage's first step
    time_limit: float = 0.0        # hours of training per stage, then save and stop (0 = none)
    log_every: int = 100
    ckpt_every: int = 10_000


PRESETS = {
    "paper": {},
    # the 8x8 digits as 64 pixel tokens, 5 digit-pair labels; why each value: docs/imagenet.md
    "demo": dict(out_dir="runs/imagenet_demo", dataset="digits", label_div=2, img_size=8,
                 tokenizer="pixels", n_layer=3, n_embd=64, n_head=4, mlp_dim=256, dropout=0.0,
                 teacher_iters=5000, batch_size=64, teacher_lr=1e-3, warmup=100,
                 teacher_cosine=True, label_smoothing=0.0, teacher_ema=0.995, distil_iters=400,
                 distil_batch=16, lr=1e-4, lam_lr_mult=10.0, L=16, student_ema=0.99,
                 alpha_const=1.0, student_dropout=0.0, steps=(2, 4, 8, 16),
                 student_steps=(2, 4), cfg_w=1.0, cfg_ws=(), r_temp=20.0, n_per_class=200, sample_batch=500,
                 latency_runs=5,
                 dtype="float32", log_every=100, ckpt_every=500),
    # seconds, for tests
    "smoke": dict(out_dir="runs/imagenet_smoke", dataset="digits", img_size=8,
                  tokenizer="pixels", vq_ch=32, vq_ch_mult=(1, 2), vq_res_blocks=1,
                  vq_attn_res=(4,), vq_codes=16, vq_dim=8, vqvae_iters=3, num_workers=0,
                  n_layer=1, n_embd=32, n_head=2, mlp_dim=64, dropout=0.0, teacher_iters=4,
                  batch_size=8, teacher_lr=1e-3, warmup=2, distil_iters=3, distil_batch=2,
                  lr=1e-4, L=4, steps=(2, 4), student_steps=(2,), cfg_w=1.0, cfg_ws=(), n_per_class=2,
                  sample_batch=10, grid_classes=2, latency_runs=1, dtype="float32",
                  log_every=1, ckpt_every=2),
}
STAGES = ("tokenize", "teacher", "distill", "sample", "eval")
TOKEN_KEYS = ("dataset", "label_div", "data_dir", "img_size", "flip", "tokenizer", "vqgan_ckpt",
              "vq_codes", "vq_dim", "vq_ch", "vq_ch_mult", "vq_res_blocks", "vq_attn_res")
ARCH_KEYS = ("dataset", "tokenizer", "img_size", "vq_codes", "n_layer", "n_embd", "n_head",
             "mlp_dim")
RESUME_KEYS = ARCH_KEYS + ("batch_size", "distil_batch", "L", "lr", "teacher_lr", "warmup",
                           "r_delta", "data_term", "seed", "vqvae_lr")
RESUME_KEYS += ("dropout", "label_drop", "label_smoothing", "teacher_ema", "lam_lr_mult",
                "weight_decay", "teacher_steps", "alpha_const", "student_ema",
                "student_dropout", "sm_temp", "r_temp", "teacher_cosine", "lam_inject")
SAMPLE_KEYS = ("n_per_class", "sm_temp", "r_temp", "lfg", "seed", "dtype", "sampler")
CHOICES = {"stage": STAGES + ("all",), "dataset": ("imagenet", "folder", "digits", "photos"),
           "tokenizer": ("vqgan", "vqvae", "pixels"), "dtype": ("float32", "bfloat16"),
           "lam_inject": ("add", "token"), "sampler": ("ours", "maskgit", "di4c"),
           "metrics": ("maskgit", "adm")}
EMBEDDED = ("digits", "photos")        # 8x8, 17 grey levels, --tokenizer pixels, eval/digits.py
INF, TINY = float("inf"), 1e-12
LIMITS = {                             # (lo, hi), inclusive; check_config applies them
    "label_div": (1, 10), "img_size": (8, INF), "vq_codes": (2, INF), "vq_dim": (1, INF),
    "vq_ch": (1, INF), "vq_ch_mult": (1, INF), "vq_res_blocks": (1, INF),
    "vq_attn_res": (1, INF), "vqvae_iters": (1, INF), "vqvae_lr": (TINY, 1),
    "num_workers": (0, INF), "n_layer": (1, INF), "n_embd": (1, INF), "n_head": (1, INF),
    "mlp_dim": (1, INF), "dropout": (0, 0.99), "label_drop": (0, 1), "teacher_iters": (1, INF),
    "batch_size": (1, INF), "teacher_lr": (TINY, 1), "warmup": (0, INF),
    "label_smoothing": (0, 0.99), "teacher_ema": (0, 1 - 1e-9), "distil_iters": (1, INF),
    "distil_batch": (1, INF), "lr": (TINY, 1), "lam_lr_mult": (0, INF),
    "weight_decay": (0, INF), "L": (1, INF), "r_delta": (TINY, 0.999),
    "teacher_steps": (2, INF), "alpha_const": (0, INF), "student_ema": (0, 1 - 1e-9),
    "student_dropout": (0, 0.99), "control_iters": (-1, INF), "steps": (1, INF),
    "student_steps": (1, INF), "cfg_w": (0, INF), "sm_temp": (TINY, INF), "r_temp": (0, INF),
    "n_per_class": (1, INF), "sample_batch": (1, INF), "grid_classes": (0, INF),
    "latency_runs": (1, INF),
    "seed": (0, INF), "micro_batch": (0, INF), "dist_timeout": (1, INF), "time_limit": (0, INF), "log_every": (1, INF),
    "ckpt_every": (1, INF),
}

# -----------------------------------------------------------------------------
# Infrastructure (identical in the three domain scripts; tests/test_layout.py checks it whole):
# config and CLI, distributed setup, run context and logging, atomic checkpoints, per-step RNG,
# the training loop, metrics.json and the quality-vs-steps plot. It uses the script's Config,
# PRESETS and RESUME_KEYS; everything domain-specific lives outside it.


def parse_config(cls, argv=None):
    """CLI -> Config: `--preset` picks a preset, then every `--field value` wins."""
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        elem = float if f.type is tuple and any(isinstance(x, float) for x in f.default) else int
        kind = {bool: dict(type=_parse_bool), tuple: dict(type=elem, nargs="*")}.get(
            f.type, dict(type=f.type))                 # an empty list: LIMITS decides
        p.add_argument(f"--{f.name}", default=None, help=f"default: {f.default}", **kind)
    return make_config(cls, **{k: v for k, v in vars(p.parse_args(argv)).items() if v is not None})


def _parse_bool(s: str) -> bool:
    if s.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("1", "true", "yes")


def make_config(cls, **overrides):
    """Config = dataclass defaults (the paper preset) <- PRESETS[preset] <- explicit overrides."""
    preset = overrides.get("preset", "paper")
    if preset not in PRESETS:
        raise SystemExit(f"error: --preset must be one of {sorted(PRESETS)}, got {preset!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {**PRESETS[preset], **overrides, "preset": preset}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(f"error: unknown config field(s) {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check_config(cfg):
    """One validation of the whole config before any work: CHOICES (allowed values) and LIMITS
    ((lo, hi) inclusive, every element of a step list) of the script; one line names the field."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"error: --{name} must be one of {', '.join(map(str, allowed))}; "
                             f"got {getattr(cfg, name)!r}")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise SystemExit(f"error: --out_dir {cfg.out_dir!r} is a file, not a folder")
    for name, (lo, hi) in LIMITS.items():
        v = getattr(cfg, name)
        if isinstance(v, tuple) and not v or any(not lo <= x <= hi for x in
                                                  (v if isinstance(v, tuple) else (v,))):
            raise SystemExit(f"error: --{name} must be {'values ' if isinstance(v, tuple) else ''}"
                             f"in [{lo}, {hi}]; got {v}")


def package_needs(packages: dict) -> list:
    """[(problem, fix)] for every {import name: (pip name, what needs it)} not installed."""
    import importlib.util
    return [(f"{why} needs the package {pip}", "pip install -r requirements-paper.txt")
            for module, (pip, why) in packages.items() if importlib.util.find_spec(module) is None]


def checkpoint_needs(cfg, stages) -> list:
    """[(problem, fix)] for --teacher_ckpt / --student_ckpt: the files exist, and a given
    (released) student is sampled and scored, never also trained by the distill stage."""
    needs = [(f"--{flag} {getattr(cfg, flag)!r} does not exist", "fix the path")
             for flag in ("teacher_ckpt", "student_ckpt")
             if getattr(cfg, flag) and not os.path.exists(getattr(cfg, flag))]
    if cfg.student_ckpt and "distill" in stages:
        needs.append(("--student_ckpt replaces the distill stage's student",
                      "run --stage sample, then --stage eval"))
    return needs


def preflight(needs: list):
    """Stop before any work when a later stage of the run would fail: `needs` are the
    (problem, fix) pairs the script found (metric packages, checkpoints, data, judge weights)."""
    if needs:
        raise SystemExit("error: a later stage of this run would fail, so nothing was started: "
                         + "; ".join(f"{problem} ({fix})" for problem, fix in needs))


def setup_dist(device: str = "", timeout_min: float = 60.0):
    """torchrun -> one process per GPU (nccl) or per CPU worker (gloo); plain python -> one.
    timeout_min (--dist_timeout): how long a rank waits in a collective for the others (long
    rank-0 work such as tokenising or FID waits behind a barrier)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 on GPUs
    if "RANK" not in os.environ:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 0, 1, dev
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK",
                                                                 "WORLD_SIZE"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                            timeout=timedelta(minutes=timeout_min))
    return rank, world_size, dev


def cleanup(ctx):
    if ctx.world_size > 1:
        ctx.barrier()                  # without it gloo aborts intermittently at exit
        dist.destroy_process_group()


class Logger:
    """print0 + tee into out_dir/log.txt on rank 0 (through tqdm, so progress bars stay intact)."""

    def __init__(self, rank: int, out_dir: str):
        self.rank, self.path = rank, os.path.join(out_dir, "log.txt")

    def __call__(self, *msg):
        if self.rank == 0:
            line = " ".join(str(m) for m in msg)
            tqdm.write(line)
            with open(self.path, "a") as f:
                f.write(line + "\n")


@dataclass
class Ctx:
    """What every stage needs to know about this process."""
    rank: int
    world_size: int
    device: torch.device
    log: Logger
    dtype: str

    def autocast(self):
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # Every collective of the scripts goes through these four methods (tests/test_scale.py):
    # tensors move to the training device first, since nccl serves CUDA tensors only.
    def barrier(self):
        if self.world_size > 1:
            dist.barrier(**{"device_ids": [self.device.index]} if self.device.type == "cuda"
                         else {})

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """All-reduce sum over ranks (float32, on the training device)."""
        x = x.detach().float().to(self.device).clone()
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """All-reduce mean over ranks (float32, on the training device)."""
        return self.sum(x) / self.world_size

    def gather(self, obj) -> list:
        """Every rank's picklable `obj` (keep tensors on the CPU), in rank order."""
        if self.world_size == 1:
            return [obj]
        parts = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def progress(self, total=None, desc: str = "", initial: int = 0, unit: str = "it"):
        """A tqdm bar with rate and ETA on rank 0 (disabled elsewhere)."""
        return tqdm(total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
                    disable=self.rank != 0, mininterval=1.0)


def save_checkpoint(path: str, state: dict):
    """Atomic: write a temp file in the same folder, then rename over the old checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: could not write checkpoint {path!r} ({e}); the previous one "
                         "is kept") from None


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
    bad = [k for k in keys_that_must_match if state["config"].get(k) != cfg_dict.get(k)]
    if bad:
        diffs = ", ".join(f"{k}: checkpoint {state['config'].get(k)!r} vs now "
                          f"{cfg_dict.get(k)!r}" for k in bad)
        raise SystemExit(f"error: checkpoint {path!r} was written with another config ({diffs})")
    return state


def weights_id(state_dict: dict) -> str:
    """A short content hash of a state dict (names, shapes, bytes): the identity by which a
    checkpoint's children and the samples drawn from it know it."""
    h = hashlib.sha1()
    for k in sorted(state_dict):
        v = state_dict[k].detach().cpu().reshape(-1).contiguous()
        h.update(f"{k}{tuple(state_dict[k].shape)}{v.dtype}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def check_lineage(path: str, state: dict, parents: dict):
    """Refuse a checkpoint or sample file made from other parents than the current ones."""
    have = state.get("parents", {})
    bad = {k: (have.get(k), v) for k, v in parents.items() if have.get(k) != v}
    if bad:
        diffs = ", ".join(f"{k} {a} vs now {b}" for k, (a, b) in bad.items())
        raise SystemExit(f"error: {path!r} was made from another {diffs}; rerun the stage that "
                         "writes it (or start in a fresh --out_dir)")


def ckpt_path(cfg, name: str) -> str:
    """Where a stage writes checkpoint `name`: out_dir/<name>.pt."""
    return os.path.join(cfg.out_dir, f"{name}.pt")


def run_path(cfg, *parts: str) -> str:
    """A file a stage reads: under --run_dir if given (e.g. a finished, read-only run whose
    samples are scored into a new --out_dir), else under --out_dir."""
    return os.path.join(cfg.run_dir or cfg.out_dir, *parts)


def step_rng(cfg, ctx: Ctx, salt: str, step: int, row: int) -> torch.Generator:
    """The generator of a micro-batch: one per (stage, step, first global row of the
    micro-batch), so resume is exact without saving RNG state, and runs that cut a global
    batch into the same micro-batches draw the same numbers on any number of ranks
    (docs/scale.md). It also seeds the global RNG, which dropout uses."""
    seed = (cfg.seed * 1_000_003 + sum(map(ord, salt)) * 7919 + row * 2 ** 32
            + step) % (2 ** 63)
    torch.manual_seed(seed)
    return torch.Generator(device=ctx.device).manual_seed(seed)


def update_metrics(cfg, ctx: Ctx, new: dict):
    """Merge `new` into out_dir/metrics.json (rank 0), one level deep."""
    if ctx.rank != 0:
        return
    path = os.path.join(cfg.out_dir, "metrics.json")
    metrics = json.load(open(path)) if os.path.exists(path) else {}
    for k, v in new.items():
        metrics[k] = {**metrics.get(k, {}), **v} if isinstance(v, dict) else v
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(path + ".tmp", path)


def batch_plan(ctx: Ctx, global_batch: int, micro_batch: int = 0) -> list:
    """This rank's rows of a global batch, one slice per micro-step (gradient accumulation).

    The global batch is split over the W ranks as evenly as possible (the first B mod W ranks
    take one row more), each share into micro-batches of at most micro_batch rows (0: the whole
    share at once). Every rank has the same number of micro-steps, so any W <= B works; only a
    rank's last micro-step (the one that synchronises gradients) is sure to be non-empty.
    """
    B, W, r = global_batch, ctx.world_size, ctx.rank
    if B < W:
        raise SystemExit(f"error: a global batch of {B} cannot be split over {W} ranks (each "
                         "rank needs a row); use fewer GPUs or a larger batch")
    share, start = B // W + (r < B % W), r * (B // W) + min(r, B % W)
    k = 1 if micro_batch <= 0 else -(-(-(-B // W)) // micro_batch)     # ceil(ceil(B/W) / m)
    cut = [start + share * j // k for j in range(k + 1)]
    return [slice(a, b) for a, b in zip(cut, cut[1:])]


def memory_gb(device: torch.device, peak: bool = False, reset: bool = False) -> float:
    """This process's memory now (or its peak since the last reset): CUDA allocations on a GPU,
    the resident set (Linux /proc) on a CPU; reset=True restarts the peak (NaN where unknown)."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(
            device) / 2 ** 30
    try:
        if reset:                      # hand freed heap pages back first (glibc), so that the
            import ctypes              # next peak counts what the stage itself allocates
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        status = open("/proc/self/status").read()
    except (OSError, AttributeError):  # not Linux / not glibc
        return float("nan")
    key = "VmHWM:" if peak else "VmRSS:"
    return int(status.split(key)[1].split()[0]) / 2 ** 20


def lr_factor(step: int, warmup: int, decay_iters: int = 0) -> float:
    """Linear warm-up over `warmup` steps, then constant, or, with decay_iters > 0, a cosine
    decay from 1 to 0 at step decay_iters (a pure function of the step: resume is exact)."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if decay_iters <= 0 or step < warmup:
        return warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, decay_iters - warmup))))


def update_ema(ema: nn.Module, model: nn.Module, decay: float):
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def fit(cfg, ctx: Ctx, name: str, raw: nn.Module, loss_fn, batches, iters: int, lr: float,
        global_batch: int, *, betas=(0.9, 0.999), weight_decay: float = 0.0, warmup: int = 0,
        cosine: bool = False, ema_decay: float = 0.0, parents: Optional[dict] = None) -> dict:
    """The training loop of every stage: AdamW with the lambda path's LR multiplier
    (core.lam_param_groups), LR warm-up then constant or cosine (lr_factor), grad clip 1, EMA
    with warm-up min(decay, (1 + n) / (10 + n)), a stop at `iters` steps.

    Each step's gradient is that of the mean loss over `global_batch` rows, at any world size:
    batch_plan splits the rows over ranks and micro-batches of at most --micro_batch rows
    (gradient accumulation, DDP syncing on the last), and every row's loss is weighted W / B.
    batches(step, rows, g) -> the rows `rows` (a slice) of global batch `step`; loss_fn(model,
    batch, g) -> (loss (b,), terms {name: (b,)}); g comes from step_rng, so with --resume a run
    continues exactly from out_dir/<name>_state.pt (written every ckpt_every steps, on Ctrl-C
    and when --time_limit hours are used up). A non-finite loss or gradient stops the run
    before the optimizer step, naming the step and the terms; the last good state stays on
    disk. The finished model goes to out_dir/<name>.pt ({model, ema, lam_dim, step, wall,
    config, id, parents}); `parents` ({name: weights_id}) are the checkpoints it derives from:
    a state from other parents is not resumed. --compile runs torch.compile(model) (checkpoints
    keep the plain names). metrics.json "train"/<name> gets parameters, seconds per step,
    memory at the start and peak memory of the stage (mean over ranks) and, with --count_flops,
    FLOPs per step (all ranks; bench/paper_shapes.py reads them). Returns {ema, step, wall}.
    """
    parents, plan = parents or {}, batch_plan(ctx, global_batch, cfg.micro_batch)
    micro_rows = max(r.stop - r.start for r in plan)
    state_path = ckpt_path(cfg, f"{name}_state")
    opt = torch.optim.AdamW(core.lam_param_groups(raw, lr, cfg.lam_lr_mult), betas=betas,
                            weight_decay=weight_decay)
    ema = copy.deepcopy(raw).requires_grad_(False) if ema_decay else None
    step, wall = 0, 0.0
    if cfg.resume and os.path.exists(state_path):
        state = load_checkpoint(state_path, asdict(cfg), RESUME_KEYS)
        check_lineage(state_path, state, parents)
        raw.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, wall = state["step"], state["wall"]
        ctx.log(f"{name}: resumed from {state_path} at step {step}")

    def snapshot(path, finished=False):  # training state (with optimizer) or finished model
        if ctx.rank == 0:
            final = (raw if ema is None else ema).state_dict()
            save_checkpoint(path, dict(model=raw.state_dict(), ema=ema.state_dict() if ema
                                       else None, step=step, wall=wall, config=asdict(cfg),
                                       kind=name, lam_dim=getattr(raw, "lam_dim", 0),
                                       parents=parents, id=weights_id(final) if finished
                                       else None, optimizer=None if finished
                                       else opt.state_dict()))

    def flags():                       # every rank stops at the same step
        limit = cfg.time_limit * 3600
        over = torch.tensor([float(step >= iters), float(0 < limit <= wall)])
        return ctx.mean(over).gt(0).tolist()

    # buffers are constants here (no batch norm): not broadcasting them lets a rank with fewer
    # rows skip an empty micro-step while the others run forward
    ddp = DDP(raw, broadcast_buffers=False) if ctx.world_size > 1 else raw
    model = torch.compile(ddp) if cfg.compile else ddp
    raw.train()
    ctx.log(f"{name}: global batch {global_batch} = {ctx.world_size} rank(s) x {len(plan)} "
            f"micro-step(s) of <= {micro_rows} rows")
    bar, start, wall0, first_s, flops = ctx.progress(iters, name, step), step, wall, 0.0, 0.0
    mem_start = memory_gb(ctx.device, reset=True)
    try:
        while True:
            done, out_of_time = flags()
            if done:
                break
            if out_of_time:
                snapshot(state_path)
                raise SystemExit(f"{name}: --time_limit {cfg.time_limit} h used up at step "
                                 f"{step}; state saved to {state_path}; rerun with --resume true")
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr * group["mult"] * lr_factor(step, warmup, iters if cosine else 0)
            opt.zero_grad(set_to_none=True)
            counting = cfg.count_flops and step == start
            counter = FlopCounterMode(display=False) if counting else nullcontext()
            with counter:
                names, sums = accumulate(cfg, ctx, name, model, ddp, loss_fn, batches, step,
                                         plan, global_batch)
            flops = counter.get_total_flops() if counting else flops
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
            vals = ctx.sum(torch.cat([sums / global_batch, norm.float()[None] / ctx.world_size]))
            names.append("grad_norm")
            if not torch.isfinite(vals).all():
                bad = [k for k, v in zip(names, vals.tolist()) if not math.isfinite(v)]
                raise SystemExit(f"error: {name} step {step}: non-finite {', '.join(bad)}; "
                                 f"stopped before the update, {state_path} (if any) is the last "
                                 "good state; try a lower --lr")
            opt.step()
            if ema is not None:        # warm-up: early EMAs must not keep the random init
                update_ema(ema, raw, min(ema_decay, (1 + step) / (10 + step)))
            first_s = first_s or time.perf_counter() - t0
            step, wall = step + 1, wall + time.perf_counter() - t0
            bar.update(1)
            if step % cfg.log_every == 0 or step == iters:
                bar.set_postfix(loss=f"{vals[0].item():.4f}")
                ctx.log(f"{name} step {step:06d} | " + " | ".join(
                    f"{k} {v:.4f}" for k, v in zip(names, vals.tolist()))
                    + f" | lr {opt.param_groups[0]['lr']:.1e} | {1000 * wall / step:.0f} ms/it")
            if step % cfg.ckpt_every == 0:
                snapshot(state_path)
    except KeyboardInterrupt:
        snapshot(state_path)
        raise SystemExit(f"interrupted: {name} state at step {step} saved to {state_path}; "
                         "rerun with --resume true to continue") from None
    finally:
        bar.close()
    snapshot(state_path)
    snapshot(ckpt_path(cfg, name), finished=True)
    ran = step - start                 # seconds per step leave out the first (warm-up, compile)
    update_metrics(cfg, ctx, {"train": {name: dict(
        params=sum(p.numel() for p in raw.parameters()), global_batch=global_batch,
        world_size=ctx.world_size, micro_steps=len(plan),
        micro_rows=micro_rows,
        sec_per_step=(wall - wall0 - first_s) / (ran - 1) if ran > 1 else first_s,
        mem_start_gb=ctx.mean(torch.tensor([mem_start])).item(),
        peak_mem_gb=ctx.mean(torch.tensor([memory_gb(ctx.device, peak=True)])).item(),
        flops_per_step=ctx.sum(torch.tensor([float(flops)])).item() if cfg.count_flops
        else None)}})
    ctx.barrier()
    return {"ema": ema, "step": step, "wall": wall}


def accumulate(cfg, ctx: Ctx, name: str, model, ddp, loss_fn, batches, step: int, plan: list,
               global_batch: int) -> tuple:
    """The backward passes of one optimizer step over this rank's micro-batches (`plan`), each
    row's loss weighted W / B so that DDP's mean over ranks gives the global batch's mean.
    Returns (names, (n,) row sums of the loss and of every term)."""
    names, sums = [], torch.zeros(0)
    for j, rows in enumerate(plan):
        if rows.start == rows.stop:    # a rank with fewer rows: nothing to do (not a sync step)
            continue
        g = step_rng(cfg, ctx, name, step, rows.start)
        batch = batches(step, rows, g)
        sync = j == len(plan) - 1 or ctx.world_size == 1
        with nullcontext() if sync else ddp.no_sync():
            with ctx.autocast():
                loss, terms = loss_fn(model, batch, g)
            (loss.sum() * (ctx.world_size / global_batch)).backward()
        names = ["loss", *terms]
        row_sums = torch.stack([v.detach().float().sum() for v in (loss, *terms.values())])
        sums = row_sums if not len(sums) else sums + row_sums
    return names, sums


class Batches:
    """Global batches of in-memory tensors, a pure function of (seed, step), so resume is exact
    and every world size sees the same data; use it as fit's `batches`.

    Epoch e is a permutation of the items drawn from seed + e (DistributedSampler's, so one
    process reproduces earlier single-GPU runs); global batch s of the epoch is its items
    [s B, (s + 1) B), the rest of an epoch is dropped; a rank takes the rows batch_plan gives it.
    """

    def __init__(self, tensors: tuple, cfg, ctx: Ctx, global_batch: int):
        self.tensors, self.B, self.seed, self.device = tensors, global_batch, cfg.seed, ctx.device
        self.per_epoch = len(tensors[0]) // global_batch
        if self.per_epoch == 0:
            raise SystemExit(f"error: {len(tensors[0])} training items cannot fill a global "
                             f"batch of {global_batch}")
        self.epoch, self.order = -1, None

    def __call__(self, step: int, rows: slice, g=None) -> tuple:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            perm = torch.Generator().manual_seed(self.seed + epoch)
            self.epoch, self.order = epoch, torch.randperm(len(self.tensors[0]), generator=perm)
        idx = self.order[i * self.B + rows.start:i * self.B + rows.stop]
        return tuple(t[idx].to(self.device).long() if t.dtype in (torch.int16, torch.int32)
                     else t[idx].to(self.device) for t in self.tensors)


def check_round(cfg, lam_T: int):
    """Another Di4C round (a student as --teacher_ckpt, lam_T > 0; docs/method.md (35)): no
    control (a mixture has no loss of its own to fine-tune with)."""
    if lam_T and cfg.control_iters:
        raise SystemExit("error: the control fine-tunes a product teacher with its own loss; a "
                         "Di4C student as teacher (another round) has none: add --control_iters 0")


# End of the infrastructure block.


# -----------------------------------------------------------------------------
# Data: labelled images with MaskGIT-pytorch's resize / crop, or the embedded digits


def read_image(path: str):
    """ImageFolder's loader: an RGB PIL image, or a ValueError that names the unreadable file."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot read image {path!r} ({type(e).__name__})") from None


def decoded(loader):
    """Iterate a DataLoader of images; an unreadable file stops the run with one line (a
    worker's error arrives wrapped, its last line names the file)."""
    try:
        yield from loader
    except ValueError as e:
        raise SystemExit(f"error: {str(e).strip().splitlines()[-1]}") from None


def image_folder(cfg: Config, split: str):
    """A torchvision ImageFolder of (3, img_size, img_size) uint8 images and class indices.

    dataset=imagenet reads data_dir/<split>/<class>/ (the ImageNet layout), dataset=folder reads
    data_dir/<class>/ for every split. Transform: Resize(img_size) of the short side, then
    CenterCrop(img_size) (MaskGIT-pytorch's evaluation transform; its training RandomCrop +
    flip becomes the centre crop + the cached mirror, see `flip`).
    """
    import torchvision
    from torchvision import transforms
    root = os.path.join(cfg.data_dir, split) if cfg.dataset == "imagenet" else cfg.data_dir
    if not os.path.isdir(root):
        raise SystemExit(f"error: {root!r} is not a folder of class sub-folders (--data_dir "
                         f"{cfg.data_dir!r}, --dataset {cfg.dataset})")
    tf = transforms.Compose([transforms.Resize(cfg.img_size), transforms.CenterCrop(cfg.img_size),
                             transforms.PILToTensor()])
    try:
        return torchvision.datasets.ImageFolder(root, transform=tf, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"error: no images under {root!r} ({e})") from None


def load_images(ds, ctx: Ctx, idx=None, workers: int = 0) -> tuple:
    """Decode the items idx of an ImageFolder: (images (N, 3, H, W) uint8, labels (N,) long)."""
    idx = range(len(ds)) if idx is None else idx
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, list(idx)), batch_size=64,
                                         num_workers=workers)
    xs, ys = [], []
    for x, y in decoded(loader):
        xs.append(x[:, :3])
        ys.append(y)
    if not xs:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys)


# -----------------------------------------------------------------------------
# Tokenizers. VQ: the taming-transformers VQGAN architecture (Esser et al. 2021) with its
# state-dict names, so MaskGIT-pytorch's released f16 checkpoint loads key by key; a smaller
# configuration of it is the VQ-VAE trained here. The architecture lives in
# pretrained/taming_vqgan.py, imported by the two functions below. Pixels: a grey level is a token.


def build_vq(cfg: Config) -> nn.Module:
    from pretrained import taming_vqgan
    return taming_vqgan.build_vqgan(codes=cfg.vq_codes, dim=cfg.vq_dim, ch=cfg.vq_ch,
                                    ch_mult=cfg.vq_ch_mult, res_blocks=cfg.vq_res_blocks,
                                    attn_res=cfg.vq_attn_res, img_size=cfg.img_size)


def load_vqgan(cfg: Config, path: str) -> nn.Module:
    """MaskGIT-pytorch's VQGAN (`pretrained_maskgit/VQGAN/last.ckpt`) into the taming f16
    architecture, strictly (pretrained/taming_vqgan.py reads the checkpoint)."""
    from pretrained import taming_vqgan
    try:
        sd = taming_vqgan.vqgan_state_dict(path)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return load_strict(build_vq(cfg), sd, f"VQGAN checkpoint {path!r} does not fit the taming "
                       "architecture of --vq_codes/--vq_dim/--vq_ch/--vq_ch_mult/--vq_res_blocks/"
                       "--vq_attn_res/--img_size (the released f16 model needs the paper preset)")


def load_strict(module: nn.Module, sd: dict, what: str) -> nn.Module:
    """module.load_state_dict(sd), strictly: any missing, unexpected or mis-shaped key stops the
    run with an error that says `what` and names the first eight keys of each kind."""
    want = module.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise SystemExit(f"error: {what}: missing {missing[:8]} ({len(missing)}), unexpected "
                         f"{unexpected[:8]} ({len(unexpected)}), shape mismatches (checkpoint vs "
                         f"model) {shapes[:8]}")
    module.load_state_dict(sd)
    return module


class Tokens:
    """Tokenizer + token geometry: K codes ([MASK] = K, S = K + 1), D = h w tokens."""

    def __init__(self, cfg: Config, K: int, grid: int, vq=None):
        self.cfg, self.K, self.grid, self.D, self.vq = cfg, K, grid, grid * grid, vq

    @torch.no_grad()
    def to_images(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, D) -> float images (N, C, H, W) in [0, 1] (pixels: C = 1, 16 levels)."""
        if self.vq is None:
            return codes.view(-1, 1, self.grid, self.grid).float() / (self.K - 1)
        dev = next(self.vq.parameters()).device
        out = [self.vq.decode(c.to(dev)).cpu() for c in codes.split(64)]
        return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def load_tokens(cfg: Config, ctx: Ctx, meta: dict) -> Tokens:
    """The tokenizer that made codes.pt (the VQ model only where images must be decoded)."""
    vq = None
    if cfg.tokenizer == "vqgan":
        vq = load_vqgan(cfg, cfg.vqgan_ckpt)
    elif cfg.tokenizer == "vqvae":
        state = load_checkpoint(run_path(cfg, "vqvae.pt"), asdict(cfg), TOKEN_KEYS)
        vq = build_vq(cfg)
        vq.load_state_dict(state["model"])
    if vq is not None:
        vq = vq.to(ctx.device).eval().requires_grad_(False)
    return Tokens(cfg, meta["K"], meta["grid"], vq)


def codes_meta(cfg: Config) -> dict:
    """codes.pt -> {"codes" (N, D) int16, "labels" (N,), "K", "grid", "n_classes", "classes"}."""
    path = run_path(cfg, "codes.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path!r} not found: run --stage tokenize first (same --out_dir)")
    return load_checkpoint(path, asdict(cfg), TOKEN_KEYS)


def stage_tokenize(cfg: Config, ctx: Ctx):
    """Images -> token ids, once, into out_dir/codes.pt (training never runs the encoder).

    pixels: the digits' 17 grey levels are the tokens (K = 17, D = 64). vqgan / vqvae: every
    image of the training split (and its mirror if --flip) through the VQ encoder; rank r
    encodes items r, r + W, ... and rank 0 merges them.
    """
    path = ckpt_path(cfg, "codes")
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if all(state["config"].get(k) == asdict(cfg).get(k) for k in TOKEN_KEYS):
            ctx.log(f"tokenize: reusing {path} ({len(state['codes'])} items)")
            return
    if cfg.tokenizer == "pixels":
        if cfg.dataset not in EMBEDDED:
            raise SystemExit("error: --tokenizer pixels is for --dataset digits or photos (8x8, "
                             "17 levels)")
        from eval import digits
        images, labels = digits.load_embedded(cfg.dataset)                      # (N, 8, 8)
        codes, K, grid = images.flatten(1), digits.LEVELS, 8
        labels = labels // cfg.label_div
        name = str if cfg.dataset == "digits" else lambda d: f"{('china', 'flower')[d // 5]}{d % 5}"
        classes = ["|".join(name(d) for d in range(10) if d // cfg.label_div == c)
                   for c in range(int(labels.max()) + 1)]
    else:
        if cfg.dataset in EMBEDDED:
            raise SystemExit(f"error: --dataset {cfg.dataset} needs --tokenizer pixels")
        ds = image_folder(cfg, "train")
        vq = (load_vqgan(cfg, cfg.vqgan_ckpt) if cfg.tokenizer == "vqgan"
              else train_vqvae(cfg, ctx, ds)).to(ctx.device).eval()
        codes, labels = encode_split(cfg, ctx, ds, vq)
        K, grid, classes = vq.K, cfg.img_size // vq.f, ds.classes
    if ctx.rank == 0:
        small = torch.int16 if K < 2 ** 15 else torch.int32
        save_checkpoint(path, {"codes": codes.to(small), "labels": labels.long(), "K": K,
                               "grid": grid, "n_classes": len(classes), "classes": classes,
                               "config": asdict(cfg)})
    ctx.barrier()
    ctx.log(f"tokenize: {len(codes)} items of {grid}x{grid} tokens, K = {K}, "
            f"{len(classes)} classes -> {path}")


@torch.no_grad()
def encode_split(cfg: Config, ctx: Ctx, ds, vq) -> tuple:
    """Codes (N (x2 with flips), D) int and labels of an ImageFolder, sharded over ranks."""
    mine = range(ctx.rank, len(ds), ctx.world_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, list(mine)),
                                         batch_size=cfg.sample_batch, num_workers=cfg.num_workers)
    codes, labels = [], []
    for x, y in decoded(loader):
        x = x[:, :3].to(ctx.device).float() / 127.5 - 1                       # (B, 3, R, R)
        views = (x, x.flip(-1)) if cfg.flip else (x,)                          # float32 codes
        codes.append(torch.stack([vq.encode(v) for v in views], 1).int().cpu())  # (B, V, D)
        labels.append(y)
    part = (torch.cat(codes), torch.cat(labels)) if codes else None
    parts = [part]
    if ctx.world_size > 1:
        tmp = os.path.join(cfg.out_dir, f"codes_part{ctx.rank}.pt")
        torch.save(part, tmp)
        ctx.barrier()
        parts = [torch.load(os.path.join(cfg.out_dir, f"codes_part{r}.pt"), weights_only=True)
                 for r in range(ctx.world_size)]
        ctx.barrier()
        os.remove(tmp)
    V = 2 if cfg.flip else 1
    D = (cfg.img_size // vq.f) ** 2
    out, lab = torch.zeros(len(ds), V, D, dtype=torch.int), torch.zeros(len(ds), dtype=torch.long)
    for r, p in enumerate(parts):
        if p is not None:
            out[r::ctx.world_size], lab[r::ctx.world_size] = p
    return out.flatten(0, 1), lab.repeat_interleave(V)


def train_vqvae(cfg: Config, ctx: Ctx, ds) -> nn.Module:
    """The small VQ-VAE for your own images (MSE + VQ losses, no GAN / LPIPS): images are
    held in memory at img_size; out_dir/vqvae.pt, resumable like every training stage."""
    images, labels = load_images(ds, ctx, workers=cfg.num_workers)
    ctx.log(f"vqvae: {len(images)} images {tuple(images.shape[1:])}, K = {cfg.vq_codes}")
    torch.manual_seed(cfg.seed)
    vq = build_vq(cfg).to(ctx.device)
    data = Batches((images, labels), cfg, ctx, cfg.batch_size)

    def loss_fn(model, batch, g):
        x = batch[0].float() / 127.5 - 1                                        # (B, 3, R, R)
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g, device=x.device) < 0.5,
                        x.flip(-1), x)
        loss, codes = model(x)
        used = torch.zeros(cfg.vq_codes, device=x.device).index_fill_(0, codes.flatten(), 1)
        return loss, {"codes_used": used.sum().expand(len(x))}

    fit(cfg, ctx, "vqvae", vq, loss_fn, data, cfg.vqvae_iters, cfg.vqvae_lr, cfg.batch_size,
        betas=(0.5, 0.9), weight_decay=cfg.weight_decay)
    return vq


# -----------------------------------------------------------------------------
# Model: MaskGIT-pytorch's bidirectional transformer + the lambda path (docs/method.md (14))

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
    """denoiser(x_t (N, D) long, y (N,) long, lam (N, 1) | None) -> logits (N, D, S), S = K + 1.

    MaskGIT-pytorch's network: D image tokens + 1 class token (index n_classes =
    "dropped", for CFG) embedded in one table of K + 1 + n_classes + 1 rows, learned positions,
    an input MLP, pre-LN blocks, an output MLP, logits tied to the embedding plus a bias. No
    time input: the mask pattern tells the network where it is.
    Two output rules (where we differ from MaskGIT-pytorch, docs/imagenet.md): [MASK] is never
    predicted, and revealed tokens are copied (log-prob 0), so revealed positions add exactly
    zero to every Di4C term; the sampler never changes them either way.
    Student (lam_dim = 1), lam_inject "add" (ours): sinusoid(1000 lam) -> Linear(128, 512)
    -> GELU -> Linear(512, E) is added to every token's input embedding. Its last layer starts
    at zero, so at init the student is the teacher exactly, for every lambda (docs/method.md
    (14)). lam_inject "token" (the authors' student, so that it loads: maskgit-di4c-d.pth): the
    same map's output is appended as one more token after the position embedding and dropped
    after the output MLP; a token changes every attention normaliser even with a zero
    embedding, so it cannot start equal to the teacher.
    `raw_logits` is MaskGIT-pytorch's output (K + 1 classes, [MASK] included, no rules), which
    its own sampler uses (--sampler maskgit | di4c).
    lam_dim: 0 = a product network (teacher, control), 1 = a student (a 1-d lambda).
    """

    def __init__(self, K: int, D: int, n_classes: int, n_layer: int, E: int, H: int, mlp: int,
                 dropout: float, lam_dim: int = 0, lam_inject: str = "add"):
        super().__init__()
        if lam_dim not in (0, 1):
            raise ValueError(f"lam_dim must be 0 (product) or 1 (student), got {lam_dim}")
        self.K, self.D, self.n_classes, self.lam_dim = K, D, n_classes, lam_dim
        self.lam_inject = lam_inject if lam_dim else ""
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
        if self.lam_inject == "add":
            self.lam_mlp = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, E))
            nn.init.zeros_(self.lam_mlp[-1].weight), nn.init.zeros_(self.lam_mlp[-1].bias)
        elif self.lam_inject == "token":
            self.lam_token = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, E))

    def raw_logits(self, x_t, lam=None, y=None):
        """MaskGIT-pytorch's output: (N, D, K + 1) float logits, [MASK] included."""
        N, D = x_t.shape
        tokens = torch.cat([x_t, y[:, None] + self.K + 1], 1)                   # (N, D + 1)
        h = self.embed(tokens) + self.pos                                       # (N, D + 1, E)
        if self.lam_inject == "add":
            h = h + self.lam_mlp(sinusoid(lam))[:, None]
        elif self.lam_inject == "token":
            h = torch.cat([h, self.lam_token(sinusoid(lam))[:, None].to(h.dtype)], 1)
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
    """lam_dim: 0 = product network, 1 = student."""
    return MaskTransformer(meta["K"], meta["grid"] ** 2, meta["n_classes"], cfg.n_layer,
                           cfg.n_embd, cfg.n_head, cfg.mlp_dim,
                           cfg.dropout if dropout is None else dropout, lam_dim,
                           cfg.lam_inject if lam_inject is None else lam_inject)


def init_student(cfg: Config, meta: dict, init: dict, t_path: str) -> MaskTransformer:
    """The Di4C student: the teacher's weights `init` plus a fresh lambda path, with dropout
    --student_dropout. Its targets (teacher, student at x_u) are computed without dropout; a
    student trained with dropout to match them gets sharper than its targets once dropout is
    off (docs/imagenet.md), so the demo trains it without."""
    torch.manual_seed(cfg.seed)
    student = build_model(cfg, meta, lam_dim=1, dropout=cfg.student_dropout)
    try:
        return core.student_from_teacher(student, init)
    except ValueError as e:
        raise SystemExit(f"error: {t_path} does not fit the student: {e}") from None


def load_model(cfg: Config, meta: dict, path: str, device, use_ema: bool = True) -> tuple:
    """Frozen network -> (model in eval mode, lam_dim, {"id", "parents"}): a finished
    checkpoint of this script (EMA weights if it has them) or MaskGIT-pytorch's transformer
    (`model_state_dict`, strict; its id is the hash of its weights)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path!r} not found: run the stage that writes it "
                         "first (same --out_dir), or pass --teacher_ckpt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read {path!r} as a checkpoint ({e})") from None
    if isinstance(state, dict) and "model_state_dict" in state and "config" not in state:
        from pretrained.maskgit import maskgit_to_ours
        sd = maskgit_to_ours(state["model_state_dict"])
        lam_dim = 1 if "lam_token.0.weight" in sd else 0      # the authors' student
        inject = "token"
        info = {"id": weights_id(sd), "parents": {}}
    else:
        state = load_checkpoint(path, asdict(cfg), ARCH_KEYS)
        lam_dim, inject = state["lam_dim"], state["config"].get("lam_inject", "add")
        if lam_dim > 1:
            raise SystemExit(f"error: {path!r} has a {lam_dim}-dimensional lambda; this script "
                             "has a 1-dimensional one (docs/beyond.md)")
        sd = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
        info = {"id": state.get("id"), "parents": state.get("parents", {})}
    net = load_strict(build_model(cfg, meta, lam_dim, lam_inject=inject), sd,
                      f"{path!r} does not fit this transformer (K = {meta['K']}, D = "
                      f"{meta['grid'] ** 2}, {meta['n_classes']} classes, --n_layer/--n_embd/"
                      "--n_head/--mlp_dim)")
    return net.to(device).eval().requires_grad_(False), lam_dim, info


# -----------------------------------------------------------------------------
# MaskGIT schedule, confidence-based reveal, sampler (docs/method.md (7), (39)-(41))


def gamma(r: torch.Tensor) -> torch.Tensor:
    """Mask ratio at progress r in [0, 1]: arccos(r) / (pi / 2) (1 = all masked)."""
    return torch.arccos(r.clamp(0, 1)) / (math.pi / 2)


def mask_rate(t: torch.Tensor) -> torch.Tensor:
    """The same schedule in diffusion time t = 1 - r: m(t) = arccos(1 - t) / (pi / 2)."""
    return gamma(1 - t)


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


def sampler_schedule(cfg: Config, n_steps: int, D: int) -> list:
    """Tokens revealed at each step by --sampler: MaskGIT-pytorch's schedule for "maskgit",
    reveal_counts (39) for ours and the authors' "di4c"."""
    if cfg.sampler == "maskgit":
        from pretrained import maskgit
        return maskgit.upstream_schedule(n_steps, D)
    return reveal_counts(n_steps, D)


def confidence_reveal(x: torch.Tensor, log_p: torch.Tensor, n: torch.Tensor,
                      noise: torch.Tensor, mask_id: int, generator=None) -> torch.Tensor:
    """One MaskGIT step: sample every token, reveal the n most confident masked ones.

    x_hat^d ~ p^d (float64 Gumbel-max), confidence c^d = log p^d(x_hat^d) + noise * Gumbel,
    c^d = -inf where x^d is revealed; exactly min(n, #masked) tokens are revealed (ties broken
    by position, where MaskGIT-pytorch's `>= threshold` may reveal more, docs/method.md (40)) and
    revealed tokens never change.
    Args: x (N, D) long; log_p (N, D, S) log-probs; n (N,) long; noise (N,) >= 0.
    Returns x (N, D) long.
    """
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


def teacher_noise(r: torch.Tensor, K_T: int) -> torch.Tensor:
    """Gumbel ramp of the training-time teacher step: 1 - r K_T / (K_T - 1), mimicking step
    r K_T of a K_T-step sampler, clamped at 0 (MaskGIT's ramp turns negative for r > 1 - 1/K_T,
    flipping the noise's sign; docs/method.md (34))."""
    return (1 - r * K_T / (K_T - 1)).clamp_min(0)


def make_teacher_step(cfg: Config, D: int, mask_id: int):
    """The teacher's step for core.make_teacher: ONE MaskGIT confidence step r -> r' = r + delta
    on x_t (docs/method.md (34)), from the teacher's log-probs at x_t (no CFG in training).

    Reveal n = floor((1 - gamma(r')) D - #revealed), clamped to [0, #masked]; tokens from
    softmax(sm_temp logits); Gumbel scale r_temp * teacher_noise(r). t = 1 - r, u = 1 - r'.
    """
    @torch.no_grad()
    def teacher_step(log_p, x_t, t, u, generator=None):
        r, r_next = 1 - t.double(), 1 - u.double()                               # (B L,)
        masked = (x_t == mask_id).sum(1)                                        # (B L,)
        n = ((1 - gamma(r_next)) * D - (D - masked)).floor().long()
        n = torch.minimum(n.clamp_min(0), masked)
        noise = cfg.r_temp * teacher_noise(r, cfg.teacher_steps)
        return confidence_reveal(x_t, core.log_probs(cfg.sm_temp * log_p), n, noise, mask_id,
                                 generator)
    return teacher_step


@torch.no_grad()
def maskgit_sample(cfg: Config, net, lam_dim: int, y: torch.Tensor, n_steps: int, w: float,
                   generator=None, uncond=None) -> torch.Tensor:
    """MaskGIT's confidence sampler with classifier-free guidance (docs/method.md (39)-(41)).

    Start all [MASK]; at step k (ratio k / (K - 1)): a fresh lambda per image for a student
    (shared by both CFG branches), logits = (1 + w_k) cond - w_k uncond with w_k = w ratio,
    uncond = the same net with the class dropped, or `uncond` (the teacher, --lfg); tokens
    from softmax(sm_temp logits), Gumbel scale r_temp (1 - ratio), reveal_counts[k] revealed.
    Args: y (N,) class ids. Returns x_0 (N, D) long, no [MASK] left.
    """
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
        x = confidence_reveal(x, core.log_probs(cfg.sm_temp * logits), n, noise, K, generator)
    return x


# -----------------------------------------------------------------------------
# Objectives: MaskGIT's (teacher, control) and Di4C's (student)


def maskgit_loss(cfg: Config, process: core.MaskedProcess, n_classes: int):
    """MaskGIT's objective: r ~ U(0, 1) per image (t = 1 - r), mask each token with probability
    gamma(r), cross-entropy on the masked tokens (label smoothing over the K codes), labels
    dropped with probability label_drop. Per-image losses average to the batch's mean
    masked-token CE. (MaskGIT-pytorch also scores revealed tokens; the original MaskGIT and
    this script do not: our network copies them, docs/imagenet.md.)"""
    K = process.mask_id

    def loss_fn(model, batch, g):
        x0, y = batch                                                           # (B, D), (B,)
        B, dev = x0.shape[0], x0.device
        y = torch.where(torch.rand(B, generator=g, device=dev) < cfg.label_drop, n_classes, y)
        x_t = process.add_noise(x0, torch.rand(B, generator=g, device=dev), g)  # (B, D)
        logits = model(x_t, None, None, y)                                            # (B, D, S)
        masked = x_t == K
        ce = torch.zeros(x0.shape, device=dev)
        ce[masked] = F.cross_entropy(logits[masked][:, :K].float(), x0[masked],
                                     label_smoothing=cfg.label_smoothing, reduction="none")
        loss = ce.sum(1) * B / masked.sum().clamp_min(1)                         # (B,)
        acc = (logits[masked].argmax(-1) == x0[masked]).float().mean() if masked.any() else ce.sum()
        return loss, {"acc": acc.detach().expand(B)}
    return loss_fn


def di4c_loss(cfg: Config, teacher: MaskTransformer, student: MaskTransformer,
              process: core.MaskedProcess, n_classes: int, lam_T: int = 0):
    """The Di4C objective in the MaskGIT variant (docs/method.md (30), (32)), in diffusion
    time t = 1 - r: r ~ U(0, 1), x_t masked with gamma(r), labels dropped w.p. label_drop and
    passed to every network call as the core's `cond`; teacher_step = one teacher confidence
    step r -> r + r_delta; L lambdas; alpha = alpha_const sigmoid(20 (t - 1/2)) ("di4c-d",
    zero with --data_term false); distillation reuses x_t with weight 1[t <= r_delta] / r_delta,
    consistency where t > r_delta. A Di4C student as teacher (lam_T > 0, another round,
    docs/method.md (35)): its marginal is the L-lambda average, its step uses one fresh lambda
    per row."""
    teacher_marginal, teacher_step = core.make_teacher(
        teacher, make_teacher_step(cfg, student.D, process.mask_id), lam_T, cfg.L)

    def loss_fn(model, batch, g):
        x0, y = batch                                                           # (B, D), (B,)
        B, dev = x0.shape[0], x0.device
        y = torch.where(torch.rand(B, generator=g, device=dev) < cfg.label_drop, n_classes, y)
        t = torch.rand(B, generator=g, device=dev)                              # t = 1 - r
        u = (t - cfg.r_delta).clamp_min(0)
        x_t = process.add_noise(x0, t, g)                                       # (B, D)
        weights = core.variant_weights("maskgit", t, cfg.r_delta,
                                       cfg.alpha_const if cfg.data_term else 0.0)
        return core.di4c_loss(model, x0, x_t, t, u, weights=weights, cond=y,
                              teacher_marginal=teacher_marginal, teacher_step=teacher_step,
                              L=cfg.L, lam_dim=student.lam_dim, generator=g)
    return loss_fn


# -----------------------------------------------------------------------------
# Stages: teacher (MaskGIT), distill (Di4C + control), sample, eval


def make_process(meta: dict) -> core.MaskedProcess:
    return core.MaskedProcess(meta["K"] + 1, mask_rate, mask_id=meta["K"])


def stage_teacher(cfg: Config, ctx: Ctx, meta: dict):
    """Train the MaskGIT teacher from scratch (skipped when --teacher_ckpt is given)."""
    if cfg.teacher_ckpt:
        ctx.log(f"teacher: using --teacher_ckpt {cfg.teacher_ckpt}, nothing to train")
        return
    torch.manual_seed(cfg.seed)
    raw = build_model(cfg, meta).to(ctx.device)
    data = Batches((meta["codes"], meta["labels"]), cfg, ctx, cfg.batch_size)
    ctx.log(f"teacher: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, "
            f"D = {raw.D}, K = {raw.K}, {meta['n_classes']} classes, {len(meta['codes'])} items")
    out = fit(cfg, ctx, "teacher", raw, maskgit_loss(cfg, make_process(meta), meta["n_classes"]),
              data, cfg.teacher_iters, cfg.teacher_lr, cfg.batch_size, betas=(0.9, 0.96),
              weight_decay=cfg.weight_decay, warmup=cfg.warmup, cosine=cfg.teacher_cosine,
              ema_decay=cfg.teacher_ema)
    update_metrics(cfg, ctx, {"teacher": dict(iters=out["step"], train_seconds=out["wall"])})


def stage_distill(cfg: Config, ctx: Ctx, meta: dict):
    """Di4C (MaskGIT variant) from the teacher (a product MaskGIT, or a Di4C student for another
    round), then the control: the teacher fine-tuned with its own MaskGIT loss for the same
    compute (so that a gain is Di4C's, not extra training's)."""
    t_path = cfg.teacher_ckpt or run_path(cfg, "teacher.pt")
    teacher, lam_T, t_info = load_model(cfg, meta, t_path, ctx.device)
    check_round(cfg, lam_T)
    init = teacher.state_dict()
    student = init_student(cfg, meta, init, t_path).to(ctx.device)
    process = make_process(meta)
    data = Batches((meta["codes"], meta["labels"]), cfg, ctx, cfg.distil_batch)
    ctx.log(f"distill: {'mixture (multi-round)' if lam_T else 'product'} teacher {t_path}, "
            f"{cfg.distil_batch} x L = {cfg.L} rows per step, "
            f"{'di4c-d' if cfg.data_term else 'di4c'}")
    out = fit(cfg, ctx, "student", student,
              di4c_loss(cfg, teacher, student, process, meta["n_classes"], lam_T), data,
              cfg.distil_iters, cfg.lr, cfg.distil_batch, betas=(0.9, 0.96),
              weight_decay=cfg.weight_decay, ema_decay=cfg.student_ema, parents={"teacher": t_info["id"]})
    update_metrics(cfg, ctx, {"student": dict(iters=out["step"], train_seconds=out["wall"])})
    if cfg.control_iters == 0:
        return
    control = build_model(cfg, meta).to(ctx.device)
    control.load_state_dict(init)
    data = Batches((meta["codes"], meta["labels"]), cfg, ctx, cfg.batch_size)
    cout = fit(cfg, ctx, "control", control, maskgit_loss(cfg, process, meta["n_classes"]), data,
               control_steps(cfg), cfg.lr, cfg.batch_size, betas=(0.9, 0.96), weight_decay=cfg.weight_decay,
               ema_decay=cfg.student_ema, parents={"teacher": t_info["id"]})
    update_metrics(cfg, ctx, {"control": dict(iters=cout["step"], train_seconds=cout["wall"])})


def control_steps(cfg: Config) -> int:
    """The control's length: --control_iters, or for -1 the Di4C run's compute in network rows
    (a forward and its backward: 3 rows per row): the student on B L rows with gradients, the
    target on B L rows and the teacher on B without; a step of the teacher's own loss costs 3
    rows per item."""
    if cfg.control_iters >= 0:
        return cfg.control_iters
    B, L = cfg.distil_batch, cfg.L
    return math.ceil(cfg.distil_iters * (3 * B * L + B * L + B) / (3 * cfg.batch_size))


def sample_runs(cfg: Config) -> list:
    """(label, checkpoint, steps, w) of every sample set; CFG off and on for each."""
    nets = [("teacher", cfg.steps), ("student", cfg.student_steps)]
    nets += [("control", cfg.student_steps)] if cfg.control_iters else []
    return [(f"{name}@{N}_w{w:g}", name, N, w) for name, steps in nets for N in steps
            for w in dict.fromkeys((0.0, cfg.cfg_w, *cfg.cfg_ws))]


def load_nets(cfg: Config, ctx: Ctx, meta: dict) -> dict:
    """{name: (frozen net, lam_dim, info)} of the teacher, the student and (if --control_iters)
    the control, each checked to descend from the current teacher."""
    paths = {"teacher": cfg.teacher_ckpt or run_path(cfg, "teacher.pt"),
             "student": cfg.student_ckpt or run_path(cfg, "student.pt")}
    if cfg.control_iters:
        paths["control"] = run_path(cfg, "control.pt")
    for name, path in paths.items():
        if not os.path.exists(path):
            raise SystemExit(f"error: {path!r} not found: run --stage "
                             f"{'teacher' if name == 'teacher' else 'distill'} first")
    nets = {name: load_model(cfg, meta, path, ctx.device) for name, path in paths.items()}
    for name in nets.keys() - {"teacher"}:
        if name == "student" and cfg.student_ckpt:   # a released student records no parents
            continue
        check_lineage(paths[name], nets[name][2], {"teacher": nets["teacher"][2]["id"]})
    return nets


def generate(cfg: Config, ctx: Ctx, net, lam_dim: int, y: torch.Tensor, n_steps: int, w: float,
             uncond=None) -> torch.Tensor:
    """Sample the rows y of a class list, split over ranks (row i on rank i mod W), gathered.
    The seed depends on (steps, w, rank), not on the model: common random numbers."""
    seed = cfg.seed * 1_000_003 + 10_007 * n_steps + round(1000 * w) + 7919 * ctx.rank
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    rng = np.random.RandomState(seed % 2 ** 32)                # --sampler maskgit / di4c: Gumbel
    mine, out = y[ctx.rank::ctx.world_size], []
    for i in range(0, len(mine), cfg.sample_batch):
        with ctx.autocast():
            y_i = mine[i:i + cfg.sample_batch].to(ctx.device)
            if cfg.sampler != "ours":     # MaskGIT-pytorch's / the authors' sampler, exactly
                from pretrained import maskgit
                x = maskgit.sample(net, lam_dim, y_i, sampler_schedule(cfg, n_steps, net.D), w,
                                   cfg.sm_temp, cfg.r_temp, g, rng, uncond, cfg.sampler)
            else:
                x = maskgit_sample(cfg, net, lam_dim, y_i, n_steps, w, g, uncond)
            out.append(x.cpu())
    parts = ctx.gather(torch.cat(out) if out else torch.zeros(0, net.D, dtype=torch.long))
    x0 = torch.empty(len(y), net.D, dtype=torch.long)
    for r, part in enumerate(parts):
        x0[r::ctx.world_size] = part
    return x0


def save_grids(cfg: Config, tokens: Tokens, label: str, codes, y, classes: list):
    """samples/<label>.png (a row per class) and samples/<label>/class_<c>.png."""
    from torchvision.utils import save_image
    folder = os.path.join(cfg.out_dir, "samples", label)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for c in range(min(cfg.grid_classes, len(classes))):
        imgs = tokens.to_images(codes[y == c][:16])
        save_image(imgs, os.path.join(folder, f"class_{c:04d}.png"), nrow=8, padding=1)
        rows.append(imgs[:8])
    save_image(torch.cat(rows), os.path.join(cfg.out_dir, "samples", f"{label}.png"),
               nrow=max(len(r) for r in rows), padding=1)


def stage_sample(cfg: Config, ctx: Ctx, meta: dict):
    """Class-conditional samples (n_per_class per class) of teacher, student and control at
    their step counts, with and without CFG -> out_dir/samples/<label>.pt and PNG grids."""
    nets = load_nets(cfg, ctx, meta)
    tokens = load_tokens(cfg, ctx, meta) if ctx.rank == 0 else None
    y = torch.arange(meta["n_classes"]).repeat_interleave(cfg.n_per_class)    # (N,)
    os.makedirs(os.path.join(cfg.out_dir, "samples"), exist_ok=True)
    if cfg.lfg and nets["teacher"][1]:
        raise SystemExit("error: --lfg needs a product teacher for the unconditional branch; "
                         "this teacher is a Di4C student (another round)")
    uncond = nets["teacher"][0] if cfg.lfg else None
    runs = sample_runs(cfg)
    bar = ctx.progress(len(runs), "sample", unit="set")
    for label, name, N, w in runs:
        net, lam_dim, info = nets[name]
        t0 = time.time()
        codes = generate(cfg, ctx, net, lam_dim, y, N, w, uncond if name != "teacher" else None)
        if ctx.rank == 0:
            save_checkpoint(os.path.join(cfg.out_dir, "samples", f"{label}.pt"),
                            {"codes": codes, "labels": y, "steps": N, "w": w, "model": name,
                             "parents": {name: info["id"]}, "config": asdict(cfg)})
            save_grids(cfg, tokens, label, codes, y, meta["classes"])
        ctx.log(f"sample: {label}: {len(codes)} images in {time.time() - t0:.1f} s")
        bar.update(1)
    bar.close()
    ctx.barrier()


@torch.no_grad()
def latency(cfg: Config, ctx: Ctx, net, lam_dim: int, n_steps: int, n_classes: int) -> list:
    """Seconds per sampler call on one batch of sample_batch images, w = 0, after one warm-up
    call; token decoding excluded."""
    y = torch.arange(cfg.sample_batch, device=ctx.device) % n_classes
    g = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    out = []
    for _ in range(cfg.latency_runs + 1):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx.autocast():
            maskgit_sample(cfg, net, lam_dim, y, n_steps, 0.0, g)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out[1:]


def score_samples(cfg: Config, ctx: Ctx, meta: dict, sets: dict) -> dict:
    """digits / photos: Fréchet distance of the 8x8 classifier's features against the whole
    real set, and that classifier's accuracy on the conditioning labels (eval/digits.py).
    VQ tokens: FID, IS, precision, recall, density and coverage at img_size from torch-fidelity's
    Inception features (eval/inception.py) under cfg.metrics' protocol (eval/image_metrics.py)
    against the reference images, after MaskGIT-pytorch's per-image min-max remap to uint8.
    sets: {label: loaded sample file}."""
    res = {}
    if cfg.tokenizer == "pixels":
        from eval import digits
        clf = digits.load_or_train_classifier(
            os.path.join(cfg.out_dir, f"{cfg.dataset}_classifier.pt"), data=cfg.dataset)
        real, _ = digits.load_embedded(cfg.dataset)
        for label, s in sets.items():
            imgs = s["codes"].view(-1, 8, 8)
            res[label] = dict(
                frechet=digits.digits_frechet(clf, imgs, real),
                class_acc=digits.class_accuracy(clf, imgs, s["labels"], cfg.label_div),
                steps=s["steps"], w=s["w"])
        return res
    from eval import image_metrics, inception
    tokens, (ref_pool, _) = load_tokens(cfg, ctx, meta), reference_features(cfg)
    for label, s in sets.items():
        imgs = torch.cat([remap_uint8(tokens.to_images(s["codes"][i:i + 256]))  # bounded memory
                          for i in range(0, len(s["codes"]), 256)])             # (N, 3, R, R)
        write_pngs(os.path.join(cfg.out_dir, "samples", label + "_png"),
                   imgs.permute(0, 2, 3, 1).numpy())
        pool, logits = inception.inception_features(imgs)
        try:
            scores = image_metrics.metrics_from_features(ref_pool, pool, logits, cfg.metrics)
        except ValueError as e:
            raise SystemExit(f"error: {label}: {e}; sample more (--n_per_class) or use "
                             "--metrics adm (no splits)") from None
        res[label] = {**scores, "steps": s["steps"], "w": s["w"]}
    return res


def remap_uint8(imgs: torch.Tensor) -> torch.Tensor:
    """MaskGIT-pytorch's conversion of decoded images (N, 3, H, W) to uint8 before Inception:
    per-image min-max to 0..255, then truncated (not rounded), as its evaluator does."""
    lo, hi = imgs.amin((1, 2, 3), keepdim=True), imgs.amax((1, 2, 3), keepdim=True)
    return ((imgs - lo) / (hi - lo).clamp_min(1e-8) * 255).clamp(0, 255).to(torch.uint8)


def reference_features(cfg: Config):
    """Inception pool features and logits of the reference images (fid_reference), computed
    once and cached next to them. Under --metrics maskgit the validation images get the same
    per-image min-max remap as the samples (MaskGIT-pytorch remaps both); ADM's npz is used as
    stored."""
    from PIL import Image
    from eval import inception
    folder = fid_reference(cfg)
    remap = cfg.metrics == "maskgit" and not cfg.fid_ref
    path = folder + ("_remapped" if remap else "") + "_features.pt"
    if os.path.exists(path):
        return torch.load(path)
    names = sorted(os.listdir(folder))
    pool, logits = [], []
    for i in range(0, len(names), 256):
        imgs = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(folder, n))
                                                      .convert("RGB"))).permute(2, 0, 1)
                            for n in names[i:i + 256]])                         # (n, 3, R, R)
        f, lg = inception.inception_features(remap_uint8(imgs.float()) if remap else imgs)
        pool.append(f)
        logits.append(lg)
    feats = (torch.cat(pool), torch.cat(logits))
    torch.save(feats, path + ".tmp")
    os.replace(path + ".tmp", path)
    return feats


def fid_reference(cfg: Config) -> str:
    """FID reference images, written once as PNGs: --fid_ref npz (ADM's reference batch,
    `arr_0` (N, H, W, 3) uint8, to out_dir/fid_ref_npz; it must be img_size square), else the
    validation split (imagenet) or the folder itself, resized and centre-cropped to img_size
    (out_dir/fid_ref)."""
    if cfg.fid_ref:
        folder = os.path.join(cfg.out_dir, "fid_ref_npz")
        if not os.path.isdir(folder):
            try:
                arr = np.load(cfg.fid_ref)["arr_0"]
            except (OSError, KeyError, ValueError) as e:
                raise SystemExit(f"error: --fid_ref {cfg.fid_ref!r}: not an npz with the reference "
                                 f"images in arr_0 ({type(e).__name__}: {e})") from None
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (cfg.img_size,
                                                                             cfg.img_size, 3):
                raise SystemExit(f"error: --fid_ref {cfg.fid_ref!r}: arr_0 is {arr.dtype} "
                                 f"{arr.shape}, need uint8 (N, {cfg.img_size}, {cfg.img_size}, 3)")
            write_pngs(folder, arr)
        return folder
    folder = os.path.join(cfg.out_dir, "fid_ref")
    if not os.path.isdir(folder):
        loader = torch.utils.data.DataLoader(image_folder(cfg, "val"), batch_size=64,
                                             num_workers=cfg.num_workers)
        write_pngs(folder, (img for x, _ in decoded(loader)
                            for img in x[:, :3].permute(0, 2, 3, 1).numpy()))
    return folder


def write_pngs(folder: str, images):
    """Images (H, W, 3) uint8 -> folder/000000.png, ...; written to folder.tmp, then renamed,
    so an interrupted run leaves no half reference."""
    from PIL import Image
    os.makedirs(folder + ".tmp", exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(os.path.join(folder + ".tmp", f"{i:06d}.png"))
    if os.path.isdir(folder):                                   # a rerun's samples replace
        shutil.rmtree(folder)
    os.replace(folder + ".tmp", folder)


def stage_eval(cfg: Config, ctx: Ctx, meta: dict):
    """Score every sample set (rank 0), then time the sampler: student vs teacher at equal
    steps. Writes metrics.json["eval"], ["latency"] and prints the table."""
    if ctx.rank == 0:
        nets, lat = load_nets(cfg, ctx, meta), {}
        sets = {}                      # each sample file read once: checked, then scored
        for label, name, *_ in sample_runs(cfg):
            path = run_path(cfg, "samples", f"{label}.pt")
            if not os.path.exists(path):
                raise SystemExit(f"error: {path!r} not found: run --stage sample first")
            sets[label] = load_checkpoint(path, asdict(cfg), SAMPLE_KEYS)
            check_lineage(path, sets[label], {name: nets[name][2]["id"]})
        res = score_samples(cfg, ctx, meta, sets)
        for N in cfg.student_steps:
            t_s, s_s = (latency(cfg, ctx, *nets[k][:2], N, meta["n_classes"])
                        for k in ("teacher", "student"))
            mean = lambda v: sum(v) / len(v)
            lat[str(N)] = dict(teacher_s=mean(t_s), student_s=mean(s_s),
                               overhead_pct=100 * (mean(s_s) / mean(t_s) - 1))
        key = "frechet" if "frechet" in next(iter(res.values())) else "fid"
        rows = [dict(model=label.split("@")[0], steps=r["steps"], nfe=r["steps"], w=r["w"],
                     **{k: v for k, v in r.items() if k not in ("steps", "w")})
                for label, r in res.items()]
        update_metrics(cfg, ctx, {"eval": res, "latency": lat, "results": rows, "primary": key,
                                  "speedup": results_table.speedups(rows, key)})
        plot.plot_quality(cfg.out_dir, f"{os.path.basename(__file__)} --preset {cfg.preset}",
                          rows, key)
        print_table(res, lat)
    ctx.barrier()


def print_table(res: dict, lat: dict):
    """The eval table and a RESULT line (student vs teacher at the student's step count)."""
    key = "frechet" if "frechet" in next(iter(res.values())) else "fid"
    second = "class_acc" if key == "frechet" else "is_mean"
    print(f"\n{'samples':<20}{key:>10}{second:>11}")
    for label in sorted(res, key=lambda k: (k.split("@")[0], res[k]["w"], res[k]["steps"])):
        print(f"{label:<20}{res[label][key]:>10.3f}{res[label][second]:>11.3f}")
    for N, v in lat.items():
        print(f"latency @{N} steps: teacher {v['teacher_s']:.4f} s, student {v['student_s']:.4f} s "
              f"({v['overhead_pct']:+.1f}%)")
    for label in sorted(res):
        if label.startswith("student@") and label.replace("student", "teacher") in res:
            s, t = res[label], res[label.replace("student", "teacher")]
            print(f"RESULT {label} {key}={s[key]:.3f} teacher {key}={t[key]:.3f}")


# -----------------------------------------------------------------------------
# Main


def check(cfg: Config):
    """Reject bad values before any work, with the flag to fix."""
    check_config(cfg)
    if cfg.label_div > 1 and cfg.dataset not in EMBEDDED:
        raise SystemExit(f"error: --label_div must be 1..10, and 1 unless --dataset digits or "
                         f"photos; got {cfg.label_div}")
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"error: --n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    D = 64 if cfg.tokenizer == "pixels" else (cfg.img_size // 2 ** (len(cfg.vq_ch_mult) - 1)) ** 2
    for n in cfg.steps + cfg.student_steps:      # the schedule's own one-line errors, up front
        sampler_schedule(cfg, n, D)
    if any(not w >= 0 for w in cfg.cfg_ws):      # may be empty (no sweep), unlike LIMITS lists
        raise SystemExit(f"error: --cfg_ws must be values in [0, inf]; got {cfg.cfg_ws}")


def run_needs(cfg: Config) -> list:
    """What the stages of this run need beyond the config, checked before any work (preflight):
    the VQGAN and teacher checkpoints given, the FID reference images, torch-fidelity."""
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    needs = []
    if "tokenize" in stages and cfg.tokenizer == "vqgan" and not os.path.exists(cfg.vqgan_ckpt):
        needs.append((f"--vqgan_ckpt {cfg.vqgan_ckpt!r} does not exist", "download MaskGIT-"
                      "pytorch's VQGAN (README 'Running the paper') or pass --tokenizer vqvae"))
    needs += checkpoint_needs(cfg, stages)
    if "eval" in stages and cfg.tokenizer != "pixels":
        needs += package_needs({"torch_fidelity": ("torch-fidelity", "FID / IS (stage eval)")})
        ref = os.path.join(cfg.data_dir, "val")
        if cfg.fid_ref and not os.path.exists(cfg.fid_ref):
            needs.append((f"--fid_ref {cfg.fid_ref!r} does not exist", "download ADM's "
                          "VIRTUAL_imagenet256_labeled.npz (docs/reproduce.md) or drop --fid_ref"))
        elif cfg.dataset == "imagenet" and not cfg.fid_ref and not os.path.isdir(ref) and \
                not os.path.isdir(os.path.join(cfg.out_dir, "fid_ref")):
            needs.append((f"FID reference images {ref!r} not found", "put the ImageNet "
                          "validation images there, one folder per class"))
    return needs


def main(cfg: Config):
    check(cfg)
    preflight(run_needs(cfg))
    rank, world_size, device = setup_dist(cfg.device, cfg.dist_timeout)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ctx = Ctx(rank, world_size, device, Logger(rank, cfg.out_dir), cfg.dtype)
    ctx.log(f"imagenet_masked.py | torch {torch.__version__} | python "
            f"{platform.python_version()} | device {device} | world size {world_size}")
    ctx.log("config " + json.dumps(asdict(cfg)))
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    run = {"teacher": stage_teacher, "distill": stage_distill, "sample": stage_sample,
           "eval": stage_eval}
    walls, t_start = {}, time.time()
    for name in stages:
        t0 = time.time()
        if name == "tokenize":
            stage_tokenize(cfg, ctx)
        else:
            run[name](cfg, ctx, codes_meta(cfg))
        walls[name] = time.time() - t0
        ctx.log(f"stage {name} done in {walls[name]:.1f} s")
    walls["total"] = time.time() - t_start
    update_metrics(cfg, ctx, {"wall_seconds": walls})
    cleanup(ctx)


if __name__ == "__main__":
    main(parse_config(Config))
