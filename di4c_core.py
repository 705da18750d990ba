"""Di4C - Distillation of Discrete Diffusion through Dimensional Correlations.
Hayakawa, Takida, Imaizumi, Wakaki, Mitsufuji. ICML 2025. arXiv:2410.08709 (v4).

One torch-only file, read beside the paper and copied into other projects. "(n)" is an equation
of docs/method.md, which derives each formula; its §11 maps them to the paper's sections.

Shapes: B batch, D dimensions, S states per dimension ([MASK] included), L lambda-samples per
x_t (the "lambda-batch"), k = 1 lambda's dimension; psi / theta the teacher / student; times
0 <= s < u < t <= 1 (t = 1 is noise).

A denoiser (teacher or student) is any callable denoiser(x_t (N, D) long, t (N,) float,
lam (N, k) | None, cond (N, ...) | None) -> logits (N, D, S) of x0 given x_t. A product network
ignores lam; `cond` (labels, ...) is repeated with x_t whenever rows are. The mixture student
p^theta_{0|t}(x0 | x_t) = E_{lambda ~ U[0,1]} prod_d p^{theta,d}_{0|t}(x0^d | x_t; lambda) has
every expectation over lambda estimated with L draws (12).
"""
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ---- Categorical draws and small helpers -----------------------------------------------------


def sample_categorical(log_p: Tensor, generator: Optional[torch.Generator] = None,
                       chunk: int = 1 << 24) -> Tensor:
    """Draw one state per row from Cat(softmax(log_p)) by Gumbel-max in float64 (36; ours):
    float32 noise lowers the temperature (Zheng et al., arXiv 2409.02908). Rows whose runner-up is
    > 1000 nats below the top (e.g. revealed tokens under SUBS) are deterministic in float64 and
    draw no noise; the rest draw `chunk` elements at a time. log_p (..., S) -> (...) long."""
    S = log_p.shape[-1]
    flat = log_p.reshape(-1, S)                                       # (R, S)
    out = flat.argmax(-1)                                             # (R,)
    todo = out[:0]                                                    # S = 1: nothing random
    if S > 1:
        top2 = flat.topk(2, dim=-1).values.double()
        todo = (top2[:, 0] - top2[:, 1] <= 1000).nonzero().squeeze(1)  # rows that are random
    rows = max(1, chunk // S)
    for i in range(0, todo.numel(), rows):
        idx = todo[i:i + rows]
        lp = flat[idx].double()
        u = torch.rand(lp.shape, generator=generator, dtype=torch.float64, device=lp.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        out[idx] = (lp + gumbel).argmax(-1)
    return out.view(log_p.shape[:-1])


def _per_row(t: Tensor, B: int, device) -> Tensor:
    """Broadcast a time given as a float or a (B,) tensor to a (B,) float64 tensor."""
    t = torch.as_tensor(t, dtype=torch.float64, device=device)
    return t.expand(B).clone() if t.dim() == 0 else t


# ---- Forward processes (independent across dimensions), one duck-typed interface -------------
#   transition(t, s)            Q_{t|s}: (B, S, S), row = from, column = to   (s = 0 by default)
#   add_noise(x0, t, g)         x_t ~ q_{t|0}(. | x0)                          (B, D) long
#   posterior(log_p0, x_t, t, s) p_{s|t}(x_s^d | x_t) from x0-predictions     (B, D, S) float64
#   step(log_p0, x_t, t, s, g)  one draw from that product posterior           (B, D) long
#   prior(B, D, g)              x_1 ~ the stationary / all-[MASK] distribution
#   final(log_p0, x_t)          the deterministic last NFE (argmax of p_{0|t}), if needs_final(x_t)


class CTMCProcess:
    """Time-inhomogeneous CTMC with generator beta(t) R per dimension (4)-(5); tauLDR's process,
    paper Sec. 5.1. Q_{t|s} = expm((beta_bar(t) - beta_bar(s)) R) in float64 (stable for any R),
    clamped at 0 and renormalised; times that repeat in a batch share one matrix exponential.
    Args: R (S, S) rate matrix (rows sum to 0); beta_bar: t (N,) -> integrated rate (N,);
    pi (S,) the distribution of x_1 (the stationary law of R); eps: the tauLDR regulariser."""

    def __init__(self, R: Tensor, beta_bar: Callable[[Tensor], Tensor], pi: Tensor,
                 eps: float = 1e-9):
        assert R.dim() == 2 and R.shape[0] == R.shape[1], f"R must be (S, S), got {tuple(R.shape)}"
        self.R, self.beta_bar, self.eps = R.double(), beta_bar, eps
        self.pi, self.S = pi.double() / pi.double().sum(), R.shape[0]

    def transition(self, t: Tensor, s: Optional[Tensor] = None) -> Tensor:
        t = _per_row(t, 1, self.R.device)                             # a float -> (1,)
        s = torch.zeros_like(t) if s is None else _per_row(s, t.numel(), self.R.device)
        dbeta = self.beta_bar(t) - self.beta_bar(s)                   # (B,)
        uniq, inv = torch.unique(dbeta, return_inverse=True)
        Q = torch.linalg.matrix_exp(uniq[:, None, None] * self.R).clamp_min(0.0)  # (U, S, S)
        return (Q / Q.sum(-1, keepdim=True))[inv]                      # (B, S, S)

    def to(self, device) -> "CTMCProcess":
        self.R, self.pi = self.R.to(device), self.pi.to(device)
        return self

    def add_noise(self, x0: Tensor, t: Tensor, generator=None) -> Tensor:
        B, D = x0.shape
        Q = self.transition(_per_row(t, B, x0.device))                # (B, S, S)
        rows = Q.gather(1, x0[:, :, None].expand(B, D, self.S))       # (B, D, S): Q_{t|0}(x0^d, .)
        return sample_categorical(rows.clamp_min(1e-300).log(), generator)

    def posterior(self, log_p0: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """p_{s|t}(b | x_t) = sum_a p0(a) Q_{s|0}(a->b) Q_{t|s}(b->x_t) / Q_{t|0}(a->x_t) (2)-(3);
        tauLDR's eps terms keep the division finite where Q_{t|0}(a->x_t) ~ 0.
        log_p0 (B, D, S); x_t (B, D); t, s (B,) or floats. Returns (B, D, S) float64."""
        B, D, S = log_p0.shape
        t, s = _per_row(t, B, x_t.device), _per_row(s, B, x_t.device)
        Q_t0, Q_s0, Q_ts = self.transition(t), self.transition(s), self.transition(t, s)
        idx = x_t[:, None, :].expand(B, S, D)
        to_xt_from_0 = Q_t0.gather(2, idx).transpose(1, 2) + self.eps  # (B, D, S) over a
        to_xt_from_s = Q_ts.gather(2, idx).transpose(1, 2) + self.eps  # (B, D, S) over b
        w = log_p0.double().softmax(-1) / to_xt_from_0                 # (B, D, S) over a
        post = torch.bmm(w, Q_s0 + self.eps) * to_xt_from_s + self.eps  # (B, D, S) over b
        return post / post.sum(-1, keepdim=True)

    def step(self, log_p0: Tensor, x_t: Tensor, t: Tensor, s: Tensor, generator=None) -> Tensor:
        return sample_categorical(self.posterior(log_p0, x_t, t, s).log(), generator)

    def prior(self, B: int, D: int, generator=None, device=None) -> Tensor:
        pi = self.pi if device is None else self.pi.to(device)
        return sample_categorical(pi.log().expand(B, D, self.S), generator)

    def final(self, log_p0: Tensor, x_t: Tensor) -> Tensor:
        return log_p0.argmax(-1)

    def needs_final(self, x_t: Tensor) -> bool:
        return True


class MaskedProcess:
    """Absorbing process: each token is [MASK] at time t with probability m(t) (6)-(8); paper
    Sec. 5.2 (MaskGIT) and 5.3 (MDLM). m: t (N,) -> mask probability (N,), increasing, m(0) = 0,
    m(1) = 1 (up to eps): MDLM's log-linear m(t) = (1 - eps) t, MaskGIT's arccos(1 - t) / (pi/2).
    Args: S states including [MASK]; mask_id (default S - 1)."""

    def __init__(self, S: int, m: Callable[[Tensor], Tensor], mask_id: Optional[int] = None):
        self.S, self.m = S, m
        self.mask_id = S - 1 if mask_id is None else mask_id

    def to(self, device) -> "MaskedProcess":
        return self

    def transition(self, t: Tensor, s: Optional[Tensor] = None) -> Tensor:
        dev = t.device if torch.is_tensor(t) else "cpu"
        t = _per_row(t, 1, dev)                                       # a float -> (1,)
        s = torch.zeros_like(t) if s is None else _per_row(s, t.numel(), dev)
        keep = (1 - self.m(t)) / (1 - self.m(s))                      # (B,) P(stay unmasked)
        Q = torch.diag_embed(keep[:, None].expand(-1, self.S).clone())
        Q[:, :, self.mask_id] = 1 - keep[:, None]
        Q[:, self.mask_id, :] = 0.0
        Q[:, self.mask_id, self.mask_id] = 1.0
        return Q                                                      # (B, S, S)

    def add_noise(self, x0: Tensor, t: Tensor, generator=None) -> Tensor:
        B, D = x0.shape
        m_t = self.m(_per_row(t, B, x0.device))                        # (B,)
        u = torch.rand(B, D, generator=generator, dtype=torch.float64, device=x0.device)
        return torch.where(u < m_t[:, None], torch.full_like(x0, self.mask_id), x0)

    def _unmask_prob(self, B: int, t, s, device) -> Tensor:
        m_t, m_s = self.m(_per_row(t, B, device)), self.m(_per_row(s, B, device))
        return (m_t - m_s) / m_t.clamp_min(1e-12)                      # (B,)

    def posterior(self, log_p0: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """Masked x_t^d: [MASK] w.p. m(s)/m(t), else v w.p. p0(v) (m(t) - m(s))/m(t); clean: kept.
        Mass that p0 puts on [MASK] (MaskGIT heads) stays on [MASK]. Returns (B, D, S) float64."""
        B, D, S = log_p0.shape
        r = self._unmask_prob(B, t, s, x_t.device)[:, None, None]     # (B, 1, 1)
        post = log_p0.double().softmax(-1) * r                       # (B, D, S)
        post[..., self.mask_id] += 1 - r[..., 0]
        clean = F.one_hot(x_t, S).double()                             # (B, D, S)
        return torch.where((x_t == self.mask_id)[..., None], post, clean)

    def step(self, log_p0: Tensor, x_t: Tensor, t: Tensor, s: Tensor, generator=None) -> Tensor:
        """Same law as `posterior`, drawn without building (B, D, S) float64: a Bernoulli decides
        which masked tokens unmask, then only those rows draw from p0 (cheap for S = 50258)."""
        B, D = x_t.shape
        r = self._unmask_prob(B, t, s, x_t.device)                     # (B,)
        u = torch.rand(B, D, generator=generator, dtype=torch.float64, device=x_t.device)
        reveal = (x_t == self.mask_id) & (u < r[:, None])              # (B, D)
        x_s = x_t.clone()
        x_s[reveal] = sample_categorical(log_p0[reveal], generator)
        return x_s

    def prior(self, B: int, D: int, generator=None, device=None) -> Tensor:
        return torch.full((B, D), self.mask_id, dtype=torch.long, device=device)

    def final(self, log_p0: Tensor, x_t: Tensor) -> Tensor:
        best = log_p0.index_fill(-1, torch.tensor([self.mask_id], device=log_p0.device),
                                 -float("inf")).argmax(-1)             # (B, D), never [MASK]
        return torch.where(x_t == self.mask_id, best, x_t)

    def needs_final(self, x_t: Tensor) -> bool:
        return bool((x_t == self.mask_id).any())


# ---- Mixture model (the student): p(x0 | x_t) = mean over lambda of a product over dims ------


def draw_lambda(n: int, k: int = 1, generator=None, device=None) -> Tensor:
    """lambda ~ U[0,1]^k, one row per network call (12; paper: mixture model). (n, k) float32."""
    return torch.rand(n, k, generator=generator, device=device)


def repeat_batch(x: Optional[Tensor], L: int) -> Optional[Tensor]:
    """Repeat every batch row L times, rows of one x_t adjacent: (B, ...) -> (B*L, ...)."""
    return None if x is None else x.repeat_interleave(L, dim=0)


def log_probs(logits: Tensor) -> Tensor:
    """log-softmax over states in float32, also under bf16 autocast."""
    return F.log_softmax(logits.float(), dim=-1)


def student_log_probs(student: Callable, x: Tensor, t: Tensor, L: int, lam_dim: int = 1,
                      generator=None, lam: Optional[Tensor] = None, cond=None) -> Tensor:
    """log p^{theta,d}_{0|t}(. | x_t; lambda_l) for L copies of each x_t, each with its own lambda
    (12)-(13; paper: mixture model). x (B, D); t (B,); lam (B*L, k) | None -> (B, L, D, S)."""
    B, D = x.shape
    lam = draw_lambda(B * L, lam_dim, generator, x.device) if lam is None else lam
    logits = student(repeat_batch(x, L), repeat_batch(t, L), lam, repeat_batch(cond, L))
    return log_probs(logits).view(B, L, D, -1)                         # (B, L, D, S)


def mixture_joint_loglik(log_p: Tensor, y: Tensor) -> Tensor:
    """J^(y) = logsumexp_l sum_d log p_l^d(y^d) - log L, the mixture log-likelihood (15; paper:
    method, estimation). log_p (B, L, D, S); y (B, D) or (B, M, D) long -> (B,) or (B, M)."""
    B, L, D, S = log_p.shape
    y3 = y[:, None] if y.dim() == 2 else y                             # (B, M, D)
    M = y3.shape[1]
    idx = y3[:, :, None, :, None].expand(B, M, L, D, 1)
    ll = log_p[:, None].expand(B, M, L, D, S).gather(-1, idx)[..., 0].sum(-1)  # (B, M, L)
    J = torch.logsumexp(ll, dim=-1) - math.log(L)                      # (B, M)
    return J.squeeze(1) if y.dim() == 2 else J


def mixture_marginal_logp(log_p: Tensor) -> Tensor:
    """log m^d(a) = logsumexp_l log p_l^d(a) - log L, per-dimension mixture marginals (16; paper:
    method, estimation). log_p (B, L, D, S) -> (B, D, S)."""
    return torch.logsumexp(log_p, dim=1) - math.log(log_p.shape[1])


def cv_loglik(log_p: Tensor, y: Tensor, control_variate: bool = True,
              log_m: Optional[Tensor] = None) -> Tensor:
    """C^(y) = J^(y) - sum_d log m^d(y^d), J^ minus its dimension-wise control variate (17; paper:
    method, control variate): E_pi[-C^] + sum_d KL(pi^d || m^d) + TC(pi) = KL(pi || p) (19); J^
    if not control_variate. log_m (B, D, S) to reuse; y (B, D) or (B, M, D) -> (B,) or (B, M)."""
    J = mixture_joint_loglik(log_p, y)
    if not control_variate:
        return J
    log_m = mixture_marginal_logp(log_p) if log_m is None else log_m    # (B, D, S)
    y3 = y[:, None] if y.dim() == 2 else y                             # (B, M, D)
    cv = log_m.gather(-1, y3.transpose(1, 2)).sum(1)                   # (B, M)
    return J - (cv.squeeze(1) if y.dim() == 2 else cv)


def marginal_kl(log_pi: Tensor, log_m: Tensor) -> Tensor:
    """K(pi || m) = sum_d sum_a pi^d(a) (log pi^d(a) - log m^d(a)), exact over S (18); states
    with pi = 0 add 0 even where log m = -inf (no NaN gradients). (..., D, S) -> (...)."""
    p = log_pi.exp()
    pos = p > 0
    diff = torch.where(pos, log_pi, 0.0) - torch.where(pos, log_m, 0.0)
    return (p * diff).sum((-1, -2))


# ---- Loss terms (each per x_t, shape (B,), summed over dimensions) (23)-(28) -----------------


def data_loss_cor(log_p_student: Tensor, x0: Tensor, control_variate: bool = True,
                  log_m: Optional[Tensor] = None) -> Tensor:
    """-C^(x0) for real data x0 (23; paper: method, losses); -J^(x0) without control variate."""
    return -cv_loglik(log_p_student, x0, control_variate, log_m)


def data_loss_indep(log_p_teacher: Tensor, log_m: Tensor) -> Tensor:
    """K(p^psi_{0|t} || m^), the teacher's marginals for the data's (24; paper: method, losses)."""
    return marginal_kl(log_p_teacher, log_m)


def consis_loss_cor(log_p_student: Tensor, y: Tensor, control_variate: bool = True,
                    log_m: Optional[Tensor] = None) -> Tensor:
    """-(1/L) sum_i C^(y_i), y_i ~ p^theta_{0|u}(.|x_u^(i)), x_u^(i) ~ p^psi_{u|t}(.|x_t) (25;
    paper: method, losses). y: (B, L, D). Returns (B,)."""
    return -cv_loglik(log_p_student, y, control_variate, log_m).mean(1)


def consis_loss_indep(log_p_target: Tensor, log_m: Tensor) -> Tensor:
    """K(m-bar' || m^), m-bar' = (1/L) sum_i p^theta_{0|u}(.|x_u^(i); lambda'_i), detached (26;
    paper: method, losses). (B,)"""
    return marginal_kl(mixture_marginal_logp(log_p_target).detach(), log_m)


def distil_loss(log_p_teacher: Tensor, log_p_student: Tensor) -> Tensor:
    """(1/L) sum_l sum_d KL(p^{psi,d}_{0|tau} || p^{theta,d}_{0|tau}(.; lambda_l)) (27; paper:
    method, losses), a bound on KL(teacher || mixture). (B, D, S), (B, L, D, S) -> (B,)."""
    return marginal_kl(log_p_teacher[:, None], log_p_student).mean(1)


def alpha_t(t: Tensor, const: float = 1.0) -> Tensor:
    """Weight of data_loss_cor, const sigmoid(20 (t - 1/2)) (28; authors' code for Sec. 5.1-5.3)."""
    return const * torch.sigmoid(20 * (t - 0.5))


VARIANTS = ("tauldr", "maskgit", "sdtt")


def variant_weights(variant: str, t: Tensor, delta: float = 0.0,
                    alpha_const: Optional[float] = None) -> dict:
    """Per-row weights of the Di4C terms in the paper's variants (30)-(33): tauldr (Sec. 5.1)
    distils on a separate small-time x_tau, consistency everywhere, alpha_const 1; maskgit (5.2)
    reuses x_t, distil 1[t <= delta] / delta, consistency where t > delta, alpha_const 0.1
    ("di4c-d"; 0 is "di4c"); sdtt (5.3) reuses x_t, distil 1[t < delta], consistency where
    t >= delta, alpha_const 0.1. Returns {"distil", "consis", "alpha": (B,), "distil_on"}."""
    a = {"tauldr": 1.0, "maskgit": 0.1, "sdtt": 0.1}.get(variant)
    if a is None:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant != "tauldr" and not 0 < delta < 1:
        raise ValueError(f"variant {variant!r} needs 0 < delta < 1, got {delta}")
    alpha = alpha_t(t, a if alpha_const is None else alpha_const)
    if variant == "tauldr":
        return dict(distil=torch.ones_like(t), consis=torch.ones_like(t), alpha=alpha,
                    distil_on="tau")
    near = (t <= delta) if variant == "maskgit" else (t < delta)
    scale = 1 / delta if variant == "maskgit" else 1.0
    return dict(distil=near.float() * scale, consis=(~near).float(), alpha=alpha, distil_on="x_t")


# ---- Teachers (product or mixture, multi-round) and the student's initialisation -------------


def make_teacher(teacher: Callable, step: Callable, lam_dim: int = 0, L: int = 16) -> tuple:
    """(teacher_marginal, teacher_step) for di4c_loss from a denoiser and its sampler's step
    (24)-(26), (35); a mixture teacher (lam_dim > 0) is the paper's multi-round "di4c^2" (Sec. 5.3).
    step(log_p0 (N, D, S), x_t (N, D), t, u, g) -> x_u: e.g. process.step or MaskGIT's step.
    teacher_marginal(x, t, cond, g) -> log p^psi_{0|t} (N, D, S) (a mixture's: L-lambda average).
    teacher_step(x_t, t, u, log_p0, cond, g) -> x_u (N, D): `step` on log_p0 (product teacher)
    or on a fresh lambda per row (mixture teacher)."""
    @torch.no_grad()
    def teacher_marginal(x, t, cond=None, generator=None):
        if lam_dim == 0:
            return log_probs(teacher(x, t, None, cond))
        return mixture_marginal_logp(student_log_probs(teacher, x, t, L, lam_dim, generator,
                                                       cond=cond))

    @torch.no_grad()
    def teacher_step(x_t, t, u, log_p0, cond=None, generator=None):
        if lam_dim > 0:
            lam = draw_lambda(x_t.shape[0], lam_dim, generator, x_t.device)
            log_p0 = log_probs(teacher(x_t, t, lam, cond))
        return step(log_p0, x_t, t, u, generator)

    return teacher_marginal, teacher_step


def is_lam_param(name: str) -> bool:
    """The lambda path of a student (14; ours): every parameter with a "lam_*" name component."""
    return any(part.startswith("lam_") for part in name.split("."))


def lam_param_groups(model: nn.Module, lr: float, mult: float = 1.0) -> list:
    """Optimizer groups: lr for the network, lr * mult for the lambda path (14; ours, the paper
    uses one rate): all components start equal, where correlation gradients vanish, and larger
    lambda steps leave that point sooner. A schedule sets group["lr"] = lr_now * group["mult"]."""
    named = list(model.named_parameters())
    rest = [p for n, p in named if not is_lam_param(n)]
    lam = [p for n, p in named if is_lam_param(n)]
    groups = (dict(params=rest, lr=lr, mult=1.0), dict(params=lam, lr=lr * mult, mult=mult))
    return [g for g in groups if g["params"]]


def student_from_teacher(student: nn.Module, teacher_state: dict) -> nn.Module:
    """Load the teacher's weights into a student strictly; its lambda path stays fresh, so the
    student starts equal to the teacher (14; ours, the authors start from a random lambda token).
    Every non-lambda key must come from the teacher with its shape; the teacher may have no key
    the student lacks (a round-1 student as teacher passes on its lambda path). Raises ValueError
    naming the offending keys. Returns the student."""
    own = student.state_dict()
    need = {k for k in own if not is_lam_param(k)}
    missing, unexpected = sorted(need - set(teacher_state)), sorted(set(teacher_state) - set(own))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in teacher_state.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"teacher weights do not fit the student: missing {missing[:8]} "
                         f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)}), "
                         f"shapes (teacher vs student) {shapes[:8]}")
    student.load_state_dict({**own, **teacher_state})
    return student


def eval_target(net: nn.Module) -> Callable:
    """The student as the consistency target at u (25)-(26): eval mode (no dropout), no grad, mode
    restored (docs/method.md §6); DDP / torch.compile wrappers are removed (no sync, no graph)."""
    for _ in range(2):                                     # DDP(compile(net)), compile(DDP(net))
        net = getattr(net, "_orig_mod", net)
        net = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net

    @torch.no_grad()
    def target(x, t, lam, cond=None):
        if not isinstance(net, nn.Module):                 # a plain function has no mode
            return net(x, t, lam, cond)
        mode = net.training
        net.eval()
        try:
            return net(x, t, lam, cond)
        finally:
            net.train(mode)
    return target


# ---- One Di4C training objective, shared by the three variants (29) --------------------------


def di4c_loss(student: Callable, x0: Tensor, x_t: Tensor, t: Tensor, u: Tensor, *,
              weights: dict, teacher_marginal: Callable, teacher_step: Callable, L: int = 16,
              lam_dim: int = 1, cond=None, x_tau: Optional[Tensor] = None,
              tau: Optional[Tensor] = None, control_variate: bool = True, generator=None) -> tuple:
    """Di4C loss per x_t (29), the paper's objective (method: losses; Sec. 5.1-5.3 variants):
        w_distil distil + alpha data_cor + data_indep + w_consis (consis_cor + consis_indep).
    weights: variant_weights(...) or a dict of that form; distil_on "tau" needs x_tau, tau (a
    separate small-time sample). Only the student at (x_t, t) and (x_tau, tau) gets gradients
    (docs/method.md §6); the teacher, x_u, y and the target at (x_u, u) run under no_grad. The L
    lambdas at t serve data and consistency terms. Every term is computed for every row (no
    host-device sync; zero weights switch terms off); without the control variate the
    correlation terms are -J^ and the marginal ones 0. x0, x_t (B, D) long; t, u (B,), u < t.
    Returns (loss (B,), terms: dict of detached (B,) tensors, unweighted)."""
    B = x_t.shape[0]
    if (weights["distil_on"] == "tau") != (x_tau is not None and tau is not None):
        raise ValueError(f"distil_on={weights['distil_on']!r} needs x_tau and tau exactly when "
                         "it is 'tau'")
    target = eval_target(student)
    cv, zero = control_variate, torch.zeros(B, device=x_t.device)

    if x_tau is None:
        log_p_s = student_log_probs(student, x_t, t, L, lam_dim, generator, cond=cond)
    else:                  # one student call for x_t and x_tau rows (DDP-friendly, one graph)
        both = student_log_probs(student, torch.cat([x_t, x_tau]), torch.cat([t, tau]), L, lam_dim,
                                 generator, cond=None if cond is None else torch.cat([cond, cond]))
        log_p_s, log_p_s_tau = both[:B], both[B:]                       # (B, L, D, S) each
    log_m = mixture_marginal_logp(log_p_s)                              # (B, D, S)
    log_p_T = teacher_marginal(x_t, t, cond, generator)                 # (B, D, S)
    terms = {"data_cor": data_loss_cor(log_p_s, x0, cv, log_m),
             "data_indep": data_loss_indep(log_p_T, log_m) if cv else zero}

    with torch.no_grad():
        x_u = teacher_step(repeat_batch(x_t, L), repeat_batch(t, L), repeat_batch(u, L),
                           repeat_batch(log_p_T, L), repeat_batch(cond, L), generator)
        lam_u = draw_lambda(B * L, lam_dim, generator, x_t.device)
        log_p_u = log_probs(target(x_u, repeat_batch(u, L), lam_u, repeat_batch(cond, L)))
        log_p_u = log_p_u.view(log_p_s.shape)                           # (B, L, D, S)
        y = sample_categorical(log_p_u, generator)                      # (B, L, D)
    terms["consis_cor"] = consis_loss_cor(log_p_s, y, cv, log_m)
    terms["consis_indep"] = consis_loss_indep(log_p_u, log_m) if cv else zero

    if x_tau is not None:
        terms["distil"] = distil_loss(teacher_marginal(x_tau, tau, cond, generator), log_p_s_tau)
    else:
        terms["distil"] = distil_loss(log_p_T, log_p_s)
    w = weights
    loss = (w["distil"] * terms["distil"] + w["alpha"] * terms["data_cor"] + terms["data_indep"]
            + w["consis"] * (terms["consis_cor"] + terms["consis_indep"]))
    return loss, {k: v.detach() for k, v in terms.items()}


# ---- Samplers (37) ---------------------------------------------------------------------------


@torch.no_grad()
def ancestral_sample(process, x_T: Tensor, times: Tensor, denoiser: Callable, *,
                     lam_dim: int = 0, cond=None, teacher: Optional[Callable] = None,
                     n_teacher: int = 0, teacher_lam_dim: int = 0, final_nfe: bool = True,
                     reuse_unchanged: bool = False, generator=None) -> tuple:
    """N-step ancestral sampling with the analytic product step, mixture and hybrid (37)-(38);
    paper Sec. 5.1 (tauLDR's sampler) and 5.3 (MDLM's). times (K+1,) decreasing: NFE k < K runs
    the network at t_k and draws x_{t_{k+1}}; with final_nfe (if process.needs_final) one more
    at t_K returns process.final (tauLDR: times = linspace(1, 0.01, N), MDLM: linspace(1, 1e-5,
    N + 1)). A mixture (lam_dim > 0) draws a fresh lambda per sample per NFE; the last n_teacher
    NFEs use `teacher` (teacher_lam_dim > 0: multi-round); reuse_unchanged re-runs a product
    network without time input on changed rows only. Returns (x_0 (B, D) long, NFEs)."""
    B, K = x_T.shape[0], times.numel() - 1
    n_total = K + int(final_nfe)
    x, nfe, cache = x_T, 0, None
    for k in range(n_total):
        if k == K and not process.needs_final(x):
            break
        net, dim = ((teacher, teacher_lam_dim) if k >= n_total - n_teacher else (denoiser, lam_dim))
        t_k = times[k].expand(B).to(x.device)
        if reuse_unchanged and dim == 0 and cache is not None and cache[0] is net:
            changed = (x != cache[1]).any(1)                                   # (B,) rows to redo
            log_p0 = cache[2]                                                  # updated in place
            if bool(changed.any()):
                c = None if cond is None else cond[changed]
                log_p0[changed] = log_probs(net(x[changed], t_k[changed], None, c))
                nfe += 1
        else:
            lam = draw_lambda(B, dim, generator, x.device) if dim > 0 else None   # (B, dim)
            log_p0 = log_probs(net(x, t_k, lam, cond))                        # (B, D, S)
            nfe += 1
        cache = (net, x, log_p0)
        if k == K:
            return process.final(log_p0, x), nfe
        x = process.step(log_p0, x, t_k, times[k + 1].expand(B).to(x.device), generator)
    return x, nfe
