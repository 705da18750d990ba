"""
Di4C on a masked diffusion language model (Sec. 5.3 of arXiv:2410.08709; teacher = MDLM/SDTT).

An MDLM teacher (DiT-style bidirectional transformer, SUBS parameterisation, log-linear
schedule) is trained from scratch with its NELBO, then distilled into a Di4C mixture student
(the same network plus a lambda input) with the core's losses in the SDTT variant (docs/method.md
(30), (33)). Samples come from the ancestral sampler (docs/method.md (37)) with float64
categorical draws; they are scored by generative perplexity under a judge LM, unigram entropy
and prefix-conditional self-BLEU (eval/text_metrics.py).

1 GPU:          python owt_masked.py                      (paper preset: OpenWebText, GPT-2 BPE)
8 GPUs:         torchrun --standalone --nproc_per_node=8 owt_masked.py
CPU demo:       python owt_masked.py --preset demo
CPU smoke test: python owt_masked.py --preset smoke
2-proc CPU:     torchrun --standalone --nproc_per_node=2 owt_masked.py --preset smoke ...
Stages:         --stage teacher | distill | sample | eval | all   (each reads what the
                previous ones wrote in --out_dir); --resume true continues a stage exactly.
"""
import argparse
import copy
import dataclasses
import glob
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
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import di4c_core as core
from eval import plot, results_table, text_metrics

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
    # data
    dataset: str = "Skylion007/openwebtext"  # HF hub dataset (parquet), or offline: "pydoc"
                                   # (CPython's documentation) | "stdlib" (its docstrings)
    data_files: str = ""           # comma-separated local .txt/.json(l)/.parquet globs
    tokenizer_file: str = "assets/gpt2.tiktoken"  # GPT-2 BPE ranks (relative: to this file)
    cache_dir: str = ""            # token cache (np.memmap); "" = out_dir/data
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
    teacher_lr: float = 3e-4
    ema: float = 0.9999            # teacher EMA; the teacher samples with it (MDLM)
    teacher_cosine: bool = False   # cosine decay of the teacher LR to 0 after warm-up (demo)
    # di4c (SDTT variant, docs/method.md (30), (33))
    distil_iters: int = 50_000
    distil_batch: int = 2          # global sequences per Di4C step, each with L lambdas
    lr: float = 3e-5               # Di4C and control fine-tuning, constant after warm-up
    lam_lr_mult: float = 1.0       # learning-rate multiplier of the lambda path (zero-initialised)
    lam_inject: str = "adaln"      # how the student sees lambda: adaln (ours, student = teacher
                                   # at init) | token (the authors' released SDTT students)
    warmup: int = 2500
    L: int = 16                    # lambda-samples per x_t
    delta: float = 0.02            # distillation region t < delta
    distil_prob: float = 0.3       # probability of drawing t in [0, delta)
    T: int = 1024                  # SDTT time grid {k / T}
    alpha_const: float = 0.1       # alpha(t) = 0.1 sigmoid(20 (t - 1/2))
    teacher_ckpt: str = SDTT7      # the paper's teacher, SDTT round 7 (download: SDTT7_GET);
                                   # "" = train MDLM from scratch into out_dir/teacher.pt; a
                                   # student.pt -> multi-round; or any released MDLM / SDTT /
                                   # Di4C-SDTT .ckpt / .safetensors
    student_ckpt: str = ""         # "" = out_dir/student.pt; or a released Di4C-SDTT student
                                   # (sampled and scored beside the teacher; no distill stage)
    control_iters: int = -1        # the teacher fine-tuned with its MDLM loss: -1 = the Di4C
                                   # run's compute (control_steps), 0 = none, N = N steps
    student_ema: float = 0.0       # EMA of the student and the control (sampled with it if > 0)
    # sampling and evaluation (docs/method.md (37); MDLM's gen-PPL protocol)
    steps: tuple = (8, 16, 32, 64, 128, 256, 512, 1024)  # teacher step counts
    student_steps: tuple = (8, 16, 32, 64)               # student and control step counts
    n_samples: int = 1024
    sample_batch: int = 16
    sampler: str = "ours"          # ours (docs/method.md (37), float64 draws) | sdtt (SDTT's and the
                                   # authors' ancestral sampler step for step: float32 draws from
                                   # torch's global RNG, log-linear move chances, argmax denoise)
    prefix_len: int = 50
    cont_len: int = 50             # prefix-conditional samples have prefix_len + cont_len
    n_prefix: int = 256
    n_cont: int = 5
    judge: str = "gpt2-large"      # gen-PPL judge: gpt2-large (the papers'; MDLM's retokenised
                                   # and SDTT's id protocols) | trained (an AR DiT trained here,
                                   # offline) | both
    mauve: bool = False            # MAUVE of prefix-conditional continuations vs the real ones
                                   # (needs mauve-text and the GPT-2 Large weights)
    latency_runs: int = 5
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
    ckpt_every: int = 5000


PRESETS = {
    "paper": {},
    # CPython's bundled docs, exact GPT-2 BPE, remapped ids; why each value: docs/owt.md
    "demo": dict(out_dir="runs/owt_demo", dataset="pydoc", teacher_ckpt="", seq_len=32, val_docs=8,
                 remap_vocab=True, n_layer=4, n_embd=128, n_head=4, cond_dim=64,
                 teacher_iters=4000, judge_iters=600, batch_size=32, teacher_lr=1e-3,
                 teacher_cosine=True, ema=0.995, student_ema=0.99, distil_iters=400,
                 distil_batch=4, lr=1e-4, lam_lr_mult=10.0, warmup=20, L=8, T=32, delta=0.047,
                 steps=(4, 8, 16, 32, 64), student_steps=(4, 8, 16), n_samples=256,
                 sample_batch=128, prefix_len=8, cont_len=24, n_prefix=24, n_cont=5,
                 latency_runs=3, dtype="float32", log_every=50, ckpt_every=500, judge="trained"),
    # seconds, for tests
    "smoke": dict(out_dir="runs/owt_smoke", dataset="pydoc", teacher_ckpt="", seq_len=32, val_docs=4,
                  remap_vocab=True, n_layer=1, n_embd=32, n_head=2, cond_dim=16,
                  dropout=0.0, teacher_iters=4, judge_iters=4, batch_size=8,
                  teacher_lr=1e-3, ema=0.9, distil_iters=3, distil_batch=2, lr=1e-4,
                  warmup=2, L=4, control_iters=2, steps=(2, 4), student_steps=(2,),
                  n_samples=4, sample_batch=4, prefix_len=8, cont_len=24, n_prefix=2,
                  n_cont=2, latency_runs=1, dtype="float32", log_every=1, ckpt_every=2,
                  judge="trained"),
}
STAGES = ("teacher", "distill", "sample", "eval")
ARCH_KEYS = ("n_layer", "n_embd", "n_head", "cond_dim", "remap_vocab", "dataset",
             "data_files")
RESUME_KEYS = ARCH_KEYS + ("seq_len", "batch_size", "distil_batch", "L", "lr",
                           "teacher_lr", "warmup", "seed")
RESUME_KEYS += ("dropout", "ema", "teacher_cosine", "lam_lr_mult", "lam_inject", "delta",
                "distil_prob", "T", "alpha_const", "student_ema")   # the objective
SAMPLE_KEYS = ("seq_len", "n_samples", "prefix_len", "cont_len", "n_prefix", "n_cont", "seed",
               "dtype", "sampler")
CHOICES = {"stage": STAGES + ("all",), "dtype": ("float32", "bfloat16"),
           "lam_inject": ("adaln", "token"), "judge": ("gpt2-large", "trained", "both"),
           "sampler": ("ours", "sdtt")}
INF, TINY = float("inf"), 1e-12
LIMITS = {                             # (lo, hi), inclusive; check_config applies them
    "seq_len": (2, INF), "val_docs": (1, INF), "n_layer": (1, INF), "n_embd": (1, INF),
    "n_head": (1, INF), "cond_dim": (1, INF), "dropout": (0, 0.99), "teacher_iters": (1, INF),
    "judge_iters": (1, INF), "batch_size": (1, INF), "teacher_lr": (TINY, 1),
    "ema": (0, 1 - 1e-9), "distil_iters": (1, INF), "distil_batch": (1, INF), "lr": (TINY, 1),
    "lam_lr_mult": (0, INF), "warmup": (0, INF), "L": (1, INF), "delta": (TINY, 0.999),
    "distil_prob": (0, 1), "T": (1, INF), "alpha_const": (0, INF), "control_iters": (-1, INF),
    "student_ema": (0, 1 - 1e-9), "steps": (1, INF), "student_steps": (1, INF),
    "n_samples": (1, INF), "sample_batch": (1, INF), "prefix_len": (1, INF),
    "cont_len": (1, INF), "n_prefix": (1, INF), "n_cont": (2, INF), "latency_runs": (1, INF),
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
# Tokenizer: GPT-2 BPE through tiktoken, offline from a local rank file

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50256                        # <|endoftext|>, joins documents
N_GPT2 = 50257
UNK_WARN = 0.05                    # warn when more validation tokens than this are unknown


def gpt2_encoding(tokenizer_file: str):
    """The exact GPT-2 encoding from a local 50257-line rank file (offline; the repo ships one in
    assets/, a relative path is taken from this script's folder)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), tokenizer_file)
    if not os.path.isfile(path):
        raise SystemExit(f"error: --tokenizer_file {tokenizer_file!r} not found")
    try:
        ranks = load_tiktoken_bpe(path)
    except Exception as e:
        raise SystemExit(f"error: --tokenizer_file {path!r} is not a tiktoken rank file "
                         f"({type(e).__name__})") from None
    if len(ranks) != EOT:
        raise SystemExit(f"error: {path!r} has {len(ranks)} ranks, GPT-2 has {EOT}")
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


# -----------------------------------------------------------------------------
# Data: documents -> GPT-2 ids joined by <|endoftext|> -> cached memmap -> blocks of D


OWT_EXPORT = ("python -m venv /tmp/owt_export && /tmp/owt_export/bin/pip install 'datasets<4' "
              "&& mkdir -p owt && /tmp/owt_export/bin/python -c \"import datasets; "
              "ds = datasets.load_dataset('{name}', split='train', trust_remote_code=True); "
              "[ds.shard(64, i, contiguous=True).to_parquet(f'owt/owt-{{i:05d}}.parquet') "
              "for i in range(64)]\"")


def data_files(cfg: Config) -> list:
    """The files that --data_files (comma-separated globs) matches, sorted, each once."""
    return sorted({f for pat in cfg.data_files.split(",") if pat.strip()
                   for f in glob.glob(os.path.expanduser(pat.strip()))})


def load_documents(cfg: Config):
    """A `datasets.Dataset` with a "text" column, from local files, pydoc_data or the HF hub.

    Paper preset: `Skylion007/openwebtext` from the hub. That repository is a loading script,
    which datasets >= 4 refuses; then the error gives OWT_EXPORT, the one-off command that
    writes the corpus as parquet shards in document order (for --data_files; the last
    --val_docs documents are MDLM's validation split), see docs/owt.md.
    """
    import datasets
    if cfg.data_files:
        files = data_files(cfg)
        if not files:
            raise SystemExit(f"error: --data_files {cfg.data_files!r} matched no file")
        builders = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
        kinds = {builders.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise SystemExit(f"error: --data_files must all be one of {sorted(builders)}")
        kind = kinds.pop()
        extra = {"sample_by": "document"} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train", **extra)
        except Exception as e:
            last = (str(e).strip().splitlines() or [""])[-1][:200]
            raise SystemExit(f"error: could not read --data_files {cfg.data_files!r} as {kind} "
                             f"({type(e).__name__}: {last})") from None
    elif cfg.dataset == "pydoc":
        import pydoc_data.topics
        topics = pydoc_data.topics.topics
        ds = datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
    elif cfg.dataset == "stdlib":
        ds = datasets.Dataset.from_dict({"text": stdlib_docstrings()})
    else:
        try:
            ds = datasets.load_dataset(cfg.dataset, split="train")
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise SystemExit(f"error: could not load dataset {cfg.dataset!r} "
                             f"({type(e).__name__}: {first}); write it as local parquet shards "
                             f"once and pass --data_files 'owt/*.parquet': "
                             + OWT_EXPORT.format(name=cfg.dataset)) from None
    if "text" not in ds.column_names:
        raise SystemExit(f"error: the corpus has no 'text' column (columns: {ds.column_names})")
    if len(ds) <= cfg.val_docs:
        raise SystemExit(f"error: the corpus has {len(ds)} documents, need more than "
                         f"--val_docs {cfg.val_docs}")
    return ds


def stdlib_docstrings() -> list:
    """The second offline corpus (no preset was tuned on it): one document per module of the
    Python standard library this interpreter ships (top level and one package level down, no
    tests, idlelib, lib2to3 or site-packages), sorted by path: the module's docstring and those
    of its classes and functions (ast.walk order), joined by blank lines; modules without any,
    or that do not parse, are left out. CPython 3.11: 456 documents, 1.55M characters."""
    import ast
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    docs = []
    for f in files:
        if set(os.path.relpath(f, root).split(os.sep)[:-1]) & skip:
            continue
        try:
            tree = ast.parse(open(f, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
            n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in map(ast.get_docstring, nodes) if d)
        if text:
            docs.append(text)
    return docs


def token_cache(cfg: Config, ctx: Ctx, enc) -> dict:
    """Tokenise once into out_dir/data (or --cache_dir): {split: np.memmap uint16}.

    Documents [0, n - val_docs) form the training split, the last val_docs the validation
    split; each document is followed by <|endoftext|>. Rank 0 writes, the others wait.
    """
    cache = cfg.cache_dir or run_path(cfg, "data")           # a --run_dir's cache is reused
    if not os.path.isdir(cache):
        cache = os.path.join(cfg.out_dir, "data")
    src = cfg.data_files or cfg.dataset
    tag = "".join(c if c.isalnum() else "_" for c in src)[-60:] + f"_v{cfg.val_docs}"
    paths = {s: os.path.join(cache, f"{tag}_{s}.bin") for s in ("train", "val")}
    if ctx.rank == 0 and not all(os.path.exists(p) for p in paths.values()):
        os.makedirs(cache, exist_ok=True)
        ds = load_documents(cfg)
        n = len(ds)
        for split, (lo, hi) in (("train", (0, n - cfg.val_docs)), ("val", (n - cfg.val_docs, n))):
            tmp = paths[split] + f".tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                for i in range(lo, hi, 4096):
                    docs = enc.encode_ordinary_batch(ds[i:min(i + 4096, hi)]["text"])
                    ids = np.fromiter((t for d in docs for t in d + [EOT]), dtype=np.uint16)
                    f.write(ids.tobytes())
            os.replace(tmp, paths[split])
        ctx.log(f"tokenised {n} documents from {src!r} into {cache}")
    ctx.barrier()
    return {s: np.memmap(p, dtype=np.uint16, mode="r") for s, p in paths.items()}


class Corpus:
    """Blocks of D token ids (vocabulary ids of the model) plus encode/decode.

    remap_vocab: model ids are the GPT-2 ids seen in the training split (sorted), then UNK,
    then [MASK]; GPT-2 tokenisation is unchanged (docs/owt.md: the 50258-wide head is
    ~25x slower on CPU). Otherwise model ids are GPT-2 ids and [MASK] = 50257. S counts [MASK].
    """

    def __init__(self, cfg: Config, ctx: Ctx):
        self.enc = gpt2_encoding(cfg.tokenizer_file)
        self.D, self.device = cfg.seq_len, ctx.device
        ids = token_cache(cfg, ctx, self.enc)
        if cfg.remap_vocab:
            self.to_gpt2 = np.unique(ids["train"]).astype(np.int64)         # (V,)
            self.unk = len(self.to_gpt2)
            self.to_local = np.full(N_GPT2, self.unk, dtype=np.int64)
            self.to_local[self.to_gpt2] = np.arange(self.unk)
            self.S = self.unk + 2
            unknown = 1 - np.isin(ids["val"][:10 ** 7], self.to_gpt2).mean()  # first 10M tokens
            ctx.log(f"data: {100 * unknown:.2f}% of validation tokens are unknown to the "
                    "training vocabulary (UNK)")
            if unknown > UNK_WARN:
                ctx.log(f"warning: {100 * unknown:.1f}% unknown validation tokens (over "
                        f"{100 * UNK_WARN:.0f}%): the validation text is unlike the training text")
        else:
            self.to_gpt2, self.unk, self.to_local = None, None, None
            self.S = N_GPT2 + 1
        self.mask_id = self.S - 1
        self.blocks = {}
        for split, arr in ids.items():
            n = len(arr) // self.D
            if n == 0:
                raise SystemExit(f"error: the {split} split has {len(arr)} tokens, fewer than "
                                 f"one block of --seq_len {self.D}")
            self.blocks[split] = arr[:n * self.D].reshape(n, self.D)          # (n, D) memmap

    def n_blocks(self, split: str) -> int:
        return self.blocks[split].shape[0]

    def get(self, split: str, idx) -> torch.Tensor:
        """Blocks idx of a split as model ids: (len(idx), D) long on the device."""
        x = self.blocks[split][np.sort(np.asarray(idx))].astype(np.int64)
        if self.to_local is not None:
            x = self.to_local[x]
        return torch.from_numpy(x).to(self.device)

    def batch(self, B: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(self.n_blocks("train"), (B,), generator=g, device=g.device)
        return self.get("train", idx.cpu().numpy())                           # (B, D)

    def gpt2_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Model ids -> GPT-2 ids (UNK -> <|endoftext|>) for GPT-2 Large scoring."""
        if self.to_gpt2 is None:
            return x
        table = torch.from_numpy(np.append(self.to_gpt2, EOT))
        return table[x.cpu().clamp_max(self.unk)]

    def decode(self, row) -> str:
        out, run = [], []
        for i in row:
            if self.to_gpt2 is not None and i >= self.unk:
                out.append(self.enc.decode(run) + ("<unk>" if i == self.unk else "<mask>"))
                run = []
            else:
                run.append(int(self.to_gpt2[i]) if self.to_gpt2 is not None else int(i))
        return "".join(out) + self.enc.decode([i for i in run if i < N_GPT2])


# -----------------------------------------------------------------------------
# Model: MDLM's DiT (rotary attention, adaLN, SUBS output; arXiv 2406.07524), module for module

NEG = -1e6                                 # SUBS "impossible" logit


def rotary(D: int, head_dim: int, device, n_extra: int = 0) -> tuple:
    """cos, sin tables (D + n_extra, head_dim / 2) of rotary position embeddings; the n_extra
    last rows (cos 1, sin 0) leave appended tokens unrotated (the authors' lambda token)."""
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    ang = torch.arange(D, device=device).float()[:, None] * inv[None]       # (D, hd/2)
    cos, sin = ang.cos(), ang.sin()
    if n_extra:
        cos = torch.cat([cos, cos.new_ones(n_extra, cos.shape[1])])
        sin = torch.cat([sin, sin.new_zeros(n_extra, sin.shape[1])])
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)                                              # (N, H, D, hd/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).type_as(x)


def sinusoid(v: torch.Tensor, dim: int = 128) -> torch.Tensor:
    """Transformer timestep embedding of 1000 v: half sin, half cos. v (N, k) -> (N, k dim)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=v.device) / (dim // 2 - 1))
    ang = 1000 * v[..., None].float() * freqs                                # (N, k, dim/2)
    return torch.cat([ang.sin(), ang.cos()], -1).flatten(1)


class SigmaMap(nn.Module):
    """MDLM's noise-level embedding: cos/sin features of sigma (frequencies 10000^(-i/128)),
    then Linear -> SiLU -> Linear. sigma (N,) -> (N, cond_dim)."""

    def __init__(self, cond_dim: int, n_freq: int = 256):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma):
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device) / half)
        ang = sigma[:, None].float() * freqs                                  # (N, half)
        return self.mlp(torch.cat([ang.cos(), ang.sin()], -1))


class VocabEmbed(nn.Module):
    """Token embedding table (S, E) under MDLM's parameter name. F.embedding, not MDLM's
    `embedding[x]`: the same values, but the backward of indexing accumulates repeated ids in
    a varying order on CPU, so training would not repeat bit for bit."""

    def __init__(self, S: int, E: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(S, E))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x):
        return F.embedding(x, self.embedding)


class Block(nn.Module):
    """Pre-LN transformer block; LayerNorm outputs (weight, no bias) are modulated and the
    branches gated by c (adaLN-Zero). MDLM's DDiTBlock: no dropout inside attention."""

    def __init__(self, E: int, H: int, cond_dim: int, dropout: float, causal: bool):
        super().__init__()
        self.H, self.causal = H, causal
        self.norm1 = nn.LayerNorm(E, bias=False)
        self.attn_qkv = nn.Linear(E, 3 * E, bias=False)
        self.attn_out = nn.Linear(E, E, bias=False)
        self.norm2 = nn.LayerNorm(E, bias=False)
        self.mlp = nn.Sequential(nn.Linear(E, 4 * E), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * E, E))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * E)
        nn.init.zeros_(self.adaLN_modulation.weight), nn.init.zeros_(self.adaLN_modulation.bias)
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


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then the vocabulary projection (zero-initialised, as MDLM)."""

    def __init__(self, E: int, S: int, cond_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(E, bias=False)
        self.linear = nn.Linear(E, S)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * E)
        for lin in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)

    def modulate(self, h, c):
        sh, sc = self.adaLN_modulation(c)[:, None].chunk(2, -1)
        return self.norm_final(h) * (1 + sc) + sh                             # (N, D, E)


LAM_INJECT = CHOICES["lam_inject"]


class DiT(nn.Module):
    """denoiser(x_t (N, D) long, t (N,), lam (N, 1) | None) -> SUBS logits (N, D, S).

    MDLM's DiT with MDLM's parameter names (vocab_embed, sigma_map, blocks.i.{norm1, attn_qkv,
    attn_out, norm2, mlp, adaLN_modulation}, output_layer), so that MDLM and SDTT checkpoints
    load by name (pretrained/mdlm.py). No time input: as MDLM-OWT and SDTT (time_conditioning
    False) the condition is c = SiLU(sigma_map(0)), so the sampler may reuse an unchanged
    input's output.
    lam_dim is 0 (a product teacher) or 1 (a student: lambda ~ U[0, 1], the paper's). The
    student sees lambda in one of two ways (lam_inject):
    "adaln" (ours, the default): sinusoid(1000 lam) -> Linear(128, 512) -> GELU ->
      Linear(512, cond_dim), last layer zero-initialised, added to sigma_map's output: at init
      the student is the teacher exactly (docs/method.md (14)).
    "token" (the authors' SDTT student): sinusoid(1000 lam) -> Linear(128, 512) -> GELU ->
      Linear(512, E) is appended to the sequence as one more token, without rotary, and its
      output is dropped. A token changes every attention normaliser, so the student cannot
      start equal to the teacher; this option exists to load and continue the released students.
    SUBS (MDLM's substitution parameterisation): revealed tokens are copied (log-prob 0), [MASK]
    is never predicted, and the output layer runs only at masked positions. causal=True gives
    the autoregressive judge (plain next-token logits, no SUBS).
    """

    def __init__(self, S: int, n_layer: int, E: int, H: int, cond_dim: int, dropout: float,
                 lam_dim: int = 0, causal: bool = False, lam_inject: str = "adaln"):
        super().__init__()
        if lam_inject not in LAM_INJECT:
            raise ValueError(f"lam_inject {lam_inject!r} is not one of {LAM_INJECT}")
        if lam_dim not in (0, 1):
            raise ValueError(f"lam_dim {lam_dim}: 0 (product teacher) or 1 (student)")
        self.S, self.mask_id, self.lam_dim, self.causal, self.hd = S, S - 1, lam_dim, causal, E // H
        self.lam_inject = lam_inject if lam_dim else ""
        self.vocab_embed = VocabEmbed(S, E)
        self.sigma_map = SigmaMap(cond_dim)
        self.blocks = nn.ModuleList(Block(E, H, cond_dim, dropout, causal) for _ in range(n_layer))
        self.output_layer = FinalLayer(E, S, cond_dim)
        if self.lam_inject == "adaln":
            self.lam_mlp = nn.Sequential(nn.Linear(128, 512), nn.GELU(),
                                         nn.Linear(512, cond_dim))
            nn.init.zeros_(self.lam_mlp[-1].weight), nn.init.zeros_(self.lam_mlp[-1].bias)
        elif self.lam_inject == "token":
            self.lam_token = nn.Sequential(nn.Linear(128, 512), nn.GELU(),
                                           nn.Linear(512, E))

    def condition(self, N: int, device) -> torch.Tensor:
        """sigma_map(0) before the SiLU, (N, C): time_conditioning False."""
        return self.sigma_map(torch.zeros(N, device=device))

    def trunk(self, x, lam):
        N, D = x.shape
        c = self.condition(N, x.device)                                       # (N, C)
        if self.lam_inject == "adaln":
            c = c + self.lam_mlp(sinusoid(lam))
        c = F.silu(c)
        extra = int(self.lam_inject == "token")
        cos, sin = rotary(D, self.hd, x.device, extra)
        h = self.vocab_embed(x)                                               # (N, D, E)
        if extra:
            h = torch.cat([h, self.lam_token(sinusoid(lam))[:, None].to(h.dtype)], 1)
        for block in self.blocks:
            h = block(h, c, cos, sin)
        return self.output_layer.modulate(h[:, :D], c)                        # (N, D, E)

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
               cfg.lam_inject if lam_inject is None else lam_inject)


RELEASED = (".ckpt", ".safetensors", ".bin")     # MDLM / SDTT / Di4C-SDTT files (pretrained/mdlm.py)


def load_model(cfg: Config, corpus: Corpus, path: str, use_ema: bool = True) -> tuple:
    """Frozen model from a finished checkpoint of this script, or from a released MDLM, SDTT or
    Di4C-SDTT checkpoint (RELEASED suffixes) -> (model in eval mode, lam_dim, {"id",
    "parents"}): the EMA weights if it has them."""
    if path.endswith(RELEASED):
        return load_released(cfg, corpus, path, use_ema)
    state = load_checkpoint(path, asdict(cfg), ARCH_KEYS)
    net = build_model(cfg, corpus.S, state["lam_dim"],      # a student runs as it was trained
                      lam_inject=state["config"].get("lam_inject", "adaln")).to(corpus.device)
    net.load_state_dict(state["ema"] if use_ema and state["ema"] is not None else state["model"])
    meta = {"id": state.get("id"), "parents": state.get("parents", {})}
    return net.eval().requires_grad_(False), state["lam_dim"], meta


def load_released(cfg: Config, corpus: Corpus, path: str, use_ema: bool = True) -> tuple:
    """A released MDLM / SDTT teacher or Di4C-SDTT student (pretrained/mdlm.py) as load_model
    returns it. The architecture flags must match the file; the vocabulary must be GPT-2's
    (--remap_vocab false): S = 50,258 with [MASK] last, as MDLM's."""
    from pretrained import mdlm
    try:
        weights, ema = mdlm.backbone_weights(mdlm.read_file(path))
        arch = mdlm.describe(weights)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: cannot read {path!r}: {e}") from None
    want = dict(S=corpus.S, E=cfg.n_embd, n_layer=cfg.n_layer, cond_dim=cfg.cond_dim)
    flag = dict(S="--remap_vocab false (GPT-2's 50,257 ids + [MASK])", E="--n_embd",
                n_layer="--n_layer", cond_dim="--cond_dim")
    bad = [f"{k} {arch[k]} in the file vs {v} here ({flag[k]})" for k, v in want.items()
           if arch[k] != v]
    if bad:
        raise SystemExit(f"error: {path!r} does not fit this configuration: " + "; ".join(bad))
    net = build_model(cfg, corpus.S, arch["lam_dim"], lam_inject=arch["lam_inject"])
    try:
        mdlm.load_into(net, ema if use_ema and ema is not None else weights, cfg.n_embd // cfg.n_head)
    except ValueError as e:
        raise SystemExit(f"error: {path!r}: {e}") from None
    meta = {"id": weights_id(net.state_dict()), "parents": {}}
    return net.to(corpus.device).eval().requires_grad_(False), arch["lam_dim"], meta


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


def sample_sets(cfg: Config) -> list:
    """(model, kind, steps) of every sample set of this configuration: unconditional at each
    step count, prefix-conditional at the student's step counts."""
    models = {"teacher": cfg.steps, "student": cfg.student_steps}
    if cfg.control_iters:
        models["control"] = cfg.student_steps
    return [(name, kind, N) for name, steps in models.items() for N in steps
            for kind in ("uncond", "cond") if kind == "uncond" or N in cfg.student_steps]


# -----------------------------------------------------------------------------
# Masked diffusion: log-linear schedule and the MDLM NELBO (docs/method.md (6)-(8))

EPS = 1e-3                                 # m(t) = (1 - EPS) t, MDLM's log-linear schedule
T_MIN_TRAIN, T_MIN_SAMPLE = 1e-3, 1e-5     # MDLM's sampling_eps and the sampler's last time


def mask_rate(t: torch.Tensor) -> torch.Tensor:
    """m(t) = 1 - exp(-sigma(t)) with sigma(t) = -log(1 - (1 - EPS) t)."""
    return (1 - EPS) * t


def make_process(S: int) -> core.MaskedProcess:
    return core.MaskedProcess(S, mask_rate)


def mdlm_loss(model, x0: torch.Tensor, process, g: torch.Generator) -> tuple:
    """Continuous-time NELBO per token: E_t[(m'(t) / m(t)) sum_{d masked} -log p(x0^d | x_t)] / D.

    Stratified t over the batch (MDLM's antithetic sampling); unmasked positions carry no loss
    (SUBS). Args: x0 (B, D). Returns (loss (B,) nats/token, terms).
    """
    B, D = x0.shape
    t = (torch.rand(1, generator=g, device=x0.device) + torch.arange(B, device=x0.device) / B) % 1
    t = T_MIN_TRAIN + (1 - T_MIN_TRAIN) * t                                   # (B,)
    x_t = process.add_noise(x0, t, g)                                         # (B, D)
    logits, masked = model(x_t, t, masked_only=True)                    # (M, S), (B, D)
    nll = torch.zeros(B, D, device=x0.device)
    nll[masked] = F.cross_entropy(logits, x0[masked], reduction="none")
    loss = (1 - EPS) / mask_rate(t) * nll.sum(1) / D                          # (B,)
    return loss, {}


@torch.no_grad()
def val_nelbo(cfg: Config, ctx: Ctx, corpus: Corpus, net, n_blocks: int = 256,
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


# -----------------------------------------------------------------------------
# Stages: teacher (MDLM), distill (Di4C + control), sample, eval


def random_blocks(corpus):
    """fit's `batches`: the rows of a global batch are random training blocks (a rank draws
    its own with the step's generator, so the stream is exact on resume)."""
    return lambda step, rows, g: corpus.batch(rows.stop - rows.start, g)


def stage_teacher(cfg: Config, ctx: Ctx, corpus: Corpus):
    """Train the MDLM teacher from scratch (skipped when --teacher_ckpt is given); report its
    validation NELBO (EMA weights)."""
    if cfg.teacher_ckpt:
        ctx.log(f"teacher: using --teacher_ckpt {cfg.teacher_ckpt}, nothing to train")
        return
    torch.manual_seed(cfg.seed)
    raw = build_model(cfg, corpus.S).to(ctx.device)
    process = make_process(corpus.S)
    ctx.log(f"teacher: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params, "
            f"S = {corpus.S}, D = {cfg.seq_len}, {corpus.n_blocks('train')} train blocks")
    out = fit(cfg, ctx, "teacher", raw, lambda model, x0, g: mdlm_loss(model, x0, process, g),
              random_blocks(corpus), cfg.teacher_iters, cfg.teacher_lr, cfg.batch_size,
              warmup=cfg.warmup, cosine=cfg.teacher_cosine, ema_decay=cfg.ema)
    nelbo = val_nelbo(cfg, ctx, corpus, out["ema"].eval())
    ctx.log(f"teacher: val NELBO {nelbo:.4f} nats/token, PPL <= {math.exp(nelbo):.1f}")
    update_metrics(cfg, ctx, {"teacher": dict(val_nelbo=nelbo, val_ppl_bound=math.exp(nelbo),
                                              iters=out["step"], train_seconds=out["wall"])})


def di4c_times(cfg: Config, B: int, g: torch.Generator) -> tuple:
    """Per-sample t (SDTT draws one t per batch): t ~ U[0, delta) with probability
    distil_prob, else U[delta, 1]; snapped once to {k / T, k = 1..T} (SDTT snaps twice); the
    teacher step goes to u = t - min(1/T, t/2) (docs/method.md (33)). Returns t, u (B,)."""
    dev = g.device
    U = torch.rand(B, generator=g, device=dev)
    distil = torch.rand(B, generator=g, device=dev) < cfg.distil_prob
    t = torch.where(distil, cfg.delta * U, cfg.delta + (1 - cfg.delta) * U)
    t = ((t * cfg.T).floor().clamp_max(cfg.T - 1) + 1) / cfg.T
    return t, t - torch.minimum(torch.full_like(t, 1 / cfg.T), t / 2)


def di4c_loss(cfg: Config, teacher, student, process: core.MaskedProcess, lam_T: int = 0):
    """fit's loss_fn of Di4C in the SDTT variant (docs/method.md (30), (33)): t, u from
    di4c_times, x_t masked at t, weights 1[t < delta] (distillation on x_t), 1[t >= delta]
    (consistency), alpha_const sigmoid(20 (t - 1/2)); the teacher's step t -> u is the analytic
    masked step (a Di4C student as teacher, lam_T > 0: its L-lambda marginal and a fresh lambda
    per row for its step, docs/method.md (35))."""
    marginal, teacher_step = core.make_teacher(teacher, process.step, lam_T, cfg.L)

    def loss_fn(model, x0, g):
        t, u = di4c_times(cfg, x0.shape[0], g)
        x_t = process.add_noise(x0, t, g)                                     # (B, D)
        weights = core.variant_weights("sdtt", t, cfg.delta, cfg.alpha_const)
        return core.di4c_loss(model, x0, x_t, t, u, weights=weights, teacher_marginal=marginal,
                              teacher_step=teacher_step, L=cfg.L, lam_dim=student.lam_dim,
                              generator=g)
    return loss_fn


def stage_distill(cfg: Config, ctx: Ctx, corpus: Corpus):
    """Di4C in the SDTT variant (docs/method.md (30)) from the teacher (a product MDLM, or a
    Di4C student for another round), then the control: the teacher fine-tuned with its own MDLM
    loss for the same compute (so that a gain is Di4C's, not extra training's)."""
    t_path = cfg.teacher_ckpt or run_path(cfg, "teacher.pt")
    teacher, lam_T, t_meta = load_model(cfg, corpus, t_path)
    check_round(cfg, lam_T)
    torch.manual_seed(cfg.seed)
    try:
        student = core.student_from_teacher(build_model(cfg, corpus.S, lam_dim=1),
                                            teacher.state_dict()).to(ctx.device)
    except ValueError as e:
        hint = (" (the teacher is a lambda-token student: add --lam_inject token)"
                if "lam_token" in str(e) and cfg.lam_inject != "token" else "")
        raise SystemExit(f"error: {t_path}: {e}{hint}") from None
    process = make_process(corpus.S)
    ctx.log(f"distill: {'mixture (multi-round)' if lam_T else 'product'} teacher {t_path}, "
            f"{cfg.distil_batch} sequences x L = {cfg.L} lambdas per step")
    out = fit(cfg, ctx, "student", student, di4c_loss(cfg, teacher, student, process, lam_T),
              random_blocks(corpus), cfg.distil_iters,
              cfg.lr, cfg.distil_batch, warmup=cfg.warmup, ema_decay=cfg.student_ema,
              parents={"teacher": t_meta["id"]})
    update_metrics(cfg, ctx, {"student": dict(iters=out["step"], train_seconds=out["wall"])})
    if cfg.control_iters == 0:
        return
    control = build_model(cfg, corpus.S).to(ctx.device)
    control.load_state_dict(teacher.state_dict())
    cout = fit(cfg, ctx, "control", control, lambda model, x0, g: mdlm_loss(model, x0, process, g),
               random_blocks(corpus), control_steps(cfg), cfg.lr, cfg.batch_size,
               warmup=cfg.warmup, ema_decay=cfg.student_ema, parents={"teacher": t_meta["id"]})
    nelbo = val_nelbo(cfg, ctx, corpus, (cout["ema"] or control).eval())
    update_metrics(cfg, ctx, {"control": dict(iters=cout["step"], train_seconds=cout["wall"],
                                              val_nelbo=nelbo)})


def control_steps(cfg: Config) -> int:
    """The control's length: --control_iters, or for -1 the Di4C run's compute in network rows
    (a forward and its backward: 3 rows per row): the student on B L rows with gradients, the
    target on B L rows and the teacher on B without; a step of the teacher's own loss costs 3
    rows per item."""
    if cfg.control_iters >= 0:
        return cfg.control_iters
    B, L = cfg.distil_batch, cfg.L
    return math.ceil(cfg.distil_iters * (3 * B * L + B * L + B) / (3 * cfg.batch_size))


@torch.no_grad()
def generate(cfg: Config, ctx: Ctx, corpus: Corpus, net, lam_dim: int, n_steps: int,
             x_T: torch.Tensor, salt: str) -> tuple:
    """Ancestral sampling (docs/method.md (37)) of the rows of x_T, split over ranks and gathered.

    times = linspace(1, 1e-5, N + 1) in float64, one extra NFE at the end if a [MASK] is left;
    a product model reuses its output when its input did not change (the caching trick); a
    mixture model gets a fresh lambda per sample per step.
    Prefix-conditional generation is x_T with the prefix revealed (SUBS keeps it).
    Returns (x0 (N, D) long on CPU, mean NFE).
    """
    process = make_process(corpus.S)
    times = torch.linspace(1, T_MIN_SAMPLE, n_steps + 1, dtype=torch.float64, device=ctx.device)
    g = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 1000 * ctx.rank
                                                        + sum(map(ord, salt)))
    if cfg.sampler == "sdtt":                   # SDTT draws from the global RNG: seeded here
        torch.manual_seed(cfg.seed + 1000 * ctx.rank + sum(map(ord, salt)))
    rows, nfes = [], []
    mine = x_T[ctx.rank::ctx.world_size]
    for i in range(0, mine.shape[0], cfg.sample_batch):
        with ctx.autocast():
            if cfg.sampler == "sdtt":             # SDTT's / the authors' sampler, exactly
                from pretrained import mdlm
                x0, nfe = mdlm.sdtt_sample(net, mine[i:i + cfg.sample_batch].to(ctx.device),
                                      n_steps, lam_dim)
            else:
                x0, nfe = core.ancestral_sample(
                    process, mine[i:i + cfg.sample_batch].to(ctx.device), times, net,
                    lam_dim=lam_dim, final_nfe=True, reuse_unchanged=lam_dim == 0, generator=g)
        rows.append(x0.cpu())
        nfes += [nfe] * x0.shape[0]
    parts = ctx.gather((torch.cat(rows) if rows else torch.zeros(0, x_T.shape[1],
                                                                 dtype=torch.long), nfes))
    x0 = torch.empty_like(x_T)
    for r, (xr, _) in enumerate(parts):
        x0[r::ctx.world_size] = xr
    nfes = [n for _, nr in parts for n in nr]
    return x0, sum(nfes) / len(nfes)


@torch.no_grad()
def latency(cfg: Config, ctx: Ctx, corpus: Corpus, net, lam_dim: int, n_steps: int) -> list:
    """Seconds per sampler call on one batch, after one warm-up call; no caching,
    so teacher and student do the same number of network calls."""
    process = make_process(corpus.S)
    times = torch.linspace(1, T_MIN_SAMPLE, n_steps + 1, dtype=torch.float64, device=ctx.device)
    x_T = process.prior(cfg.sample_batch, cfg.seq_len, device=ctx.device)
    g = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
    out = []
    for _ in range(cfg.latency_runs + 1):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx.autocast():
            core.ancestral_sample(process, x_T, times, net, lam_dim=lam_dim, generator=g)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out[1:]


def stage_sample(cfg: Config, ctx: Ctx, corpus: Corpus):
    """Unconditional and prefix-conditional samples of teacher, student and control at their
    step counts -> out_dir/samples/<model>_<uncond|cond>_<N>.{pt,txt}; latency per step count."""
    sample_dir = os.path.join(cfg.out_dir, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    nets = load_models(cfg, corpus)
    process = make_process(corpus.S)
    n_prefix = min(cfg.n_prefix, corpus.n_blocks("val"))
    prefix = corpus.get("val", np.arange(n_prefix))[:, :cfg.prefix_len].cpu()  # (P, prefix_len)
    x_cond = process.prior(n_prefix * cfg.n_cont, cfg.prefix_len + cfg.cont_len)
    x_cond[:, :cfg.prefix_len] = prefix.repeat_interleave(cfg.n_cont, 0)      # (P C, D')
    x_uncond = process.prior(cfg.n_samples, cfg.seq_len)                      # (N, D)
    sets = sample_sets(cfg)
    bar = ctx.progress(len(sets), "sample", unit="set")
    for name, kind, N in sets:
        net, lam_dim, meta = nets[name]
        t0 = time.time()
        x_T = x_uncond if kind == "uncond" else x_cond
        x0, nfe = generate(cfg, ctx, corpus, net, lam_dim, N, x_T, f"{kind}{N}")
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
    if "teacher" in nets and "student" in nets:
        lat = {}
        for N in cfg.student_steps:
            t_s, s_s = (latency(cfg, ctx, corpus, *nets[k][:2], N)
                        for k in ("teacher", "student"))
            lat[str(N)] = dict(teacher_s=float(np.mean(t_s)), teacher_std=float(np.std(t_s)),
                               student_s=float(np.mean(s_s)), student_std=float(np.std(s_s)),
                               overhead_pct=100 * (np.mean(s_s) / np.mean(t_s) - 1))
            ctx.log(f"latency N={N}: teacher {lat[str(N)]['teacher_s']:.3f} s, student "
                    f"{lat[str(N)]['student_s']:.3f} s ({lat[str(N)]['overhead_pct']:+.1f}%)")
        update_metrics(cfg, ctx, {"latency": lat})


def judge_logits_fn(judge, ctx: Ctx):
    """The trained judge as a logits_fn of eval/text_metrics.py (model ids; no padding)."""
    @torch.no_grad()
    def logits_fn(x, attention_mask=None):
        with ctx.autocast():
            return judge(x.to(ctx.device)).float()                           # (N, D, S)
    return logits_fn


def train_judge(cfg: Config, ctx: Ctx, corpus: Corpus) -> nn.Module:
    """The offline autoregressive judge (the DiT, causal), trained or reused from judge.pt.
    It is part of the metric, not of the experiment: it trains with seed 0 whatever --seed is,
    so runs of several training seeds are scored by one judge (a seed run may reuse it)."""
    cfg = dataclasses.replace(cfg, seed=0)
    torch.manual_seed(cfg.seed + 1)
    judge = build_model(cfg, corpus.S, causal=True).to(ctx.device)
    path, same = run_path(cfg, "judge.pt"), False
    if os.path.exists(path):
        state = load_checkpoint(path, asdict(cfg))
        same = all(state["config"].get(k) == asdict(cfg)[k]
                   for k in RESUME_KEYS + ("judge_iters",))
    if same:
        judge.load_state_dict(state["model"])
        ctx.log(f"eval: reusing the judge {path}")
    else:
        def ar_loss(model, x, g):
            logits = model(x)[:, :-1].float()                                 # (B, D - 1, S)
            nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            return nll.mean(1), {}

        fit(cfg, ctx, "judge", judge, ar_loss, random_blocks(corpus), cfg.judge_iters,
            cfg.teacher_lr, cfg.batch_size, warmup=cfg.warmup)
    return judge.eval()


def real_continuations(cfg: Config, corpus: Corpus) -> list:
    """The held-out text that follows each sampling prefix (the reference of MAUVE)."""
    n_prefix = min(cfg.n_prefix, corpus.n_blocks("val"))
    end = cfg.prefix_len + cfg.cont_len
    blocks = corpus.get("val", np.arange(n_prefix)).cpu()                       # (P, D)
    return [corpus.decode(r[cfg.prefix_len:end]) for r in blocks.tolist()]


def primary_ppl(cfg: Config) -> str:
    """The gen-PPL that the result tables, the speedup and the plot use."""
    return "gen_ppl_judge" if cfg.judge == "trained" else "gen_ppl_gpt2_large_retok"


def ppl_of(row: dict, key: str) -> float:
    """A sample set's primary gen-PPL; prefix-conditional rows have only the id protocol."""
    return row.get(key, row.get(key.replace("_retok", "")))


def stage_eval(cfg: Config, ctx: Ctx, corpus: Corpus):
    """Score every sample file: gen-PPL under --judge (GPT-2 Large: MDLM's retokenised protocol
    for unconditional samples, the primary number, and SDTT's protocol on the ids; or the
    autoregressive judge trained / reused here), unigram entropy, prefix-conditional self-BLEU.
    Only the sample sets of this configuration, each drawn by the current checkpoint."""
    ids = {name: meta["id"] for name, (_, _, meta) in load_models(cfg, corpus).items()}
    paths = {}
    for name, kind, N in sample_sets(cfg):
        paths[name, kind, N] = run_path(cfg, "samples", f"{name}_{kind}_{N}.pt")
        if not os.path.exists(paths[name, kind, N]):
            raise SystemExit(f"error: {paths[name, kind, N]!r} not found: run --stage sample")
    judge = train_judge(cfg, ctx, corpus) if cfg.judge in ("trained", "both") else None
    if ctx.rank != 0:
        return
    scorers = {}                       # name -> nll_fn on model ids (SDTT's protocol)
    if judge is not None:
        scorers["judge"] = text_metrics.ids_nll(judge_logits_fn(judge, ctx))
    gpt2 = text_metrics.gpt2_large(ctx.device) if cfg.judge != "trained" else None
    if gpt2 is not None:
        gpt2_nll = text_metrics.ids_nll(gpt2)
        scorers["gpt2_large"] = lambda x: gpt2_nll(corpus.gpt2_ids(x))

    def score(tokens, start):
        out = {f"gen_ppl_{k}": text_metrics.gen_ppl(f, tokens, start) for k, f in scorers.items()}
        if gpt2 is not None and start == 1:            # MDLM's protocol, unconditional samples
            texts = [corpus.decode(row) for row in tokens.tolist()]
            out["gen_ppl_gpt2_large_retok"] = text_metrics.retokenized_gen_ppl(
                gpt2, texts, lambda t: corpus.enc.encode(t, allowed_special="all"), EOT,
                max_length=cfg.seq_len, batch_size=cfg.sample_batch)
        return out

    val = corpus.get("val", np.arange(min(cfg.n_samples, corpus.n_blocks("val")))).cpu()
    res = {"data": score(val, 1)}
    res["data"]["entropy"] = text_metrics.unigram_entropy(val)
    real = real_continuations(cfg, corpus) if cfg.mauve else None
    for (name, kind, N), path in paths.items():
        s = load_checkpoint(path, asdict(cfg), SAMPLE_KEYS)
        check_lineage(path, s, {name: ids[name]})
        row = score(s["tokens"], 1 if kind == "uncond" else cfg.prefix_len)
        first = 0 if kind == "uncond" else cfg.prefix_len                   # continuation only
        row.update(entropy=text_metrics.unigram_entropy(s["tokens"][:, first:]), nfe=s["nfe"])
        if kind == "cond":
            groups = text_metrics.decode_groups(corpus.gpt2_ids(s["tokens"]), cfg.n_cont)
            row["self_bleu"] = text_metrics.self_bleu(groups)
            if cfg.mauve:
                row["mauve"] = text_metrics.mauve_score(
                    real,
                    [corpus.decode(r[cfg.prefix_len:]) for r in s["tokens"].tolist()],
                    device_id=ctx.device.index or 0 if ctx.device.type == "cuda" else -1)
        res[f"{name}_{kind}_{N}"] = row
    key = primary_ppl(cfg)
    rows = [dict(model=k.split("_")[0], kind=k.split("_")[1], steps=int(k.split("_")[2]),
                 nfe=v["nfe"], gen_ppl=ppl_of(v, key),
                 entropy=v["entropy"]) for k, v in res.items() if k != "data"]
    update_metrics(cfg, ctx, {"eval": res, "results": rows, "primary": "gen_ppl",
                              "speedup": results_table.speedups(rows, "gen_ppl")})
    plot.plot_quality(cfg.out_dir, f"{os.path.basename(__file__)} --preset {cfg.preset}",
                      [r for r in rows if r["kind"] == "uncond"], "gen_ppl")
    print_table(res, key)


def print_table(res: dict, key: str):
    """The eval table (gen-PPL under `key`, for a prefix-conditional row its id-protocol
    version) and a RESULT line for student vs teacher at each student step count."""
    keys = [k for k in res if k != "data"]
    print(f"\n{'model':<9}{'kind':<8}{'steps':>6}{'NFE':>7}{'gen-PPL':>10}{'entropy':>9}"
          f"{'self-BLEU':>11}")
    print(f"{'data':<9}{'val':<8}{'-':>6}{'-':>7}{res['data'][key]:>10.1f}"
          f"{res['data']['entropy']:>9.3f}")
    order = sorted(keys, key=lambda k: (k.split("_")[1], k.split("_")[0],
                                           int(k.split("_")[2])))
    for k in order:
        name, kind, N = k.split("_")
        r = res[k]
        bleu = f"{r['self_bleu']:>11.1f}" if "self_bleu" in r else ""
        print(f"{name:<9}{kind:<8}{N:>6}{r['nfe']:>7.1f}{ppl_of(r, key):>10.1f}"
              f"{r['entropy']:>9.3f}{bleu}")
    for k in sorted((k for k in keys if k.startswith("student_uncond_")),
                    key=lambda k: int(k.split("_")[2])):
        N = k.split("_")[2]
        if f"teacher_uncond_{N}" in res:
            s, t = res[k], res[f"teacher_uncond_{N}"]
            print(f"RESULT student_gen_ppl@{N}={s[key]:.2f} "
                  f"teacher_gen_ppl@{N}={t[key]:.2f} "
                  f"student_entropy@{N}={s['entropy']:.3f} teacher_entropy@{N}={t['entropy']:.3f}")


# -----------------------------------------------------------------------------
# Main


def run_needs(cfg: Config) -> list:
    """What the stages of this run need beyond the config, checked before any work (preflight):
    given checkpoints, local data files, nltk (self-BLEU) and, with --judge gpt2-large or both,
    transformers and the GPT-2 Large weights (in the HF cache when offline)."""
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    needs = checkpoint_needs(cfg, stages)
    if cfg.teacher_ckpt == SDTT7 and not os.path.exists(SDTT7):
        needs = [(f"the paper preset's teacher {SDTT7!r} is not there",
                  f"download it: {SDTT7_GET}; or --teacher_ckpt '' trains MDLM from scratch")
                 if problem.startswith("--teacher_ckpt") else (problem, fix)
                 for problem, fix in needs]
    files = data_files(cfg)
    if cfg.data_files and not files:
        needs.append((f"--data_files {cfg.data_files!r} matched no file", "fix the pattern"))
    empty = [f for f in files if os.path.isfile(f) and os.path.getsize(f) == 0]
    if empty:
        needs.append((f"--data_files file {empty[0]!r} is empty", "remove it or fix the pattern"))
    if "eval" in stages:
        needs += package_needs({"nltk": ("nltk", "self-BLEU (stage eval)")})
    if "eval" in stages and cfg.mauve:
        needs += package_needs({"mauve": ("mauve-text", "--mauve")})
    if "eval" in stages and cfg.judge != "trained":
        needs += package_needs({"transformers": ("transformers", "--judge gpt2-large")})
        if os.environ.get("HF_HUB_OFFLINE") == "1" and not gpt2_large_cached():
            needs.append(("--judge gpt2-large needs the gpt2-large weights, which are not in the "
                          "Hugging Face cache and HF_HUB_OFFLINE=1 forbids the download",
                          "run once online: python -c \"from transformers import "
                          "AutoModelForCausalLM as M; M.from_pretrained('gpt2-large')\""))
    return needs


def gpt2_large_cached() -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache("gpt2-large", "config.json"), str)


def main(cfg: Config):
    check_config(cfg)
    preflight(run_needs(cfg))
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"error: --n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}")
    if not 1 / cfg.T <= cfg.delta < 1:
        raise SystemExit(f"error: --delta {cfg.delta} must lie in [1/T, 1) = [{1 / cfg.T:.4g}, 1): "
                         "times are snapped to k/T, so a smaller delta never distils")
    rank, world_size, device = setup_dist(cfg.device, cfg.dist_timeout)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ctx = Ctx(rank, world_size, device, Logger(rank, cfg.out_dir), cfg.dtype)
    ctx.log(f"owt_masked.py | torch {torch.__version__} | python {platform.python_version()} | "
            f"device {device} | world size {world_size}")
    ctx.log("config " + json.dumps(asdict(cfg)))
    t_start = time.time()
    corpus = Corpus(cfg, ctx)
    ctx.log(f"data: {corpus.n_blocks('train')} train / {corpus.n_blocks('val')} val blocks "
            f"of {cfg.seq_len} tokens, S = {corpus.S} (with [MASK])")
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    run = {"teacher": stage_teacher, "distill": stage_distill,
           "sample": stage_sample, "eval": stage_eval}
    walls = {}
    for name in stages:
        t0 = time.time()
        run[name](cfg, ctx, corpus)
        walls[name] = time.time() - t0
        ctx.log(f"stage {name} done in {walls[name]:.1f} s")
    walls["total"] = time.time() - t_start
    update_metrics(cfg, ctx, {"wall_seconds": walls})
    cleanup(ctx)


if __name__ == "__main__":
    main(parse_config(Config))
