"""
Di4C on pixels with a discretized-Gaussian CTMC (tauLDR teacher; Sec. 5.1 of arXiv:2410.08709).

Teacher: a tauLDR-style U-Net x0-predictor trained with the continuous-time ELBO plus an auxiliary
cross-entropy. Student: the same U-Net plus a lambda path whose output layers start at zero (so it
starts equal to the teacher), fine-tuned with the Di4C losses of di4c_core (tauLDR variant,
docs/method.md (30)-(31)).

Embedded CPU demo (8x8 digits, 17 grey levels; teacher, student, control, metrics):
    python cifar10_gaussian.py --preset demo
Smoke test (seconds):              python cifar10_gaussian.py --preset smoke --out_dir /tmp/smoke
CIFAR-10, paper settings (GPU):    python cifar10_gaussian.py --data_dir data/cifar10 --download true
Multi-GPU / multi-process:         torchrun --standalone --nproc_per_node=8 cifar10_gaussian.py ...
Stages: --stage teacher | distill | sample | eval | all (each reads what earlier stages wrote).
"""
import argparse
import copy
import dataclasses
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
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import di4c_core as core
from eval import plot, results_table

# -----------------------------------------------------------------------------
# Config: defaults are the paper preset (tauLDR's CIFAR-10 settings); presets override a few


@dataclass
class Config:
    preset: str = "paper"          # paper | demo | smoke
    stage: str = "all"             # teacher | distill | sample | eval | all
    out_dir: str = "runs/cifar10"
    run_dir: str = ""              # read checkpoints and samples from here (default out_dir)
    # data
    dataset: str = "cifar10"       # cifar10 | folder (torchvision ImageFolder) | digits | photos
                                   # (embedded 8x8: digits, or patches of two photographs)
    data_dir: str = "data/cifar10"
    download: bool = False         # let torchvision download CIFAR-10 into data_dir
    image_size: int = 32           # folder datasets are resized to this
    flip: bool = True              # random horizontal flips (CIFAR-10; not for digits, which a
                                   # mirror turns into non-digits)
    S: int = 256                   # grey levels per channel
    # forward process (tauLDR, docs/method.md (4)-(5))
    rate_sigma: float = 6.0
    q_sigma: float = 512.0
    time_base: float = 3.0         # beta_bar(t) = time_base (time_exp^t - 1)
    time_exp: float = 100.0
    min_time: float = 0.01
    # network (tauLDR U-Net + the lambda path, docs/method.md (14))
    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_res: tuple = (16,)
    dropout: float = 0.1
    # teacher training
    teacher_ckpt: str = ""         # use this teacher instead of training one (ours or tauLDR format)
    student_ckpt: str = ""         # "" = out_dir/student.pt; or the authors' tldr-di4c.pt (tauLDR
                                   # format; sampled and scored beside the teacher, no distill)
    teacher_iters: int = 2000000
    teacher_batch: int = 128
    teacher_lr: float = 2e-4
    nll_weight: float = 0.001      # auxiliary cross-entropy weight of the tauLDR objective
    # (the demo weights the cross-entropy 100: on CPU budgets the one-jump ELBO alone is too noisy)
    # Di4C (tauLDR variant, docs/method.md (30)-(31))
    distil_iters: int = 320000
    batch_size: int = 8            # x_t per step (global); the network sees batch_size * L rows
    L: int = 16
    lr: float = 2e-4
    lam_lr_mult: float = 1.0       # learning-rate multiplier of the lambda path (zero-initialised)
    distil_weight: float = 1.0
    alpha_const: float = 1.0       # alpha(t) = alpha_const sigmoid(20 (t - 1/2))
    control_variate: bool = True
    control_iters: int = 0         # the teacher fine-tuned with its own loss: -1 = the Di4C run's
                                   # compute (control_steps), 0 = none, N = N steps
    # optimisation (AdamW without weight decay = Adam, grad clip 1)
    ema_decay: float = 0.9999
    micro_batch: int = 0           # rows per forward pass and GPU (gradient accumulation over
                                   # the rest of the global batch); 0 = the GPU's whole share
    dist_timeout: float = 60.0     # minutes a rank waits for the others in a collective
    compile: bool = False          # torch.compile the network in training
    count_flops: bool = False      # count the FLOPs of each training stage's first step
    # sampling / eval
    steps: tuple = (10, 20, 40)
    student_steps: tuple = (10, 20, 40)
    hybrid_teacher_steps: int = 3  # hybrid sampler: last NFEs by the teacher
    n_samples: int = 50000
    sample_batch: int = 50
    fid_backend: str = "pigm"      # pigm: pytorch-image-generation-metrics, the paper's package
                                   # (FID vs fid_stats, IS over 10 splits) | torch-fidelity
    fid_stats: str = ""            # pigm's reference npz (mu, sigma), e.g. its cifar10.train.npz;
                                   # "" = computed once from the training images (out_dir)
    # system
    seed: int = 0
    device: str = ""
    dtype: str = "float32"         # float32 | bfloat16 (autocast; draws stay float64)
    time_limit: float = 0.0        # hours of training per stage, then save and stop (0 = none)
    log_every: int = 100
    ckpt_every: int = 5000
    resume: bool = False           # continue every training stage from out_dir/<name>_state.pt


PRESETS = {
    "paper": {},
    # 8x8 patches of scikit-learn's two photographs (digits: --dataset digits): S = 17, D = 64;
    # why each value: docs/cifar10.md
    "demo": dict(dataset="photos", flip=False, S=17, rate_sigma=1.5, q_sigma=34.0, time_base=0.3, ch=32,
                 ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0.0, teacher_iters=1500,
                 teacher_batch=64, teacher_lr=1e-3, nll_weight=100.0, distil_iters=400,
                 batch_size=8, L=16, lr=2e-4, lam_lr_mult=10.0, ema_decay=0.99, control_iters=-1,
                 steps=(2, 4, 8, 16, 32), student_steps=(2, 4, 8), hybrid_teacher_steps=1,
                 n_samples=1000, sample_batch=500, log_every=100, ckpt_every=500,
                 out_dir="runs/cifar10_demo"),
    "smoke": dict(dataset="digits", flip=False, S=17, rate_sigma=1.5, q_sigma=34.0, time_base=0.3, ch=8,
                  ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0.0, teacher_iters=4,
                  teacher_batch=8, teacher_lr=1e-3, nll_weight=100.0, distil_iters=4,
                  batch_size=2, L=4, lr=1e-4, lam_lr_mult=10.0, ema_decay=0.9, control_iters=-1,
                  steps=(2, 4), student_steps=(2,), hybrid_teacher_steps=1, n_samples=16,
                  sample_batch=8, log_every=1, ckpt_every=2, out_dir="runs/cifar10_smoke"),
}
STAGES = ("teacher", "distill", "sample", "eval")
ARCH_KEYS = ("dataset", "S", "ch", "ch_mult", "num_res_blocks", "attn_res")
DATA_KEYS = ("flip", "image_size", "data_dir")
RESUME_KEYS = ARCH_KEYS + DATA_KEYS + ("L", "batch_size", "teacher_batch", "lr", "teacher_lr",
                           "seed")
RESUME_KEYS += ("rate_sigma", "q_sigma", "time_base", "time_exp", "min_time", "dropout",
                "nll_weight", "lam_lr_mult", "distil_weight", "alpha_const", "control_variate",
                "ema_decay")   # the objective
SAMPLE_KEYS = ("n_samples", "min_time", "seed")
CHOICES = {"stage": STAGES + ("all",), "dataset": ("cifar10", "folder", "digits", "photos"),
           "dtype": ("float32", "bfloat16"), "fid_backend": ("pigm", "torch-fidelity")}
EMBEDDED = ("digits", "photos")        # 8x8, 17 grey levels, scored by eval/digits.py
INF, TINY = float("inf"), 1e-12
LIMITS = {                             # (lo, hi), inclusive; check_config applies them
    "image_size": (4, INF), "S": (2, 256), "rate_sigma": (TINY, INF), "q_sigma": (TINY, INF),
    "time_base": (TINY, INF), "time_exp": (1 + 1e-6, INF), "min_time": (TINY, 0.5),
    "ch": (4, INF), "ch_mult": (1, INF), "num_res_blocks": (1, INF), "attn_res": (1, INF),
    "dropout": (0, 0.99), "teacher_iters": (1, INF), "teacher_batch": (1, INF),
    "teacher_lr": (TINY, 1), "nll_weight": (0, INF), "distil_iters": (1, INF),
    "batch_size": (1, INF), "L": (1, INF), "lr": (TINY, 1), "lam_lr_mult": (0, INF),
    "distil_weight": (0, INF), "alpha_const": (0, INF), "control_iters": (-1, INF),
    "ema_decay": (0, 1 - 1e-9), "steps": (1, INF), "student_steps": (1, INF),
    "hybrid_teacher_steps": (0, INF), "n_samples": (2, INF), "sample_batch": (1, INF),
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
# Data: uint8 images (N, C, H, W) with values in 0..S-1, held in memory


def load_images(cfg: Config) -> torch.Tensor:
    """CIFAR-10 (torchvision), an ImageFolder, or an embedded 8x8 set of 17 grey levels
    (eval/digits.py): the digits bundled with scikit-learn, or patches of its two photographs."""
    if cfg.dataset in EMBEDDED:
        from eval import digits
        x = digits.load_embedded(cfg.dataset)[0].to(torch.uint8)[:, None]      # (N, 1, 8, 8)
        return _requantise(x, 17, cfg.S)
    import torchvision
    if cfg.dataset == "cifar10":
        if cfg.download:
            torchvision.datasets.CIFAR10(cfg.data_dir, train=True, download=True)
        return _requantise(load_cifar10_batches(cfg.data_dir), 256, cfg.S)
    if cfg.dataset == "folder":
        if not os.path.isdir(cfg.data_dir):
            raise SystemExit(f"error: --data_dir {cfg.data_dir!r} is not a folder of class sub-folders")
        tf = torchvision.transforms.Compose([torchvision.transforms.Resize(cfg.image_size),
                                             torchvision.transforms.CenterCrop(cfg.image_size),
                                             torchvision.transforms.PILToTensor()])
        try:
            ds = torchvision.datasets.ImageFolder(cfg.data_dir, transform=tf, loader=read_image)
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"error: no images under --data_dir {cfg.data_dir!r} ({e})") from None
        try:
            x = torch.stack([ds[i][0][:3] for i in range(len(ds))])             # (N, C, H, W)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        return _requantise(x, 256, cfg.S)
    raise SystemExit(f"error: --dataset must be cifar10, folder, digits or photos, got {cfg.dataset!r}")


def read_image(path: str):
    """ImageFolder's loader: an RGB PIL image, or a ValueError that names the unreadable file."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot read image {path!r} ({type(e).__name__})") from None


def load_cifar10_batches(data_dir: str) -> torch.Tensor:
    """The CIFAR-10 training set from its python-pickle batches (data_batch_1..5): (N, 3, 32, 32) uint8."""
    import pickle
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    files = sorted(f for f in os.listdir(folder) if f.startswith("data_batch_")) if os.path.isdir(folder) else []
    if not files:
        raise SystemExit(f"error: no CIFAR-10 training batches under {folder!r}; pass --data_dir with the "
                         "folder that holds cifar-10-batches-py, or add --download true")
    parts = []
    for f in files:
        path = os.path.join(folder, f)
        try:
            with open(path, "rb") as fh:
                data = torch.as_tensor(pickle.load(fh, encoding="bytes")[b"data"],
                                       dtype=torch.uint8)
            parts.append(data.view(-1, 3, 32, 32))
        except Exception as e:
            raise SystemExit(f"error: {path!r} is not a CIFAR-10 python batch "
                             f"({type(e).__name__})") from None
    return torch.cat(parts).view(-1, 3, 32, 32)


def _requantise(x: torch.Tensor, levels: int, S: int) -> torch.Tensor:
    return x if levels == S else (x.long() * S // levels).to(torch.uint8)


def flip_batch(batch: tuple, g: torch.Generator, flip: bool = True) -> torch.Tensor:
    """A Batches item -> x0 (B, D) long, each image mirrored with probability 1/2 (from g, so
    independent of every later draw of the step) if `flip`."""
    x = batch[0].long()                                                          # (B, C, H, W)
    if not flip:
        return x.flatten(1)
    flip = torch.rand(len(x), generator=g, device=g.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x).flatten(1)


# -----------------------------------------------------------------------------
# Forward process: tauLDR's Gaussian-target rate matrix (docs/method.md (4))


def gaussian_rate_matrix(S: int, rate_sigma: float, q_sigma: float) -> tuple:
    """Jumps toward the centre, made reversible w.r.t. a discretised Gaussian pi. Returns (R, pi)."""
    k = torch.arange(S, dtype=torch.float64)
    log_pi = -((k + 1 - S / 2) ** 2) / (2 * q_sigma ** 2)
    R = torch.zeros(S, S, dtype=torch.float64)
    for i in range(S):
        if i < S / 2:
            j = torch.arange(i + 1, S - i)
            R[i, j] = torch.exp(-((j - i - 1).double() ** 2) / rate_sigma ** 2)
        elif i > S / 2:
            j = torch.arange(S - i, i)
            R[i, j] = torch.exp(-((i - j - 1).double() ** 2) / rate_sigma ** 2)
    i, j = torch.nonzero(R, as_tuple=True)
    R[j, i] = R[i, j] * torch.exp(log_pi[i] - log_pi[j])                         # detailed balance
    R -= torch.diag(R.sum(1))
    return R, log_pi.softmax(0)


def build_process(cfg: Config, device) -> core.CTMCProcess:
    R, pi = gaussian_rate_matrix(cfg.S, cfg.rate_sigma, cfg.q_sigma)
    beta_bar = lambda t: cfg.time_base * (cfg.time_exp ** t - 1)
    return core.CTMCProcess(R, beta_bar, pi).to(device)


# -----------------------------------------------------------------------------
# Network: tauLDR's CIFAR-10 U-Net x0-predictor (same function, our module names; a tauLDR
# checkpoint loads through `tauldr_to_ours`) with a logistic output head; optional lambda path


def sinusoid(x: torch.Tensor, dim: int) -> torch.Tensor:
    """sin/cos embedding of 1000 x (x = t or lambda in [0, 1]): (N,) -> (N, dim).
    Operation order as tauLDR's `transformer_timestep_embedding`, so the floats agree bit for bit."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=x.device) * -(math.log(10000) / (half - 1)))
    args = (1000 * x.float())[:, None] * freqs[None]                           # (N, half)
    return torch.cat([args.sin(), args.cos()], -1)


def norm(c: int) -> nn.GroupNorm:
    """tauLDR's GroupNorm: min(c // 4, 32) groups, eps 1e-6 (c must be a multiple of 4)."""
    return nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)


class ResBlock(nn.Module):
    """(skip(x) + conv(drop(act(norm(conv(act(norm(x))) + t_proj(temb) [+ lam_proj(lemb)]))))) / sqrt 2."""

    def __init__(self, cin, cout, emb, dropout, lam):
        super().__init__()
        self.n1, self.c1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.t_proj = nn.Linear(emb, cout)
        self.n2, self.drop, self.c2 = norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()    # tauLDR's NiN
        self.lam_proj = nn.Linear(emb, cout) if lam else None   # lambda path, zero at init
        if lam:
            nn.init.zeros_(self.lam_proj.weight), nn.init.zeros_(self.lam_proj.bias)

    def forward(self, x, temb, lemb):
        h = self.c1(F.silu(self.n1(x)))
        h = h + self.t_proj(F.silu(temb))[:, :, None, None]
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


class Down(nn.Module):
    """Halve H, W: pad one row/column at the bottom/right, then a 3x3 conv with stride 2 (tauLDR)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
    """Double H, W: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """x0-predictor: x_t (N, D) long -> logits (N, D, S), D = C H W (docs/method.md (14)).

    Computes the same function as tauLDR's `UNet` + `ImageX0PredBase` head (fix_logistic=False);
    `down`, `mid`, `up` hold the same blocks in the same order as tauLDR's downsampling, middle and
    upsampling module lists, so a tauLDR checkpoint maps onto it key by key (`tauldr_to_ours`).
    With lam (a Di4C student: lam_dim = 1; a product model: 0) it also takes lambda (N, 1): two
    embeddings of (lambda, t) (their sinusoids concatenated) -- the second also sees the
    bottleneck's spatial mean -- feed a zero-initialised `lam_proj` in every ResBlock, so the
    student is exactly the teacher at initialisation.
    """

    def __init__(self, C, H, S, ch, ch_mult, num_res_blocks, attn_res, dropout, lam=False):
        super().__init__()
        self.C, self.H, self.S, self.ch = C, H, S, ch
        self.lam, self.lam_dim = bool(lam), int(bool(lam))
        lam = self.lam
        emb = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(C, ch, 3, padding=1)
        self.down, chans, c, res = nn.ModuleList(), [ch], ch, H
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, ch * m, emb, dropout, lam))
                c = ch * m
                if res in attn_res:
                    self.down.append(Attention(c))
                chans.append(c)
            if i < len(ch_mult) - 1:
                self.down.append(Down(c))
                chans.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb, dropout, lam), Attention(c),
                                  ResBlock(c, c, emb, dropout, lam)])
        c_mid = c
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + chans.pop(), ch * m, emb, dropout, lam))
                c = ch * m
                if res in attn_res:
                    self.up.append(Attention(c))
            if i > 0:
                self.up.append(Up(c))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, 2 * C, 3, padding=1))
        if lam:                                                      # (lambda, t) sinusoids: 2 ch
            self.lam_emb_down = nn.Sequential(nn.Linear(2 * ch, ch), nn.SiLU(), nn.Linear(ch, emb),
                                              nn.SiLU(), nn.Linear(emb, emb))
            self.lam_emb_up = nn.Sequential(nn.Linear(2 * ch + c_mid, ch), nn.SiLU(),
                                            nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))

    def forward(self, x_t, t, lam=None, cond=None):
        N = x_t.shape[0]
        dt = self.conv_in.weight.dtype                                              # float32 unless .double()
        x = x_t.view(N, self.C, self.H, self.H).to(dt) / (self.S - 1) * 2 - 1       # (N, C, H, W)
        e_t = sinusoid(t, self.ch).to(dt)                                           # (N, ch)
        temb, lemb = self.temb(e_t), None
        if self.lam:
            e_lam = sinusoid(lam[:, 0], self.ch).to(dt)                             # (N, ch)
            lemb = self.lam_emb_down(torch.cat([e_lam, e_t], -1))
        h, skips = self.conv_in(x), []
        skips.append(h)
        for blk in self.down:
            h = blk(h) if isinstance(blk, Down) else blk(h, temb, lemb)
            if not isinstance(blk, Attention):
                skips.append(h)
            else:
                skips[-1] = h
        if self.lam:
            lemb = self.lam_emb_up(torch.cat([e_lam, e_t, h.mean((2, 3))], -1))    # + bottleneck
        for blk in self.mid:
            h = blk(h, temb, lemb)
        for blk in self.up:
            if isinstance(blk, ResBlock):
                h = blk(torch.cat([h, skips.pop()], 1), temb, lemb)
            else:
                h = blk(h)
        return logistic_logits(x, self.out(h), self.S)                             # (N, D, S)


def logistic_logits(x: torch.Tensor, raw: torch.Tensor, S: int) -> torch.Tensor:
    """Log-mass of a logistic(mu, s) over S equal bins of [-1, 1] (tauLDR's head).

    mu = tanh(x + raw_mu), s = exp(raw_log_scale - 2); log(sigma(r) - sigma(l)) as
    log sigma(r) + log1p(1e-6 - exp(log sigma(l) - log sigma(r))), tauLDR's fix_logistic=False form
    (far above mu both CDFs round to 1 and the bin gets log 1e-6; kept so logits equal tauLDR's).
    Args: x (N, C, H, W) in [-1, 1]; raw (N, 2C, H, W). Returns (N, C*H*W, S).
    """
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
    student = build_unet(cfg, teacher.C, teacher.H, lam=True)
    student = student.to(next(teacher.parameters()).device)
    try:
        return core.student_from_teacher(student, teacher.state_dict())
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# -----------------------------------------------------------------------------
# Teacher objective: tauLDR continuous-time ELBO (one-forward-pass form) + auxiliary CE


def teacher_loss(model, proc: core.CTMCProcess, x0: torch.Tensor, cfg: Config, g) -> torch.Tensor:
    """Per-image loss (B,). x~ is x_t with one forward jump; the network is evaluated at x~ only.

    neg-ELBO ~ sum_{x' != x~} R^_t(x~, x') - Z_t(x_t) log R^_t(x~, x_t) with the reverse rates
    R^_t(x, x'^d = b) = R_t(b, x^d) sum_a p^d(a | x) Q_{t|0}(a, b) / Q_{t|0}(a, x^d) (tauLDR Eq. for
    the CT-ELBO), plus nll_weight times the cross-entropy of p_{0|t}(x0 | x~).
    """
    B, D = x0.shape
    S = proc.S
    t = cfg.min_time + (1 - cfg.min_time) * torch.rand(B, generator=g, device=x0.device)
    x_t = proc.add_noise(x0, t, g)
    beta = cfg.time_base * math.log(cfg.time_exp) * cfg.time_exp ** t.double()    # (B,)
    R = proc.R
    out_rate = -R.diagonal()[x_t] * beta[:, None]                                   # (B, D)
    Z = out_rate.sum(1)                                                              # (B,)
    d_star = torch.multinomial(out_rate.float(), 1, generator=g)[:, 0]              # jumping dimension
    rows = R[x_t.gather(1, d_star[:, None])[:, 0]].clone()                          # (B, S)
    rows.scatter_(1, x_t.gather(1, d_star[:, None]), 0.0)
    new = torch.multinomial(rows.float(), 1, generator=g)[:, 0]
    x_tilde = x_t.clone()
    x_tilde[torch.arange(B), d_star] = new
    log_p0 = core.log_probs(model(x_tilde, t.float(), None))                         # (B, D, S)
    Q = proc.transition(t)                                                          # (B, S, S)
    idx = x_tilde[:, None, :].expand(B, S, D)
    ratio = log_p0.double().exp() / (Q.gather(2, idx).transpose(1, 2) + proc.eps + 1e-12)
    back = torch.bmm(ratio, Q) * (R.T[x_tilde] * beta[:, None, None])               # (B, D, S) R^(x~, b)
    back = back.scatter(2, x_tilde[..., None], 0.0)
    term1 = back.sum((1, 2))
    r_back = back[torch.arange(B), d_star, x_t.gather(1, d_star[:, None])[:, 0]]
    term2 = Z * torch.log(r_back + 1e-30)
    ce = -log_p0.gather(-1, x0[..., None]).squeeze(-1).mean(1)
    return ((term1 - term2) / D).float() + cfg.nll_weight * ce


def teacher_objective(cfg: Config, proc):
    """fit's loss_fn for the teacher and the control: the tauLDR loss of a (flipped) batch."""
    return lambda model, batch, g: (teacher_loss(model, proc, flip_batch(batch, g, cfg.flip),
                                                 cfg, g), {})


# -----------------------------------------------------------------------------
# Di4C step: the tauLDR variant (docs/method.md (30), (31)) on the core's losses


def di4c_step(student, student_raw, teacher_fns, proc, x0, cfg: Config, g):
    """delta ~ LogU[1e-3, 1e-2], t ~ U[min_time + delta, 1], u = t - delta; a separate x_tau
    at tau = min_time or U[min_time, min_time + 0.01]; alpha(t) = alpha_const sigmoid(20 (t -
    1/2)); distillation weight distil_weight. Returns (loss (B,), terms)."""
    B, dev = x0.shape[0], x0.device
    rand = lambda: torch.rand(B, generator=g, device=dev)
    delta = 10 ** (-3 + rand())
    t = cfg.min_time + delta + (1 - cfg.min_time - delta) * rand()
    u = t - delta
    tau = cfg.min_time + (rand() < 0.5).float() * rand() * 0.01
    x_t, x_tau = proc.add_noise(x0, t, g), proc.add_noise(x0, tau, g)
    weights = core.variant_weights("tauldr", t, alpha_const=cfg.alpha_const)
    weights["distil"] = weights["distil"] * cfg.distil_weight
    marginal, step = teacher_fns
    return core.di4c_loss(student, x0, x_t, t, u, weights=weights, teacher_marginal=marginal,
                          teacher_step=step, L=cfg.L, lam_dim=student_raw.lam_dim,
                          x_tau=x_tau, tau=tau, control_variate=cfg.control_variate, generator=g)


# -----------------------------------------------------------------------------
# Stages: teacher (tauLDR objective), distill (Di4C + control)


def stage_teacher(cfg: Config, ctx: Ctx, images: torch.Tensor, proc):
    """Train the tauLDR teacher from scratch (skipped when --teacher_ckpt is given)."""
    if cfg.teacher_ckpt:
        ctx.log(f"teacher: using --teacher_ckpt {cfg.teacher_ckpt}, nothing to train")
        return
    torch.manual_seed(cfg.seed)
    raw = build_unet(cfg, images.shape[1], images.shape[2], lam=False).to(ctx.device)
    data = Batches((images,), cfg, ctx, cfg.teacher_batch)
    ctx.log(f"teacher: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, "
            f"{len(images)} images {tuple(images.shape[1:])}, S = {cfg.S}")
    out = fit(cfg, ctx, "teacher", raw, teacher_objective(cfg, proc),
              data, cfg.teacher_iters, cfg.teacher_lr, cfg.teacher_batch,
              ema_decay=cfg.ema_decay)
    update_metrics(cfg, ctx, {"teacher": dict(iters=out["step"], train_seconds=out["wall"])})


def stage_distill(cfg: Config, ctx: Ctx, images: torch.Tensor, proc):
    """Di4C (tauLDR variant) from the teacher (a product tauLDR model, or a Di4C student for
    another round), then (with --control_iters) the control: the teacher fine-tuned with its
    own loss for the same compute (so a gain is Di4C's)."""
    C, H = images.shape[1], images.shape[2]
    teacher, t_state = load_net(cfg, "teacher", C, H, False, ctx.device)
    lam_T = t_state["lam_dim"]
    check_round(cfg, lam_T)
    parents = {"teacher": t_state["id"]}
    student = student_from_teacher(teacher, cfg).train()
    fns = core.make_teacher(teacher, proc.step, lam_T, cfg.L)
    data = Batches((images,), cfg, ctx, cfg.batch_size)
    ctx.log(f"distill: {'mixture (multi-round)' if lam_T else 'product'} teacher, "
            f"{cfg.batch_size} images x L = {cfg.L} lambdas per step")
    out = fit(cfg, ctx, "student", student,
              lambda model, batch, g: di4c_step(model, student, fns, proc,
                                                flip_batch(batch, g, cfg.flip), cfg, g),
              data, cfg.distil_iters, cfg.lr, cfg.batch_size, ema_decay=cfg.ema_decay,
              parents=parents)
    update_metrics(cfg, ctx, {"student": dict(iters=out["step"], train_seconds=out["wall"])})
    if cfg.control_iters == 0:
        return
    control = copy.deepcopy(teacher).train().requires_grad_(True)
    data = Batches((images,), cfg, ctx, cfg.teacher_batch)
    cout = fit(cfg, ctx, "control", control, teacher_objective(cfg, proc),
               data, control_steps(cfg), cfg.lr, cfg.teacher_batch, ema_decay=cfg.ema_decay,
               parents=parents)
    update_metrics(cfg, ctx, {"control": dict(iters=cout["step"], train_seconds=cout["wall"])})


def control_steps(cfg: Config) -> int:
    """The control's length: --control_iters, or for -1 the Di4C run's compute in network rows
    (a forward and its backward: 3 rows per row): the student on the B L rows of x_t and of
    x_tau with gradients, the target on B L rows and the teacher on 2 B without; a step of
    the teacher's own loss costs 3 rows per item."""
    if cfg.control_iters >= 0:
        return cfg.control_iters
    B, L = cfg.batch_size, cfg.L
    return math.ceil(cfg.distil_iters * (3 * 2 * B * L + B * L + 2 * B) / (3 * cfg.teacher_batch))


def load_net(cfg: Config, name: str, C: int, H: int, lam: bool, dev) -> tuple:
    """The finished network `{name}.pt` of this run (EMA weights), or the teacher from
    --teacher_ckpt / the student from --student_ckpt: ours, or tauLDR's layout (detected by its
    keys; its EMA weights; the Di4C authors' student too, see pretrained/tauldr.py). Every key
    must match (strict). Ours is built as its checkpoint says (with a lambda path or not): a
    Di4C student passed as --teacher_ckpt is a mixture teacher (multi-round, docs/method.md (35)).
    Returns (net in eval mode, state with "lam_dim")."""
    given = {"teacher": cfg.teacher_ckpt, "student": cfg.student_ckpt}.get(name, "")
    path = given or run_path(cfg, f"{name}.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path!r} not found: run --stage "
                         f"{'teacher' if name == 'teacher' else 'distill'} first (same --out_dir), "
                         "or pass --teacher_ckpt")
    net = build_unet(cfg, C, H, lam).to(dev)
    st = None
    if given:
        from pretrained import tauldr  # andrew-cr/tauLDR's checkpoint layout, recognised by keys
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"error: cannot read checkpoint {path!r} ({type(e).__name__})"
                             ) from None
        if tauldr.is_tauldr_checkpoint(st):
            try:
                sd = tauldr.check_and_convert(net, st["model"], path)
                st = {"ema": sd, "format": "tauLDR (EMA weights)", "id": weights_id(sd)}
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
        else:
            st = None
    if st is None:                     # ours: also refuse one written with another config
        st = load_checkpoint(path, asdict(cfg), ARCH_KEYS)
        weights = st["ema"] if st.get("ema") is not None else st["model"]
        st["lam_dim"] = int(any(core.is_lam_param(k) for k in weights))
        if st["lam_dim"] or lam:       # a student runs as it was trained (a teacher too: round 2)
            net = build_unet(cfg, C, H, bool(st["lam_dim"])).to(dev)
    else:
        st["lam_dim"] = int(lam)
    sd = st["ema"] if st.get("ema") is not None else st["model"]
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise SystemExit(f"error: {path!r} does not match this network ({str(e)[:300]})") from None
    return net.eval().requires_grad_(False), st


# -----------------------------------------------------------------------------
# Sampling and evaluation


@torch.no_grad()
def sample_images(net, lam_dim, proc, cfg: Config, n_steps: int, n: int, C: int, H: int, dev,
                  teacher=None, n_teacher: int = 0, seed: int = 0, teacher_lam_dim: int = 0) -> tuple:
    """docs/method.md (37): N NFEs on linspace(1, min_time, N), a fresh lambda per sample per
    step, the last NFE an argmax.
    Returns (images (n, C, H, H) uint8, NFE per sample)."""
    times = torch.linspace(1, cfg.min_time, n_steps)
    out, nfe = [], 0
    for i in range(0, n, cfg.sample_batch):
        b = min(cfg.sample_batch, n - i)
        g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i)
        x_T = proc.prior(b, C * H * H, g)
        x, nfe = core.ancestral_sample(proc, x_T, times, net, lam_dim=lam_dim, teacher=teacher,
                                       n_teacher=n_teacher, teacher_lam_dim=teacher_lam_dim,
                                       generator=g)
        out.append(x.view(b, C, H, H).to(torch.uint8).cpu())
    return torch.cat(out), nfe


def sampler_runs(cfg: Config) -> list:
    """(label, net name, steps, teacher NFEs) for every sample set of the eval table."""
    runs = [(f"teacher@{n}", "teacher", n, 0) for n in cfg.steps]
    runs += [(f"student@{n}", "student", n, 0) for n in cfg.student_steps]
    runs += [(f"hybrid@{n}", "student", n, cfg.hybrid_teacher_steps) for n in cfg.student_steps
             if n > cfg.hybrid_teacher_steps]
    if cfg.control_iters:
        runs += [(f"control@{n}", "control", n, 0) for n in cfg.student_steps]
    return runs


def load_nets(cfg: Config, C: int, H: int, dev) -> dict:
    """{name: (net, state)} of the teacher, the student and (if --control_iters) the control,
    each checked to descend from the current teacher."""
    names = ("teacher", "student", "control") if cfg.control_iters else ("teacher", "student")
    nets = {name: load_net(cfg, name, C, H, name == "student", dev) for name in names}
    for name in names[1:]:
        if name == "student" and cfg.student_ckpt:   # a released student records no parents
            continue
        check_lineage(run_path(cfg, f"{name}.pt"), nets[name][1],
                      {"teacher": nets["teacher"][1]["id"]})
    return nets


def sample_parents(nets: dict, name: str, n_teacher: int) -> dict:
    """The identities of the networks that draw a sample set (the teacher too in a hybrid)."""
    return {name: nets[name][1]["id"], **({"teacher": nets["teacher"][1]["id"]} if n_teacher
                                          else {})}


def stage_sample(cfg: Config, ctx: Ctx, images: torch.Tensor, proc):
    """Every sample set of sampler_runs, split over ranks -> out_dir/samples_<label>.pt (uint8
    images) and grid_<label>.png."""
    import torchvision
    C, H = images.shape[1], images.shape[2]
    nets, runs = load_nets(cfg, C, H, ctx.device), sampler_runs(cfg)
    bar = ctx.progress(len(runs), "sample", unit="set")
    for label, name, n_steps, n_teacher in runs:
        share = math.ceil(cfg.n_samples / ctx.world_size)
        lo, hi = ctx.rank * share, min(cfg.n_samples, (ctx.rank + 1) * share)
        x, nfe = sample_images(nets[name][0], nets[name][1]["lam_dim"], proc, cfg, n_steps,
                               hi - lo, C, H, ctx.device, teacher=nets["teacher"][0],
                               n_teacher=n_teacher, seed=cfg.seed + lo,
                               teacher_lam_dim=nets["teacher"][1]["lam_dim"])
        part = os.path.join(cfg.out_dir, f"samples_{label}_rank{ctx.rank}.pt")
        torch.save(x, part)
        ctx.barrier()
        if ctx.rank == 0:
            parts = [os.path.join(cfg.out_dir, f"samples_{label}_rank{r}.pt")
                     for r in range(ctx.world_size)]
            allx = torch.cat([torch.load(f, weights_only=True) for f in parts])
            save_checkpoint(os.path.join(cfg.out_dir, f"samples_{label}.pt"),
                            {"images": allx, "nfe": nfe, "steps": n_steps, "model": name,
                             "config": asdict(cfg), "parents": sample_parents(nets, name,
                                                                              n_teacher)})
            for f in parts:
                os.remove(f)
            torchvision.utils.save_image(allx[:256].float() / (cfg.S - 1),
                                         os.path.join(cfg.out_dir, f"grid_{label}.png"), nrow=16)
            ctx.log(f"sample: {label}: {len(allx)} images, {nfe} NFE")
        ctx.barrier()
        bar.update(1)
    bar.close()


@torch.no_grad()
def latency(net, lam_dim, proc, cfg, n_steps, C, H, dev, repeats=5) -> list:
    """Seconds per sampler call on a batch of sample_batch images, after one warm-up call."""
    times = []
    for r in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample_images(net, lam_dim, proc, cfg, n_steps, cfg.sample_batch, C, H, dev, seed=r)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[1:]


def stage_eval(cfg: Config, ctx: Ctx, images: torch.Tensor, proc):
    """Fréchet distance of the 8x8 classifier's features (digits, photos) or FID/IS (Inception) for every
    sample set, student vs teacher latency; metrics.json, quality_vs_steps.png, the table."""
    if ctx.rank != 0:
        return ctx.barrier()
    C, H = images.shape[1], images.shape[2]
    nets = load_nets(cfg, C, H, ctx.device)
    paths = {label: run_path(cfg, f"samples_{label}.pt") for label, *_ in
             sampler_runs(cfg)}
    sets = {}
    for (label, path), (_, name, _, n_teacher) in zip(paths.items(), sampler_runs(cfg)):
        if not os.path.exists(path):
            raise SystemExit(f"error: {path!r} not found: run --stage sample first")
        sets[label] = load_checkpoint(path, asdict(cfg), SAMPLE_KEYS)
        check_lineage(path, sets[label], sample_parents(nets, name, n_teacher))
    res = {}
    if cfg.dataset in EMBEDDED:
        from eval import digits
        clf = digits.load_or_train_classifier(
            os.path.join(cfg.out_dir, f"{cfg.dataset}_classifier.pt"), data=cfg.dataset)
        real = _requantise(images, cfg.S, 17)
    else:
        from eval import inception
    bar = ctx.progress(len(sets), "eval", unit="set")
    for label, s in sets.items():
        bar.update(1)
        if cfg.dataset in EMBEDDED:
            score = {"frechet": digits.digits_frechet(clf, _requantise(s["images"], cfg.S, 17),
                                                      real)}
        elif cfg.fid_backend == "pigm":
            score = inception.pigm_fid_is(as_uint8(s["images"], cfg.S), pigm_reference(cfg, images))
        else:
            score = inception.fid_is(as_uint8(s["images"], cfg.S), reference=images)
        res[label] = {**score, "nfe": s["nfe"], "steps": s["steps"]}
    bar.close()
    lat = {}
    for n in cfg.student_steps:
        t_s, s_s = (latency(nets[k][0], nets[k][1]["lam_dim"], proc, cfg, n, C, H, ctx.device)
                    for k in ("teacher", "student"))
        mean = lambda v: sum(v) / len(v)
        lat[str(n)] = dict(teacher_s=mean(t_s), student_s=mean(s_s),
                           overhead_pct=100 * (mean(s_s) / mean(t_s) - 1))
    key = "frechet" if cfg.dataset in EMBEDDED else "fid"
    rows = [dict(model=label.split("@")[0], **r) for label, r in res.items()]
    update_metrics(cfg, ctx, {"eval": res, "latency": lat, "results": rows, "primary": key,
                              "speedup": results_table.speedups(rows, key)})
    plot.plot_quality(cfg.out_dir, f"{os.path.basename(__file__)} --preset {cfg.preset}",
                      rows, key)
    print_table(res, lat, key)
    ctx.barrier()


def as_uint8(x: torch.Tensor, S: int) -> torch.Tensor:
    """Pixel levels 0..S-1 (N, C, H, W) -> uint8 0..255 (S = 256: unchanged)."""
    return (x.long() * 256 // S).to(torch.uint8)


def pigm_reference(cfg: Config, images: torch.Tensor) -> str:
    """--fid_stats, or pytorch-image-generation-metrics' statistics of the training images,
    computed once to out_dir/fid_stats_pigm.npz (what its fid_ref tool writes)."""
    if cfg.fid_stats:
        return cfg.fid_stats
    from eval import inception
    path = os.path.join(cfg.out_dir, "fid_stats_pigm.npz")
    if not os.path.exists(path):
        inception.pigm_stats(as_uint8(images, cfg.S), path)
    return path


def print_table(res: dict, lat: dict, key: str):
    """The eval table, latency, and a RESULT line per student step count."""
    print(f"\n{'sampler':<14}{'NFE':>5}{key:>10}")
    for label in sorted(res, key=lambda k: (k.split("@")[0], res[k]["steps"])):
        print(f"{label:<14}{res[label]['nfe']:>5}{res[label][key]:>10.3f}")
    for n, v in lat.items():
        print(f"latency @{n} NFE: teacher {v['teacher_s']:.3f} s, student {v['student_s']:.3f} s "
              f"({v['overhead_pct']:+.1f}%)")
    for label in sorted(res):
        if label.startswith("student@") and label.replace("student", "teacher") in res:
            t = res[label.replace("student", "teacher")]
            print(f"RESULT {label} {key}={res[label][key]:.3f} teacher {key}={t[key]:.3f}")


# -----------------------------------------------------------------------------
# Main: teacher -> distill (+ control) -> sample -> eval


def run_needs(cfg: Config) -> list:
    """What the stages of this run need beyond the config, checked before any work (preflight):
    a given teacher checkpoint, and the FID / IS package (and --fid_stats) unless the data are
    embedded (digits, photos)."""
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    needs = checkpoint_needs(cfg, stages)
    if "eval" in stages and cfg.dataset not in EMBEDDED:
        needs += package_needs({"pigm": {"pytorch_image_generation_metrics": (
            "pytorch-image-generation-metrics", "FID / IS with --fid_backend pigm (stage eval)")},
            "torch-fidelity": {"torch_fidelity": ("torch-fidelity", "FID / IS (stage eval)")}}
            [cfg.fid_backend])
        if cfg.fid_stats and not os.path.exists(cfg.fid_stats):
            needs.append((f"--fid_stats {cfg.fid_stats!r} does not exist", "download "
                          "pytorch-image-generation-metrics' cifar10.train.npz (docs/cifar10.md) "
                          "or drop --fid_stats to compute it from the training images"))
    return needs


def main(cfg: Config):
    check_config(cfg)
    if cfg.ch % 4:
        raise SystemExit(f"error: --ch must be a multiple of 4 (GroupNorm), got {cfg.ch}")
    preflight(run_needs(cfg))
    rank, world_size, device = setup_dist(cfg.device, cfg.dist_timeout)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ctx = Ctx(rank, world_size, device, Logger(rank, cfg.out_dir), cfg.dtype)
    ctx.log(f"cifar10_gaussian.py | torch {torch.__version__} | python "
            f"{platform.python_version()} | device {device} | world size {world_size}")
    ctx.log("config " + json.dumps(asdict(cfg)))
    torch.manual_seed(cfg.seed)
    images = load_images(cfg)                                                   # (N, C, H, W)
    proc = build_process(cfg, device)
    run = {"teacher": stage_teacher, "distill": stage_distill, "sample": stage_sample,
           "eval": stage_eval}
    walls, t_start = {}, time.time()
    for name in STAGES if cfg.stage == "all" else (cfg.stage,):
        t0 = time.time()
        run[name](cfg, ctx, images, proc)
        walls[name] = time.time() - t0
        ctx.log(f"stage {name} done in {walls[name]:.1f} s")
    walls["total"] = time.time() - t_start
    update_metrics(cfg, ctx, {"wall_seconds": walls})
    cleanup(ctx)


if __name__ == "__main__":
    main(parse_config(Config))
