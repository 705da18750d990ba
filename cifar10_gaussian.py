"""
Di4C on pixels with a discretized-Gaussian CTMC (tauLDR teacher; Sec. 5.1 of arXiv:2410.08709).

Teacher: a tauLDR-style U-Net x0-predictor trained with the continuous-time ELBO plus an auxiliary
cross-entropy. Student: the same U-Net plus a lambda path whose output layers start at zero (so it
starts equal to the teacher), fine-tuned with the Di4C losses of di4c_core (SPEC §C.3).

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
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

import di4c_core as core

# -----------------------------------------------------------------------------
# Config: defaults are the paper preset (SPEC §C.3, §E); presets override a few fields


@dataclass
class Config:
    preset: str = "paper"          # paper | demo | smoke
    stage: str = "all"             # teacher | distill | sample | eval | all
    out_dir: str = "runs/cifar10"
    # data
    dataset: str = "cifar10"       # cifar10 | folder (torchvision ImageFolder) | digits (embedded)
    data_dir: str = "data/cifar10"
    download: bool = False         # let torchvision download CIFAR-10 into data_dir
    image_size: int = 32           # folder datasets are resized to this
    S: int = 256                   # grey levels per channel
    # forward process (tauLDR, SPEC §A.3)
    rate_sigma: float = 6.0
    q_sigma: float = 512.0
    time_base: float = 3.0         # beta_bar(t) = time_base (time_exp^t - 1)
    time_exp: float = 100.0
    min_time: float = 0.01
    # network (tauLDR U-Net, SPEC §B.2)
    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_res: tuple = (16,)
    dropout: float = 0.1
    # teacher training
    teacher_ckpt: str = ""         # use this teacher instead of training one (ours or tauLDR format)
    teacher_iters: int = 2000000
    teacher_batch: int = 128
    teacher_lr: float = 2e-4
    nll_weight: float = 0.001      # auxiliary cross-entropy weight of the tauLDR objective
    # (the demo weights the cross-entropy 100: on CPU budgets the one-jump ELBO alone is too noisy)
    # Di4C (SPEC §C.3)
    distil_iters: int = 320000
    batch_size: int = 8            # x_t per step (global); the network sees batch_size * L rows
    L: int = 16
    lr: float = 2e-4
    lam_lr_mult: float = 1.0       # learning-rate multiplier of the lambda path (zero-initialised)
    distil_weight: float = 1.0
    alpha_const: float = 1.0       # alpha(t) = alpha_const sigmoid(20 (t - 1/2))
    control_variate: bool = True
    control: bool = False          # also fine-tune the teacher with its own loss for the same wall time
    # optimisation
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    grad_accum: int = 1
    # sampling / eval
    steps: tuple = (10, 20, 40)
    student_steps: tuple = (10, 20, 40)
    hybrid_teacher_steps: int = 3  # hybrid sampler: last NFEs by the teacher
    n_samples: int = 50000
    sample_batch: int = 50
    # system
    seed: int = 0
    device: str = ""
    log_every: int = 100
    ckpt_every: int = 5000
    resume: bool = True


PRESETS = {
    "paper": {},
    # 8x8 digits bundled with scikit-learn: S = 17, D = 64. time_base 0.3 puts full noise near t = 1
    # (the paper's 3 fully noises 17 levels by t ~ 0.3; see README "time scale").
    "demo": dict(dataset="digits", S=17, rate_sigma=1.5, q_sigma=34.0, time_base=0.3, ch=32,
                 ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0.0, teacher_iters=1500,
                 teacher_batch=64, teacher_lr=1e-3, nll_weight=100.0, distil_iters=400,
                 batch_size=8, L=16, lr=2e-4, lam_lr_mult=10.0, ema_decay=0.99, control=True,
                 steps=(2, 4, 8, 16, 32), student_steps=(2, 4, 8), hybrid_teacher_steps=1,
                 n_samples=1000, sample_batch=500, log_every=100, ckpt_every=500,
                 out_dir="runs/cifar10_demo"),
    "smoke": dict(dataset="digits", S=17, rate_sigma=1.5, q_sigma=34.0, time_base=0.3, ch=8,
                  ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0.0, teacher_iters=4,
                  teacher_batch=8, teacher_lr=1e-3, nll_weight=100.0, distil_iters=4,
                  batch_size=2, L=4, lr=1e-4, lam_lr_mult=10.0, ema_decay=0.9, control=True,
                  steps=(2, 4), student_steps=(2,), hybrid_teacher_steps=1, n_samples=16,
                  sample_batch=8, log_every=1, ckpt_every=2, out_dir="runs/cifar10_smoke"),
}

# -----------------------------------------------------------------------------
# Infrastructure (identical in the three domain scripts; see STYLE §3.1)


def parse_config(cls, argv=None):
    """CLI -> Config: `--preset` picks a preset, then every `--field value` wins (STYLE §0)."""
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = {bool: dict(type=_parse_bool), tuple: dict(type=int, nargs="+")}.get(f.type, dict(type=f.type))
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


def setup_dist(device: str = ""):
    """torchrun -> one process per GPU (nccl) or per CPU worker (gloo); plain python -> world_size 1."""
    if "RANK" not in os.environ:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 0, 0, 1, dev
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, local_rank, world_size, dev


def cleanup(world_size: int):
    if world_size > 1:
        dist.barrier()                 # without it gloo aborts intermittently at exit
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size
    return x


def save_checkpoint(path: str, state: dict):
    """Atomic: write a temp file in the same folder, then rename over the old checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, cfg_dict: dict, keys_that_must_match=()):
    """Load a checkpoint and refuse one from another config (names the mismatching fields)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path!r} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    bad = [k for k in keys_that_must_match if state["config"].get(k) != cfg_dict.get(k)]
    if bad:
        diffs = ", ".join(f"{k}: checkpoint {state['config'].get(k)!r} vs now {cfg_dict.get(k)!r}" for k in bad)
        raise SystemExit(f"error: checkpoint {path!r} was written with another config ({diffs})")
    return state


class Logger:
    """print0 + tee into out_dir/log.txt on rank 0."""

    def __init__(self, rank: int, out_dir: str):
        self.rank, self.path = rank, os.path.join(out_dir, "log.txt")

    def __call__(self, *msg):
        if self.rank == 0:
            line = " ".join(str(m) for m in msg)
            print(line, flush=True)
            with open(self.path, "a") as f:
                f.write(line + "\n")


def update_ema(ema: nn.Module, model: nn.Module, decay: float):
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


# -----------------------------------------------------------------------------
# Data: uint8 images (N, C, H, W) with values in 0..S-1, held in memory


def load_images(cfg: Config) -> torch.Tensor:
    """CIFAR-10 (torchvision), an ImageFolder, or the 8x8 digits bundled with scikit-learn."""
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits
        x = torch.from_numpy(load_digits().images).to(torch.uint8)[:, None]      # (1797, 1, 8, 8)
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
            ds = torchvision.datasets.ImageFolder(cfg.data_dir, transform=tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"error: no images under --data_dir {cfg.data_dir!r} ({e})") from None
        x = torch.stack([ds[i][0][:3] for i in range(len(ds))])                 # (N, C, H, W)
        return _requantise(x, 256, cfg.S)
    raise SystemExit(f"error: --dataset must be cifar10, folder or digits, got {cfg.dataset!r}")


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
        with open(os.path.join(folder, f), "rb") as fh:
            parts.append(torch.as_tensor(pickle.load(fh, encoding="bytes")[b"data"], dtype=torch.uint8))
    return torch.cat(parts).view(-1, 3, 32, 32)


def _requantise(x: torch.Tensor, levels: int, S: int) -> torch.Tensor:
    return x if levels == S else (x.long() * S // levels).to(torch.uint8)


def batch_at(step: int, images: torch.Tensor, sampler: DistributedSampler, per_rank: int,
             generator: torch.Generator) -> torch.Tensor:
    """The rank's batch for a given step, a pure function of (seed, step): resume is exact."""
    per_epoch = len(sampler) // per_rank
    sampler.set_epoch(step // per_epoch)
    idx = list(iter(sampler))[(step % per_epoch) * per_rank:][:per_rank]
    x = images[idx].long()                                                       # (B, C, H, W)
    flip = torch.rand(len(idx), generator=generator) < 0.5                       # horizontal flips
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# -----------------------------------------------------------------------------
# Forward process: tauLDR's Gaussian-target rate matrix (SPEC §A.3)


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
    """(skip(x) + conv(drop(act(norm(conv(act(norm(x))) + t_proj(temb) [+ dense1(lemb)]))))) / sqrt 2."""

    def __init__(self, cin, cout, emb, dropout, lam):
        super().__init__()
        self.n1, self.c1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.t_proj = nn.Linear(emb, cout)
        self.n2, self.drop, self.c2 = norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()    # tauLDR's NiN
        self.dense1 = nn.Linear(emb, cout) if lam else None     # lambda path, zero at init
        if lam:
            nn.init.zeros_(self.dense1.weight), nn.init.zeros_(self.dense1.bias)

    def forward(self, x, temb, lemb):
        h = self.c1(F.silu(self.n1(x)))
        h = h + self.t_proj(F.silu(temb))[:, :, None, None]
        if self.dense1 is not None:
            h = h + self.dense1(F.silu(lemb))[:, :, None, None]
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
    """x0-predictor: x_t (N, D) long -> logits (N, D, S), D = C H W (SPEC §A.3, §B.2).

    Computes the same function as tauLDR's `UNet` + `ImageX0PredBase` head (fix_logistic=False);
    `down`, `mid`, `up` hold the same blocks in the same order as tauLDR's downsampling, middle and
    upsampling module lists, so a tauLDR checkpoint maps onto it key by key (`tauldr_to_ours`).
    With lam=True it also takes lambda: two embeddings of (lambda, t) -- the second also sees the
    bottleneck's spatial mean -- feed a zero-initialised `dense1` in every ResBlock, so the
    student is exactly the teacher at initialisation.
    """

    def __init__(self, C, H, S, ch, ch_mult, num_res_blocks, attn_res, dropout, lam=False):
        super().__init__()
        self.C, self.H, self.S, self.ch, self.lam = C, H, S, ch, lam
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
        if lam:
            self.lemb_down = nn.Sequential(nn.Linear(2 * ch, ch), nn.SiLU(), nn.Linear(ch, emb),
                                           nn.SiLU(), nn.Linear(emb, emb))
            self.lemb_up = nn.Sequential(nn.Linear(2 * ch + c_mid, ch),
                                         nn.SiLU(), nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))

    def forward(self, x_t, t, lam=None):
        N = x_t.shape[0]
        dt = self.conv_in.weight.dtype                                              # float32 unless .double()
        x = x_t.view(N, self.C, self.H, self.H).to(dt) / (self.S - 1) * 2 - 1       # (N, C, H, W)
        e_t = sinusoid(t, self.ch).to(dt)                                           # (N, ch)
        temb = self.temb(e_t)
        lemb = None
        if self.lam:
            e_lam = sinusoid(lam[:, 0], self.ch).to(dt)
            lemb = self.lemb_down(torch.cat([e_lam, e_t], -1))
        h, skips = self.conv_in(x), []
        skips.append(h)
        for blk in self.down:
            h = blk(h) if isinstance(blk, Down) else blk(h, temb, lemb)
            if not isinstance(blk, Attention):
                skips.append(h)
            else:
                skips[-1] = h
        if self.lam:
            lemb = self.lemb_up(torch.cat([e_lam, e_t, h.mean((2, 3))], -1))
        for blk in self.mid:
            h = blk(h, temb, lemb)
        for blk in self.up:
            if isinstance(blk, ResBlock):
                h = blk(torch.cat([h, skips.pop()], 1), temb, lemb)
            else:
                h = blk(h)
        return logistic_logits(x, self.out(h), self.S)                             # (N, D, S)


def logistic_logits(x: torch.Tensor, raw: torch.Tensor, S: int) -> torch.Tensor:
    """Log-mass of a logistic(mu, s) over S equal bins of [-1, 1] (tauLDR head, SPEC §A.3).

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
    return UNet(C, H, cfg.S, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_res, cfg.dropout, lam)


def student_from_teacher(teacher: UNet, cfg: Config) -> UNet:
    """Student = teacher weights + fresh lambda modules; any other missing/unexpected key is an error."""
    student = build_unet(cfg, teacher.C, teacher.H, lam=True).to(next(teacher.parameters()).device)
    own, init = student.state_dict(), teacher.state_dict()
    unexpected = [k for k in init if k not in own]
    extra = [k for k in own if k not in init and not (k.startswith("lemb_") or ".dense1." in k)]
    if extra or unexpected:
        raise SystemExit(f"error: teacher/student keys disagree: missing {extra}, unexpected {unexpected}")
    student.load_state_dict({**own, **init})           # strict: only the lambda path stays fresh
    return student


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


# -----------------------------------------------------------------------------
# Di4C step: the tauLDR variant of SPEC §C.3 on the core's losses


def di4c_step(student, student_raw, teacher_fns, proc, x0, cfg: Config, g):
    """delta ~ LogU[1e-3, 1e-2], t ~ U[min_time + delta, 1], u = t - delta; separate x_tau at
    tau in {0.01} or U[0.01, 0.02]; alpha(t) = alpha_const sigmoid(20 (t - 1/2)). Returns (loss, terms)."""
    B, dev = x0.shape[0], x0.device
    rand = lambda: torch.rand(B, generator=g, device=dev)
    delta = 10 ** (-3 + rand())
    t = cfg.min_time + delta + (1 - cfg.min_time - delta) * rand()
    u = t - delta
    tau = cfg.min_time + (rand() < 0.5).float() * rand() * 0.01
    x_t, x_tau = proc.add_noise(x0, t, g), proc.add_noise(x0, tau, g)

    def student_target(x, s, lam):             # current weights, dropout off, no grad (SPEC §G.4)
        student_raw.eval()
        out = student_raw(x, s, lam)
        student_raw.train()
        return out

    marginal, step = teacher_fns
    return core.di4c_loss(student, x0, x_t, t, u, teacher_marginal=marginal, teacher_step=step,
                          L=cfg.L, student_target=student_target,
                          alpha=core.alpha_t(t, "sigmoid", cfg.alpha_const),
                          distil_weight=torch.full((B,), cfg.distil_weight, device=dev),
                          x_tau=x_tau, tau=tau, control_variate=cfg.control_variate, generator=g)


# -----------------------------------------------------------------------------
# Training loop (teacher, Di4C student and control share it)


def train(cfg: Config, name: str, raw: nn.Module, loss_fn, iters: int, lr: float, batch: int,
          images, dist_info, log, wall_budget: float = 0.0) -> tuple:
    """Adam, grad clip, EMA, grad accumulation, DDP; `{name}_last.pt` every ckpt_every steps.

    Every random draw of step k comes from generators seeded by (seed, rank, k), and the data
    order from DistributedSampler(seed, epoch), so `--resume` continues exactly.
    wall_budget > 0 stops after that many seconds of training (the control run).
    Returns (raw, ema, seconds of training).
    """
    rank, world, dev = dist_info
    per_rank, rem = divmod(batch, world * cfg.grad_accum)
    if rem or per_rank == 0:
        raise SystemExit(f"error: batch {batch} must be a positive multiple of "
                         f"world_size ({world}) x grad_accum ({cfg.grad_accum})")
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    lam_path = lambda n: n.startswith("lemb_") or ".dense1." in n
    groups = [{"params": [p for n, p in raw.named_parameters() if not lam_path(n)], "lr": lr},
              {"params": [p for n, p in raw.named_parameters() if lam_path(n)], "lr": lr * cfg.lam_lr_mult}]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    path, step, elapsed = os.path.join(cfg.out_dir, f"{name}_last.pt"), 0, 0.0
    if cfg.resume and os.path.exists(path):
        st = load_checkpoint(path, dataclasses.asdict(cfg), ("S", "ch", "ch_mult", "dataset", "L"))
        raw.load_state_dict(st["model"]), ema.load_state_dict(st["ema"]), opt.load_state_dict(st["optimizer"])
        step, elapsed = st["step"], st["elapsed"]
        log(f"{name}: resumed from {path} at step {step}")
    model = DDP(raw) if world > 1 else raw
    sampler = DistributedSampler(range(len(images)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    log(f"{name}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params | batch {batch} = "
        f"{per_rank} x {cfg.grad_accum} accum x {world} ranks | {iters} iters")
    raw.train()
    salt = sum(map(ord, name)) % 8                  # teacher, student, control draw different noise
    while step < iters:
        t0 = time.time()
        for micro in range(cfg.grad_accum):
            seed = (((cfg.seed * 1000 + rank) * 1_000_003 + step) * 64 + micro) * 8 + salt
            torch.manual_seed(seed)
            g = torch.Generator(device=dev).manual_seed(seed)
            x0 = batch_at(step * cfg.grad_accum + micro, images, sampler, per_rank,
                          torch.Generator().manual_seed(seed)).flatten(1).to(dev)   # (B, D)
            sync = micro == cfg.grad_accum - 1 or world == 1
            with (model.no_sync() if not sync else _null()):
                loss, terms = loss_fn(model, raw, x0, g)
                (loss.mean() / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        update_ema(ema, raw, min(cfg.ema_decay, (1 + step) / (10 + step)))
        elapsed += time.time() - t0
        last = step == iters
        if step % cfg.log_every == 0 or last:
            vals = all_reduce_mean(torch.stack([loss.mean().detach()] + [v.mean() for v in terms.values()]), world)
            log(f"{name} step {step:07d} | loss {vals[0].item():.4f} | "
                + " | ".join(f"{k} {v.item():.4f}" for k, v in zip(terms, vals[1:]))
                + f" | {1000 * (time.time() - t0):.0f} ms | {elapsed:.0f} s")
        stop = torch.tensor(float(wall_budget > 0 and elapsed >= wall_budget), device=dev)
        if all_reduce_mean(stop, world).item() > 0:
            last = True
        if rank == 0 and (step % cfg.ckpt_every == 0 or last):
            save_checkpoint(path, {"model": raw.state_dict(), "ema": ema.state_dict(),
                                   "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
                                   "config": dataclasses.asdict(cfg)})
        if last:
            break
    if world > 1:
        dist.barrier()
    return raw, ema, elapsed


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def export(cfg: Config, name: str, ema: nn.Module, extra: dict, rank: int):
    """Inference snapshot `{name}.pt` = EMA weights + config (what sample/eval stages read)."""
    if rank == 0:
        save_checkpoint(os.path.join(cfg.out_dir, f"{name}.pt"),
                        {"model": ema.state_dict(), "config": dataclasses.asdict(cfg), **extra})
    if dist.is_initialized():
        dist.barrier()                 # other ranks read the snapshot next


def load_net(cfg: Config, name: str, C: int, H: int, lam: bool, dev) -> tuple:
    """EMA network `{name}.pt` of this run, or the teacher from --teacher_ckpt: ours, or tauLDR's
    (detected by its keys; EMA weights, see pretrained/tauldr.py). Every key must match (strict)."""
    path = cfg.teacher_ckpt if (name == "teacher" and cfg.teacher_ckpt) else os.path.join(cfg.out_dir, f"{name}.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path!r} not found: run --stage {'teacher' if name == 'teacher' else 'distill'} "
                         f"first (same --out_dir), or pass --teacher_ckpt")
    net = build_unet(cfg, C, H, lam).to(dev)
    st = torch.load(path, map_location="cpu", weights_only=True) if path == cfg.teacher_ckpt else None
    if st is not None:
        from pretrained import tauldr  # andrew-cr/tauLDR's checkpoint layout, recognised by its keys
    if st is not None and tauldr.is_tauldr_checkpoint(st):
        if lam:
            raise SystemExit(f"error: {path!r} is a tauLDR checkpoint: it can only be the teacher")
        try:
            st = {"model": tauldr.check_and_convert(net, st["model"], path), "format": "tauLDR (EMA weights)"}
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    else:                              # ours: also refuse one written with another config
        st = load_checkpoint(path, dataclasses.asdict(cfg), ("S", "ch", "ch_mult", "num_res_blocks", "attn_res"))
    try:
        net.load_state_dict(st["model"])
    except RuntimeError as e:
        raise SystemExit(f"error: {path!r} does not match this network ({str(e)[:300]})") from None
    return net.eval().requires_grad_(False), st


# -----------------------------------------------------------------------------
# Sampling and evaluation


@torch.no_grad()
def sample_images(net, lam_dim, proc, cfg: Config, n_steps: int, n: int, C: int, H: int, dev,
                  teacher=None, n_teacher: int = 0, seed: int = 0) -> tuple:
    """SPEC §D.1: N NFEs on linspace(1, min_time, N), fresh lambda per sample per step, last NFE argmax.
    Returns (images (n, C, H, H) uint8, NFE per sample)."""
    times = torch.linspace(1, cfg.min_time, n_steps)
    out, nfe = [], 0
    for i in range(0, n, cfg.sample_batch):
        b = min(cfg.sample_batch, n - i)
        g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i)
        x_T = proc.prior(b, C * H * H, g)
        x, nfe = core.ancestral_sample(proc, x_T, times, net, lam_dim=lam_dim, teacher=teacher,
                                       n_teacher=n_teacher, generator=g)
        out.append(x.view(b, C, H, H).to(torch.uint8).cpu())
    return torch.cat(out), nfe


def sampler_runs(cfg: Config) -> list:
    """(label, net name, lam_dim, steps, teacher NFEs) for every sample set of the eval table."""
    runs = [(f"teacher@{n}", "teacher", 0, n, 0) for n in cfg.steps]
    runs += [(f"student@{n}", "student", 1, n, 0) for n in cfg.student_steps]
    runs += [(f"hybrid@{n}", "student", 1, n, cfg.hybrid_teacher_steps) for n in cfg.student_steps
             if n > cfg.hybrid_teacher_steps]
    if cfg.control:
        runs += [(f"control@{n}", "control", 0, n, 0) for n in cfg.student_steps]
    return runs


def stage_sample(cfg: Config, proc, C, H, dist_info, log):
    import torchvision
    rank, world, dev = dist_info
    nets = {}
    for label, name, lam_dim, n_steps, n_teacher in sampler_runs(cfg):
        if name not in nets:
            nets[name] = load_net(cfg, name, C, H, lam_dim > 0, dev)[0]
        per_rank = math.ceil(cfg.n_samples / world)
        lo, hi = rank * per_rank, min(cfg.n_samples, (rank + 1) * per_rank)
        x, nfe = sample_images(nets[name], lam_dim, proc, cfg, n_steps, hi - lo, C, H, dev,
                               teacher=nets.get("teacher"), n_teacher=n_teacher, seed=cfg.seed + lo)
        torch.save(x, os.path.join(cfg.out_dir, f"samples_{label}_rank{rank}.pt"))
        if world > 1:
            dist.barrier()
        if rank == 0:
            parts = [torch.load(os.path.join(cfg.out_dir, f"samples_{label}_rank{r}.pt")) for r in range(world)]
            allx = torch.cat(parts)
            torch.save(allx, os.path.join(cfg.out_dir, f"samples_{label}.pt"))
            torchvision.utils.save_image(allx[:256].float() / (cfg.S - 1),
                                         os.path.join(cfg.out_dir, f"grid_{label}.png"), nrow=16)
            log(f"sampled {label}: {len(allx)} images, {nfe} NFE")


@torch.no_grad()
def latency(net, lam_dim, proc, cfg, n_steps, C, H, dev, repeats=5) -> tuple:
    """Wall time of one sampler call on a batch of sample_batch (mean, std over runs after a warm-up)."""
    times = []
    for r in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample_images(net, lam_dim, proc, cfg, n_steps, cfg.sample_batch, C, H, dev, seed=r)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times[1:])
    return t.mean().item(), t.std().item()


def stage_eval(cfg: Config, images, proc, C, H, dist_info, log) -> dict:
    """Fréchet distance (digits classifier features) or FID/IS (Inception) for every sample set."""
    rank, world, dev = dist_info
    metrics = {}
    if rank == 0:
        metrics["quality"] = {}
        if cfg.dataset == "digits":
            from eval import digits
            clf = digits.load_or_train_classifier(os.path.join(cfg.out_dir, "digits_classifier.pt"))
            real = _requantise(images, cfg.S, 17)
            for label, *_ in sampler_runs(cfg):
                x = _requantise(torch.load(os.path.join(cfg.out_dir, f"samples_{label}.pt")), cfg.S, 17)
                metrics["quality"][label] = {"frechet": digits.digits_frechet(clf, x, real)}
        else:
            from eval import inception
            for label, *_ in sampler_runs(cfg):
                x = torch.load(os.path.join(cfg.out_dir, f"samples_{label}.pt"))
                x = (x.long() * 256 // cfg.S).to(torch.uint8)
                metrics["quality"][label] = inception.fid_is(x, reference=images)
        teacher = load_net(cfg, "teacher", C, H, False, dev)[0]
        student = load_net(cfg, "student", C, H, True, dev)[0]
        metrics["latency_s"] = {}
        for n in cfg.student_steps:
            (tm, ts), (sm, ss) = (latency(teacher, 0, proc, cfg, n, C, H, dev),
                                  latency(student, 1, proc, cfg, n, C, H, dev))
            metrics["latency_s"][n] = {"teacher": [tm, ts], "student": [sm, ss], "overhead": sm / tm - 1}
        log(format_table(metrics))
    return metrics


def format_table(metrics: dict) -> str:
    q = metrics["quality"]
    key = "frechet" if "frechet" in next(iter(q.values())) else "fid"
    lines = [f"{'sampler':>14} | {key}"]
    lines += [f"{label:>14} | {v[key]:.3f}" for label, v in q.items()]
    for n, v in metrics.get("latency_s", {}).items():
        lines.append(f"latency @{n} NFE: teacher {v['teacher'][0]:.3f}s  student {v['student'][0]:.3f}s "
                     f"(overhead {100 * v['overhead']:+.1f}%)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Main: teacher -> distill (+ control) -> sample -> eval


def main(cfg: Config) -> dict:
    stages = {"all": ["teacher", "distill", "sample", "eval"]}.get(cfg.stage, [cfg.stage])
    if not set(stages) <= {"teacher", "distill", "sample", "eval"}:
        raise SystemExit(f"error: --stage must be teacher, distill, sample, eval or all, got {cfg.stage!r}")
    rank, _, world, dev = setup_dist(cfg.device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    log, dist_info = Logger(rank, cfg.out_dir), (rank, world, dev)
    log(f"config {json.dumps(dataclasses.asdict(cfg))}")
    log(f"torch {torch.__version__} | device {dev} | world_size {world}")
    torch.manual_seed(cfg.seed)
    images = load_images(cfg)                                                       # (N, C, H, W)
    C, H = images.shape[1], images.shape[2]
    proc = build_process(cfg, dev)
    mpath = os.path.join(cfg.out_dir, "metrics.json")
    metrics = json.load(open(mpath)) if os.path.exists(mpath) else {}

    if "teacher" in stages and not cfg.teacher_ckpt:
        t_start = time.time()
        raw = build_unet(cfg, C, H, lam=False).to(dev)
        loss_fn = lambda m, r, x0, g: (teacher_loss(m, proc, x0, cfg, g), {})
        _, ema, secs = train(cfg, "teacher_train", raw, loss_fn, cfg.teacher_iters, cfg.teacher_lr,
                             cfg.teacher_batch, images, dist_info, log)
        export(cfg, "teacher", ema, {}, rank)
        metrics["teacher_train_s"] = secs
        metrics["teacher_stage_wall_s"] = time.time() - t_start
    if "distill" in stages:
        teacher, _ = load_net(cfg, "teacher", C, H, False, dev)
        student = student_from_teacher(teacher, cfg).train()
        fns = core.make_teacher(teacher, proc)
        loss_fn = lambda m, r, x0, g: di4c_step(m, r, fns, proc, x0, cfg, g)
        _, ema, secs = train(cfg, "student_train", student, loss_fn, cfg.distil_iters, cfg.lr,
                             cfg.batch_size, images, dist_info, log)
        export(cfg, "student", ema, {"train_s": secs}, rank)
        metrics["distill_train_s"] = secs
        if cfg.control:                       # the teacher fine-tuned with its own loss, same wall time
            control = copy.deepcopy(teacher).train().requires_grad_(True)
            loss_fn = lambda m, r, x0, g: (teacher_loss(m, proc, x0, cfg, g), {})
            _, ema, csecs = train(cfg, "control_train", control, loss_fn, 10 ** 9, cfg.lr,
                                  cfg.teacher_batch, images, dist_info, log, wall_budget=secs)
            export(cfg, "control", ema, {"train_s": csecs}, rank)
            metrics["control_train_s"] = csecs
    if "sample" in stages:
        stage_sample(cfg, proc, C, H, dist_info, log)
    if "eval" in stages:
        metrics.update(stage_eval(cfg, images, proc, C, H, dist_info, log))
    if rank == 0:
        with open(mpath + ".tmp", "w") as f:
            json.dump(metrics, f, indent=1)
        os.replace(mpath + ".tmp", mpath)
    cleanup(world)
    return metrics


if __name__ == "__main__":
    main(parse_config(Config))
