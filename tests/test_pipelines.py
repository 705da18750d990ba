"""Contract tests of the three scripts' Di4C wiring: what each script hands the core.

The core is pinned by test_core_exact.py and test_core_contracts.py; these tests pin the script
side, with recording wrappers around core.di4c_loss, the processes and the networks:
- the times each script draws (t, u, tau, delta) follow its variant's law (docs/method.md
  (30)-(34)): Kolmogorov-Smirnov or chi-square tests, fixed seeds, significance 0.001;
- x_t (and x_tau) are the data noised at exactly those times; the teacher's step goes from t to
  exactly u; the per-row weights are the variant's for those times;
- labels (with the CFG-dropped ones) reach every network call of the image Di4C step, prefixes
  every NFE of a conditional text sample;
- the image sampler's CFG combination equals its formula on networks with known outputs (the
  default sampler and --lfg), the pixel hybrid hands exactly its last NFEs to the teacher;
- the control's length matches the Di4C run's compute, counted in network rows as they run.
tests/mutate.py plants one bug of each class in each script and checks that these tests fail.
"""
import dataclasses
import math
import os

import numpy as np
import pytest
import torch

import cifar10_gaussian as cifar
import di4c_core as core
import imagenet_masked as imagenet
import owt_masked as owt
from tests.test_owt import ctx_for, smoke_cfg

N_LAW = 20_000                                   # rows for the law tests


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ks_stat(x: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between the sample x and the continuous cdf."""
    x = x.double().sort().values
    n, F = x.numel(), cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - F).max().item(), (F - (i - 1) / n).max().item())


def ks_ok(x, cdf) -> bool:
    """KS test at significance 0.001 (critical value 1.95 / sqrt(n))."""
    return ks_stat(x, cdf) < 1.95 / math.sqrt(x.numel())


def uniform_cdf(lo, hi):
    return lambda v: ((v - lo) / (hi - lo)).clamp(0, 1)


def binomial_ok(hits: int, n: int, p: float) -> bool:
    """|hits - n p| within 4 standard deviations."""
    return abs(hits - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1e-9


class Record:
    """Replaces core.di4c_loss: records its arguments; calls the real one, or returns zeros."""

    def __init__(self, real=None, wrap_step=False):
        self.calls, self.steps, self.real, self.wrap_step = [], [], real, wrap_step

    def __call__(self, student, x0, x_t, t, u, **kw):
        self.calls.append(dict(x0=x0, x_t=x_t, t=t, u=u, **kw))
        if self.wrap_step:
            step = kw["teacher_step"]

            def recorded_step(x, t_, u_, *a):
                out = step(x, t_, u_, *a)
                self.steps.append(dict(x=x, t=t_, u=u_, out=out))
                return out
            kw = {**kw, "teacher_step": recorded_step}
        if self.real is None:
            return torch.zeros(x_t.shape[0]), {}
        return self.real(student, x0, x_t, t, u, **kw)


def record_noise(monkeypatch, process) -> list:
    """process.add_noise, recording (x0, t, x_t) of every call."""
    seen, real = [], process.add_noise

    def add_noise(x0, t, generator=None):
        out = real(x0, t, generator)
        seen.append((x0, t.detach().clone(), out))
        return out
    monkeypatch.setattr(process, "add_noise", add_noise)
    return seen


def noised_at(seen: list, x0, t, x_t) -> bool:
    """x_t is the output of a recorded add_noise(x0, t) call."""
    return any(out is x_t and torch.equal(tt, t) and torch.equal(a, x0) for a, tt, out in seen)


def record_calls(net) -> list:
    """Wraps net.forward: records (rows, t, lam, cond, grad enabled) of every call."""
    calls, real = [], net.forward

    def forward(x, t=None, lam=None, cond=None, *a, **k):
        calls.append(dict(x=x.detach().clone(), t=None if t is None else t.detach().clone(),
                          lam=None if lam is None else lam.detach().clone(),
                          cond=None if cond is None else cond.detach().clone(),
                          grad=torch.is_grad_enabled()))
        return real(x, t, lam, cond, *a, **k)
    net.forward = forward
    return calls


def perturb(net):
    """Moves every weight off its initialisation (zero-initialised lambda paths included)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))


def sigmoid_alpha(t, const):
    return const * torch.sigmoid(20 * (t - 0.5))


def row_cost(calls: list) -> int:
    """Network rows of a step: a forward with gradients counts 3 (forward and backward), one
    without counts 1 (the convention of the control's compute matching)."""
    return sum(c["x"].shape[0] * (3 if c["grad"] else 1) for c in calls)


# -----------------------------------------------------------------------------
# cifar10_gaussian.py: the tauLDR variant


def cifar_setup(**kw):
    cfg = cifar.make_config(cifar.Config, preset="smoke", **kw)
    proc = cifar.build_process(cfg, "cpu")
    torch.manual_seed(0)
    teacher = cifar.build_unet(cfg, 1, 8, lam=0).eval().requires_grad_(False)
    perturb(teacher)
    student = cifar.student_from_teacher(teacher, cfg).train()
    return cfg, proc, teacher, student


def test_cifar_di4c_times_noise_and_weights_follow_the_tauldr_variant(monkeypatch):
    """delta ~ LogU[1e-3, 1e-2], t | delta ~ U[MIN_TIME + delta, 1], u = t - delta; tau =
    MIN_TIME w.p. 1/2, else U[MIN_TIME, MIN_TIME + 0.01]; x_t and x_tau noised at t and tau;
    weights distil = 1, consis = 1, alpha = alpha_const sigmoid(20 (t - 1/2)), distillation on
    x_tau; L, lambda dimension and the control-variate switch (on by default) passed through."""
    cfg, proc, teacher, student = cifar_setup(alpha_const=0.37)
    min_time = cifar.MIN_TIME
    seen, rec = record_noise(monkeypatch, proc), Record()
    monkeypatch.setattr(core, "di4c_loss", rec)
    x0 = torch.randint(0, cfg.S, (N_LAW, 64), generator=gen(1))
    cifar.di4c_step(student, student, core.make_teacher(teacher, proc.step, 0, cfg.L), proc, x0, cfg,
                    gen(2))
    (c,) = rec.calls
    t, u, tau = c["t"].double(), c["u"].double(), c["tau"]
    delta = t - u
    assert ks_ok(delta.log10(), uniform_cdf(-3, -2))
    assert ks_ok((t - min_time - delta) / (1 - min_time - delta), uniform_cdf(0, 1))
    at_min = tau == torch.tensor(min_time, dtype=tau.dtype)
    assert binomial_ok(int(at_min.sum()), N_LAW, 0.5)
    assert ks_ok(tau[~at_min] - min_time, uniform_cdf(0, 0.01))
    assert torch.equal(c["x0"], x0)
    assert noised_at(seen, x0, c["t"], c["x_t"]) and noised_at(seen, x0, tau, c["x_tau"])
    w = c["weights"]
    assert w["distil_on"] == "tau"
    torch.testing.assert_close(w["distil"], torch.ones_like(c["t"]))
    torch.testing.assert_close(w["consis"], torch.ones_like(c["t"]))
    torch.testing.assert_close(w["alpha"], sigmoid_alpha(c["t"], 0.37))
    assert (c["L"], c["lam_dim"], c["control_variate"]) == (cfg.L, student.lam_dim, True)
    cfg = cifar.parse_config(cifar.Config, ["--preset", "smoke", "--control_variate", "false"])
    cifar.di4c_step(student, student, core.make_teacher(teacher, proc.step, 0, cfg.L), proc, x0, cfg,
                    gen(2))
    assert rec.calls[-1]["control_variate"] is False


def test_cifar_stage_distill_wires_the_teacher_and_its_step_from_t_to_u(tmp_path, monkeypatch):
    """stage_distill on a trained smoke teacher, the real core.di4c_loss recorded: the teacher
    marginal handed to the core is the loaded teacher's, its step starts at x_t, t and goes to
    exactly u (the law test pins u); the graph student is the network fit trains."""
    cfg = cifar.make_config(cifar.Config, preset="smoke", out_dir=str(tmp_path), distil_iters=1,
                            control_iters=0)
    images = cifar.load_images(cfg)
    proc = cifar.build_process(cfg, "cpu")
    os.makedirs(cfg.out_dir, exist_ok=True)
    ctx = cifar.Ctx(0, 1, torch.device("cpu"), cfg.out_dir, "float32")
    cifar.stage_teacher(cfg, ctx, images, proc)
    rec = Record(real=core.di4c_loss, wrap_step=True)
    monkeypatch.setattr(core, "di4c_loss", rec)
    cifar.stage_distill(cfg, ctx, images, proc)
    (c,), L = rec.calls, cfg.L
    teacher, _ = cifar.load_net(cfg, "teacher", 1, 8, False, ctx.device)
    x, t = c["x_t"], c["t"]
    torch.testing.assert_close(c["teacher_marginal"](x, t), core.log_probs(teacher(x, t)))
    (s,) = rec.steps
    assert torch.equal(s["x"], core.repeat_batch(x, L))
    assert torch.equal(s["t"], core.repeat_batch(t, L))
    assert torch.equal(s["u"], core.repeat_batch(c["u"], L))
    assert (s["u"] < s["t"]).all()


def test_cifar_hybrid_hands_exactly_the_last_nfes_to_the_teacher():
    """sample_images with n_teacher = 2 of 5 NFEs: the student runs at the first 3 times of
    linspace(1, MIN_TIME, 5) with a lambda, the teacher at the last 2 without; sampler_runs
    labels hybrid@N with hybrid_teacher_steps teacher NFEs for every student N above it."""
    cfg, proc, teacher, student = cifar_setup(hybrid_teacher_steps=2)
    s_calls, t_calls = record_calls(student.eval()), record_calls(teacher)
    _, nfe = cifar.sample_images(student, proc, cfg, 5, 3, teacher=teacher, n_teacher=2)
    times = torch.linspace(1, cifar.MIN_TIME, 5)
    assert nfe == 5 and len(s_calls) == 3 and len(t_calls) == 2
    assert [c["t"][0].item() for c in s_calls + t_calls] == times.tolist()
    assert all(c["lam"] is not None for c in s_calls) and all(c["lam"] is None for c in t_calls)
    cfg = cifar.make_config(cifar.Config, preset="smoke", student_steps=(2, 4, 8),
                            hybrid_teacher_steps=3)
    hybrid = [r for r in cifar.sampler_runs(cfg) if r[0].startswith("hybrid")]
    assert hybrid == [("hybrid@4", "student", 4, 3), ("hybrid@8", "student", 8, 3)]


def test_cifar_stage_sample_runs_the_hybrid_with_the_teacher(tmp_path, monkeypatch):
    """stage_sample hands core.ancestral_sample the student as denoiser and the loaded teacher
    with hybrid_teacher_steps NFEs for every hybrid set, no teacher NFE for the others."""
    cfg = cifar.make_config(cifar.Config, preset="smoke", out_dir=str(tmp_path),
                            student_steps=(2, 4), hybrid_teacher_steps=1, n_samples=4,
                            sample_batch=4, control_iters=0, teacher_iters=1, distil_iters=1)
    cifar.main(dataclasses.replace(cfg, stage="teacher"))
    cifar.main(dataclasses.replace(cfg, stage="distill"))
    seen, real = [], core.ancestral_sample

    def ancestral_sample(process, x_T, times, denoiser, **kw):
        seen.append(dict(denoiser=denoiser, steps=times.numel(), **kw))
        return real(process, x_T, times, denoiser, **kw)
    monkeypatch.setattr(core, "ancestral_sample", ancestral_sample)
    cifar.main(dataclasses.replace(cfg, stage="sample"))
    runs = cifar.sampler_runs(cfg)
    assert len(seen) == len(runs)
    kinds = {}
    for (label, name, n, n_teacher), call in zip(runs, seen):
        assert call["steps"] == n and call["n_teacher"] == n_teacher, label
        kinds.setdefault(name, set()).add(id(call["denoiser"]))
        if n_teacher:
            assert call["teacher"] is not call["denoiser"]
            assert id(call["teacher"]) in kinds["teacher"], label
    assert {n for _, _, _, n in runs} == {0, 1} and len(kinds["student"]) == 1
    assert kinds["student"].isdisjoint(kinds["teacher"])


def test_cifar_control_length_matches_the_di4c_compute(monkeypatch):
    """control_steps (-1) = ceil(distil_iters x rows of a Di4C step / rows of a teacher-loss
    step), the rows counted on the networks as they run (3 per row with gradients, 1 without)."""
    cfg, proc, teacher, student = cifar_setup(distil_iters=50, control_iters=-1)
    s_calls, t_calls = record_calls(student), record_calls(teacher)
    x0 = torch.randint(0, cfg.S, (cfg.batch_size, 64), generator=gen(0))
    loss, _ = cifar.di4c_step(student, student, core.make_teacher(teacher, proc.step, 0, cfg.L), proc,
                              x0, cfg, gen(1))
    loss.sum().backward()
    di4c_rows = row_cost(s_calls) + row_cost(t_calls)
    control = cifar.build_unet(cfg, 1, 8, lam=0)
    c_calls = record_calls(control)
    x0 = torch.randint(0, cfg.S, (cfg.teacher_batch, 64), generator=gen(2))
    loss, _ = cifar.teacher_objective(cfg, proc)(control, (x0,), gen(3))
    loss.sum().backward()
    assert cifar.control_steps(cfg) == math.ceil(50 * di4c_rows / row_cost(c_calls))


# -----------------------------------------------------------------------------
# imagenet_masked.py: the MaskGIT variant


META = dict(K=17, grid=8, n_classes=5)


def imagenet_setup(lam_T=0, **kw):
    cfg = imagenet.make_config(imagenet.Config, preset="smoke", **kw)
    process = imagenet.make_process(META)
    torch.manual_seed(0)
    teacher = imagenet.build_model(cfg, META, lam_dim=lam_T).eval().requires_grad_(False)
    perturb(teacher)
    student = imagenet.build_model(cfg, META, lam_dim=1)
    student.load_state_dict(teacher.state_dict(), strict=False)
    return cfg, process, teacher, student


def imagenet_batch(n, seed=0):
    x0 = torch.randint(0, META["K"], (n, 64), generator=gen(seed))
    return x0, torch.randint(0, META["n_classes"], (n,), generator=gen(seed + 1))


@pytest.mark.parametrize("data_term", [True, False])
def test_imagenet_di4c_times_labels_noise_and_weights(monkeypatch, data_term):
    """t ~ U(0, 1), u = max(t - R_DELTA, 0); labels dropped to n_classes w.p. LABEL_DROP and
    passed as cond; x_t masked at t; distil = 1[t <= R_DELTA] / R_DELTA, consis =
    1[t > R_DELTA], alpha = alpha_const sigmoid(20 (t - 1/2)) ("di4c-d") or 0 ("di4c")."""
    monkeypatch.setattr(imagenet, "R_DELTA", 0.2)
    monkeypatch.setattr(imagenet, "LABEL_DROP", 0.25)
    cfg, process, teacher, student = imagenet_setup(alpha_const=0.3 if data_term else 0.0)
    seen, rec = record_noise(monkeypatch, process), Record()
    monkeypatch.setattr(core, "di4c_loss", rec)
    x0, y = imagenet_batch(N_LAW)
    imagenet.di4c_loss(cfg, teacher, student, process, META["n_classes"])(student, (x0, y), gen(2))
    (c,) = rec.calls
    t, u, cond = c["t"], c["u"], c["cond"]
    assert ks_ok(t, uniform_cdf(0, 1))
    assert torch.equal(u, (t - 0.2).clamp_min(0))
    dropped = cond == META["n_classes"]
    assert binomial_ok(int(dropped.sum()), N_LAW, 0.25)
    assert torch.equal(cond[~dropped], y[~dropped])
    assert torch.equal(c["x0"], x0) and noised_at(seen, x0, t, c["x_t"])
    w = c["weights"]
    assert w["distil_on"] == "x_t"
    torch.testing.assert_close(w["distil"], (t <= 0.2).float() / 0.2)
    torch.testing.assert_close(w["consis"], (t > 0.2).float())
    torch.testing.assert_close(w["alpha"], sigmoid_alpha(t, 0.3) * data_term)
    assert (c["L"], c["lam_dim"]) == (cfg.L, student.lam_dim)


@pytest.mark.parametrize("lam_T", [0, 1])
def test_imagenet_labels_reach_every_call_and_the_teacher_steps_to_u(monkeypatch, lam_T):
    """The real Di4C step of a product (lam_T 0) and a mixture teacher (1, another round):
    every network call (student at x_t, no-grad target at u, teacher marginal, teacher step)
    gets the dropped labels of its rows; the teacher's confidence step from t to u leaves
    exactly D - floor((1 - gamma(1 - u)) D) tokens masked (or all that were), keeps every
    revealed token and reveals only masked ones."""
    monkeypatch.setattr(imagenet, "R_DELTA", 0.3)
    monkeypatch.setattr(imagenet, "LABEL_DROP", 0.5)
    cfg, process, teacher, student = imagenet_setup(lam_T)
    s_calls, t_calls = record_calls(student), record_calls(teacher)
    rec = Record(real=core.di4c_loss, wrap_step=True)
    monkeypatch.setattr(core, "di4c_loss", rec)
    x0, y = imagenet_batch(8)
    loss, _ = imagenet.di4c_loss(cfg, teacher, student, process, META["n_classes"], lam_T)(
        student, (x0, y), gen(4))
    (c,), L, B = rec.calls, cfg.L, 8
    cond = c["cond"]
    assert (cond == META["n_classes"]).any() and (cond != META["n_classes"]).any()
    for call in s_calls + t_calls:
        want = cond if call["x"].shape[0] == B else core.repeat_batch(cond, L)
        assert call["cond"] is not None and torch.equal(call["cond"], want)
    assert len(s_calls) == 2 and len(t_calls) == 1 + bool(lam_T)   # + the mixture's step
    (s,) = rec.steps
    assert torch.equal(s["u"], core.repeat_batch(c["u"], L))
    assert torch.equal(s["t"], core.repeat_batch(c["t"], L))
    K, D = META["K"], 64
    masked_in, masked_out = (s["x"] == K).sum(1), (s["out"] == K).sum(1)
    gamma_u = torch.arccos((1 - s["u"].double()).clamp(0, 1)) / (math.pi / 2)
    want = torch.minimum(masked_in, D - ((1 - gamma_u) * D).floor().long())
    assert torch.equal(masked_out, want)
    assert (masked_out < masked_in).any()
    revealed = s["x"] != K
    assert torch.equal(s["out"][revealed], s["x"][revealed]) and (s["out"] < K).sum() > 0


class KnownNet(torch.nn.Module):
    """A MaskTransformer stand-in with known logits: A for a class label, U for the dropped
    label (index n_classes), whatever x and lambda are."""

    def __init__(self, seed, D=12, K=6, n_classes=3):
        super().__init__()
        self.D, self.K, self.n_classes = D, K, n_classes
        g = gen(seed)
        self.A, self.U = torch.randn(D, K + 1, generator=g), torch.randn(D, K + 1, generator=g)

    def forward(self, x, t=None, lam=None, y=None):
        dropped = (y == self.n_classes)[:, None, None]
        return torch.where(dropped, self.U, self.A).expand(x.shape[0], -1, -1).clone()


@pytest.mark.parametrize("lfg", [False, True])
def test_imagenet_cfg_combination_equals_its_formula(tmp_path, monkeypatch, lfg):
    """generate (the default sampler) on networks with known outputs: at step k of N the
    reveal gets log_softmax(SM_TEMP ((1 + w_k) A - w_k U)), w_k = w k / (N - 1), where U is the
    net's own dropped-label output, or with --lfg the teacher's (the student's dropped branch
    is then never run); both branches of a student share one lambda per step."""
    monkeypatch.setattr(imagenet, "SM_TEMP", 0.7)
    cfg = imagenet.make_config(imagenet.Config, preset="smoke", lfg=lfg)
    net, teacher = KnownNet(0), KnownNet(1)
    calls, t_calls = record_calls(net), record_calls(teacher)
    seen, real = [], imagenet.confidence_reveal

    def confidence_reveal(x, log_p, n, noise, mask_id, generator=None):
        seen.append(log_p.clone())
        return real(x, log_p, n, noise, mask_id, generator)
    monkeypatch.setattr(imagenet, "confidence_reveal", confidence_reveal)
    ctx = imagenet.Ctx(0, 1, torch.device("cpu"), str(tmp_path), "float32")
    y, w, N = torch.tensor([0, 2, 1]), 2.5, 4
    imagenet.generate(cfg, ctx, net, 1, y, N, w, teacher if lfg else None)
    assert len(seen) == N
    U = teacher.U if lfg else net.U
    for k, log_p in enumerate(seen):
        w_k = w * k / (N - 1)
        want = torch.log_softmax(0.7 * ((1 + w_k) * net.A - w_k * U), -1)
        torch.testing.assert_close(log_p, want.expand_as(log_p))
    dropped = [c for c in calls if (c["cond"] == net.n_classes).all()]
    assert len(dropped) == (0 if lfg else N - 1)
    assert len(t_calls) == (N - 1 if lfg else 0)
    assert all(c["lam"] is None for c in t_calls)
    if not lfg:                    # the two branches of step k share the student's lambda
        cond_calls = [c for c in calls if (c["cond"] != net.n_classes).all()]
        for a, b in zip(cond_calls[1:], dropped):
            assert torch.equal(a["lam"], b["lam"])


def test_imagenet_control_length_matches_the_di4c_compute():
    """control_steps (-1) against the rows counted on the networks of one Di4C step and one
    MaskGIT-loss step."""
    cfg, process, teacher, student = imagenet_setup(distil_iters=50, control_iters=-1)
    s_calls, t_calls = record_calls(student), record_calls(teacher)
    x0, y = imagenet_batch(cfg.distil_batch)
    loss, _ = imagenet.di4c_loss(cfg, teacher, student, process, META["n_classes"])(
        student, (x0, y), gen(1))
    loss.sum().backward()
    di4c_rows = row_cost(s_calls) + row_cost(t_calls)
    control = imagenet.build_model(cfg, META)
    c_calls = record_calls(control)
    loss, _ = imagenet.maskgit_loss(cfg, process, META["n_classes"])(
        control, imagenet_batch(cfg.batch_size, 5), gen(2))
    loss.sum().backward()
    assert imagenet.control_steps(cfg) == math.ceil(50 * di4c_rows / row_cost(c_calls))


# -----------------------------------------------------------------------------
# owt_masked.py: the SDTT variant


def owt_setup(lam_T=0, S=40, **kw):
    cfg = owt.make_config(owt.Config, preset="smoke", **kw)
    process = owt.make_process(S)
    torch.manual_seed(0)
    teacher = owt.build_model(cfg, S, lam_dim=lam_T).eval().requires_grad_(False)
    perturb(teacher)
    student = core.student_from_teacher(owt.build_model(cfg, S, lam_dim=1),
                                        teacher.state_dict())
    return cfg, process, teacher, student


def sdtt_time_pmf(T: int, delta: float, p: float) -> torch.Tensor:
    """P(t = k / T), k = 1..T: t ~ p U[0, delta) + (1 - p) U[delta, 1], snapped up to the grid
    (the cell [(k - 1) / T, k / T) goes to k / T)."""
    lo, hi = torch.arange(T, dtype=torch.float64) / T, torch.arange(1, T + 1, dtype=torch.float64) / T
    near = (hi.clamp(max=delta) - lo.clamp(max=delta)) / delta
    far = (hi.clamp(min=delta) - lo.clamp(min=delta)) / (1 - delta)
    return p * near + (1 - p) * far


def test_owt_di4c_times_noise_and_weights_follow_the_sdtt_variant(monkeypatch):
    """t ~ DISTIL_PROB U[0, delta) + (1 - DISTIL_PROB) U[delta, 1] snapped to {k / T}
    (chi-square against the exact law), u = t - min(1 / T, t / 2); x_t masked at t; weights
    distil = 1[t < delta], consis = 1[t >= delta], alpha = ALPHA_CONST sigmoid(20 (t - 1/2))."""
    T, delta, p = 16, 0.1, owt.DISTIL_PROB
    monkeypatch.setattr(owt, "ALPHA_CONST", 0.25)
    cfg, process, teacher, student = owt_setup(T=T, delta=delta)
    seen, rec = record_noise(monkeypatch, process), Record()
    monkeypatch.setattr(core, "di4c_loss", rec)
    x0 = torch.randint(0, 39, (N_LAW, 8), generator=gen(1))
    owt.di4c_loss(cfg, teacher, student, process)(student, x0, gen(2))
    (c,) = rec.calls
    t, u = c["t"], c["u"]
    k = (t.double() * T).round()
    assert torch.allclose(t.double(), k / T, atol=1e-6) and k.min() >= 1 and k.max() <= T
    counts = torch.bincount(k.long() - 1, minlength=T).double()
    expected = N_LAW * sdtt_time_pmf(T, delta, p)
    assert ((counts - expected) ** 2 / expected).sum() < 37.7       # chi-square, 15 dof, 0.001
    torch.testing.assert_close(u, t - torch.minimum(torch.full_like(t, 1 / T), t / 2))
    assert torch.equal(c["x0"], x0) and noised_at(seen, x0, t, c["x_t"])
    w = c["weights"]
    assert w["distil_on"] == "x_t"
    torch.testing.assert_close(w["distil"], (t < delta).float())
    torch.testing.assert_close(w["consis"], (t >= delta).float())
    torch.testing.assert_close(w["alpha"], sigmoid_alpha(t, 0.25))
    assert (c["L"], c["lam_dim"]) == (cfg.L, student.lam_dim)


@pytest.mark.parametrize("lam_T", [0, 1])
def test_owt_teacher_step_goes_from_t_to_u(monkeypatch, lam_T):
    """The real Di4C step: the teacher's step starts at x_t, t and goes to exactly u; each
    [MASK] stays masked with probability m(u) / m(t) (4 sd over all rows), revealed tokens
    stay; a mixture teacher (another round) gets a lambda per row for its step."""
    cfg, process, teacher, student = owt_setup(lam_T, T=8, delta=0.2)
    t_calls = record_calls(teacher)
    rec = Record(real=core.di4c_loss, wrap_step=True)
    monkeypatch.setattr(core, "di4c_loss", rec)
    x0 = torch.randint(0, 39, (24, 32), generator=gen(1))
    owt.di4c_loss(cfg, teacher, student, process, lam_T)(student, x0, gen(2))
    (c,), (s,), L = rec.calls, rec.steps, cfg.L
    assert torch.equal(s["x"], core.repeat_batch(c["x_t"], L))
    assert torch.equal(s["t"], core.repeat_batch(c["t"], L))
    assert torch.equal(s["u"], core.repeat_batch(c["u"], L))
    mask = process.mask_id
    before, after = s["x"] == mask, s["out"] == mask
    assert not (after & ~before).any()
    assert torch.equal(s["out"][~before], s["x"][~before])
    keep = (owt.mask_rate(s["u"].double()) / owt.mask_rate(s["t"].double()))[:, None].expand_as(before)
    n, hits = before.sum().item(), after.sum().item()
    mean, var = keep[before].sum().item(), (keep * (1 - keep))[before].sum().item()
    assert n > 500 and abs(hits - mean) <= 4 * math.sqrt(var)
    assert len(t_calls) == 1 + bool(lam_T)             # the marginal (+ a mixture's step)
    if lam_T:
        assert torch.equal(t_calls[-1]["x"], s["x"]) and t_calls[-1]["lam"].shape == (24 * L, 1)


def test_owt_prefix_reaches_every_nfe_and_stays(tmp_path):
    """Prefix-conditional generation: every network call sees the prefix tokens as given, and
    the sample keeps them; the sampler runs N NFEs (+1 if a [MASK] is left)."""
    cfg, process, teacher, student = owt_setup(1, sample_batch=8)
    calls = record_calls(student.eval())
    ctx = owt.Ctx(0, 1, torch.device("cpu"), str(tmp_path), "float32")
    P, n_steps = 5, 4
    x_T = process.prior(6, 16)
    prefix = torch.randint(0, 39, (6, P), generator=gen(3))
    x_T[:, :P] = prefix
    corpus = type("C", (), {"S": 40})()
    x0, nfe = owt.generate(cfg, ctx, corpus, student, 1, n_steps, x_T, "cond")
    assert len(calls) == nfe >= n_steps
    assert all(torch.equal(c["x"][:, :P], prefix) for c in calls)
    assert torch.equal(x0[:, :P], prefix) and not (x0 == process.mask_id).any()


def test_owt_control_length_matches_the_di4c_compute():
    """control_steps (-1) against the rows counted on the networks of one Di4C step and one
    MDLM-loss step."""
    cfg, process, teacher, student = owt_setup(distil_iters=50, control_iters=-1)
    s_calls, t_calls = record_calls(student), record_calls(teacher)
    x0 = torch.randint(0, 39, (cfg.distil_batch, cfg.seq_len), generator=gen(0))
    loss, _ = owt.di4c_loss(cfg, teacher, student, process)(student, x0, gen(1))
    loss.sum().backward()
    di4c_rows = row_cost(s_calls) + row_cost(t_calls)
    control = owt.build_model(cfg, 40)
    c_calls = record_calls(control)
    x0 = torch.randint(0, 39, (cfg.batch_size, cfg.seq_len), generator=gen(2))
    loss, _ = owt.mdlm_loss(control, x0, process, gen(3))
    loss.sum().backward()
    assert owt.control_steps(cfg) == math.ceil(50 * di4c_rows / row_cost(c_calls))


def test_owt_stage_sample_conditions_on_the_held_out_prefixes(tmp_path):
    """stage_sample: every prefix-conditional sample of every model starts with the first
    prefix_len tokens of its held-out block (N_CONT continuations per block, in order)."""
    cfg = smoke_cfg(tmp_path)
    for stage in ("teacher", "distill", "sample"):
        owt.main(dataclasses.replace(cfg, stage=stage))
    corpus = owt.Corpus(cfg, ctx_for(cfg))
    n_prefix, prefix_len, cont_len = cfg.prefix
    n_prefix = min(n_prefix, corpus.n_blocks("val"))
    want = corpus.get("val", np.arange(n_prefix))[:, :prefix_len].repeat_interleave(owt.N_CONT, 0)
    sets = [s for s in owt.sample_sets(cfg) if s[1] == "cond"]
    assert {s[0] for s in sets} == {"teacher", "student", "control"}
    for name, kind, N in sets:
        x = torch.load(os.path.join(cfg.out_dir, "samples", f"{name}_{kind}_{N}.pt"),
                       weights_only=True)["tokens"]
        assert x.shape[1] == prefix_len + cont_len
        assert torch.equal(x[:, :prefix_len], want), name


def test_imagenet_stage_sample_hands_lfg_the_teacher(tmp_path, monkeypatch):
    """stage_sample with --lfg: the student and the control get the teacher as their
    unconditional CFG branch, the teacher none; without --lfg nobody gets one."""
    cfg = imagenet.make_config(imagenet.Config, preset="smoke", out_dir=str(tmp_path))
    for stage in ("tokenize", "teacher", "distill"):
        imagenet.main(dataclasses.replace(cfg, stage=stage))
    real = imagenet.generate
    for lfg in (True, False):
        seen = []

        def generate(cfg_, ctx, net, lam_dim, y, n_steps, w, uncond=None):
            seen.append((net, lam_dim, uncond))
            return real(cfg_, ctx, net, lam_dim, y, n_steps, w, uncond)
        monkeypatch.setattr(imagenet, "generate", generate)
        imagenet.main(dataclasses.replace(cfg, stage="sample", lfg=lfg))
        runs = imagenet.sample_runs(cfg)
        assert len(seen) == len(runs)
        teacher = {id(net) for (_, name, _, _), (net, _, _) in zip(runs, seen) if name == "teacher"}
        assert len(teacher) == 1
        for (label, name, _, _), (net, lam_dim, uncond) in zip(runs, seen):
            if lfg and name != "teacher":
                assert uncond is not None and id(uncond) in teacher, label
            else:
                assert uncond is None, label
            assert (lam_dim > 0) == (name == "student"), label
