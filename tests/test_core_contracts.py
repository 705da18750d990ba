"""Tests aimed at the single-line bugs a Di4C implementation can have and still look fine:
time arguments mixed up (t, u, tau), wrong stop-gradients, lambda shared where it must be fresh,
wrong step grids and hybrid splits, categorical draws in float32, a mixture teacher read at one
lambda, a flipped alpha(t). `python tests/mutate.py` puts such bugs into a copy of the core and
checks that these tests (with tests/test_core_exact.py) catch every one."""
import math

import pytest
import torch

import di4c_core as core
from tests.exact import TableDenoiser, all_states, state_index


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Recorder:
    """Wraps a denoiser and records every call: rows, times, lambdas, cond, grad mode."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x, t, lam, cond=None):
        self.calls.append(dict(x=x.clone(), t=t.detach().clone(), cond=cond,
                               lam=None if lam is None else lam.detach().clone(),
                               grad=torch.is_grad_enabled()))
        return self.net(x, t, lam, cond)


class TimedLinear(torch.nn.Module):
    """logits = W onehot(x_t) + t a + lam B: depends on x_t, t and lambda; B = 0 gives a product
    model. Everything differentiable, so gradients can be compared with a reference."""

    def __init__(self, D, S, lam_scale=0.0, seed=0):
        super().__init__()
        g = gen(seed)
        self.D, self.S = D, S
        self.W = torch.nn.Parameter(0.5 * torch.randn(D * S, D * S, generator=g))
        self.a = torch.nn.Parameter(torch.randn(D * S, generator=g))
        self.B = torch.nn.Parameter(lam_scale * torch.randn(D * S, generator=g))

    def forward(self, x, t, lam, cond=None):
        h = torch.nn.functional.one_hot(x, self.S).float().flatten(1) @ self.W
        h = h + t.float()[:, None] * self.a
        if lam is not None:
            h = h + torch.sin(6 * lam) * self.B
        if cond is not None:
            h = h + cond.float()[:, None]                      # a class shift, per row
        return h.view(-1, self.D, self.S)


class StepRecorder:
    """Wraps a process and records the (t, s) of every step."""

    def __init__(self, proc):
        self.proc, self.steps = proc, []

    def __getattr__(self, name):
        return getattr(self.proc, name)

    def step(self, log_p0, x_t, t, s, generator=None):
        self.steps.append((t.clone(), s.clone()))
        return self.proc.step(log_p0, x_t, t, s, generator)


def masked(S):
    return core.MaskedProcess(S, lambda t: t.double().clamp(0, 1))


# -----------------------------------------------------------------------------
# di4c_loss: which network is called where, at which time, with which lambda, with what grad


def di4c_problem(B=3, L=4, D=3, S=4, variant="sdtt"):
    proc = StepRecorder(masked(S))
    teacher = Recorder(TimedLinear(D, S, seed=1))
    student_net = TimedLinear(D, S, lam_scale=1.0, seed=2)
    student = Recorder(student_net)
    x0 = torch.randint(0, S - 1, (B, D), generator=gen(3))
    t = torch.tensor([0.9, 0.7, 0.5][:B])
    u = t - torch.tensor([0.3, 0.2, 0.1][:B])
    x_t = proc.add_noise(x0, t, gen(4))
    return proc, teacher, student, student_net, x0, x_t, t, u


def test_di4c_loss_times_lambdas_grad_modes_and_cond():
    B, L = 3, 4
    proc, teacher, student, _, x0, x_t, t, u = di4c_problem(B, L)
    marg, step = core.make_teacher(teacher, proc.step)
    cond = torch.tensor([5, 6, 7])
    core.di4c_loss(student, x0, x_t, t, u, weights=core.variant_weights("sdtt", t, 0.02), L=L,
                   teacher_marginal=marg, teacher_step=step, cond=cond, generator=gen(5))
    rep = lambda v: v.repeat_interleave(L, 0)
    at_t, at_u = student.calls                                  # one graph call, one target call
    assert at_t["grad"] and not at_u["grad"] and not teacher.calls[0]["grad"]
    assert torch.equal(at_t["x"], rep(x_t)) and torch.equal(at_t["t"], rep(t))
    assert torch.equal(at_u["t"], rep(u))                       # the target is the student at u
    assert torch.equal(teacher.calls[0]["t"], t) and len(teacher.calls) == 1
    (t_step, s_step), = proc.steps                               # one teacher step t -> u per row
    assert torch.equal(t_step.float(), rep(t)) and torch.equal(s_step.float(), rep(u))
    for call in (at_t, at_u):                                   # cond follows its own x_t rows
        assert torch.equal(call["cond"], rep(cond))
    lam_t, lam_u = at_t["lam"], at_u["lam"]
    assert lam_t.shape == lam_u.shape == (B * L, 1)
    assert lam_t.unique().numel() == B * L                       # L distinct lambdas per x_t
    assert not torch.isclose(lam_t[:, None], lam_u[None]).any()  # fresh lambdas at u


def test_di4c_loss_tauldr_variant_distils_at_tau():
    B, L = 3, 2
    proc, teacher, student, _, x0, x_t, t, u = di4c_problem(B, L)
    marg, step = core.make_teacher(teacher, proc.step)
    tau = torch.full((B,), 0.01)
    x_tau = proc.add_noise(x0, tau, gen(6))
    w = core.variant_weights("tauldr", t)
    core.di4c_loss(student, x0, x_t, t, u, weights=w, L=L, teacher_marginal=marg,
                   teacher_step=step, x_tau=x_tau, tau=tau, generator=gen(5))
    at_t = student.calls[0]
    assert torch.equal(at_t["t"], torch.cat([t, tau]).repeat_interleave(L))
    assert [c["t"].tolist() for c in teacher.calls] == [t.tolist(), tau.tolist()]
    with pytest.raises(ValueError, match="x_tau"):
        core.di4c_loss(student, x0, x_t, t, u, weights=w, L=L, teacher_marginal=marg,
                       teacher_step=step)


# -----------------------------------------------------------------------------
# di4c_loss against an independent reference: value and gradient, away from the symmetric point


def reference_loss(net, teacher_net, x0, x_t, t, u, lam_t, x_u, lam_u, y, w, L):
    """Di4C per x_t from its definition (docs/method.md (23)-(29)) in float64 probability space,
    with the draws the core made (lambda at t and u, x_u, y) and explicit stop-gradients."""
    B, D = x_t.shape
    p = torch.softmax(net(x_t.repeat_interleave(L, 0), t.repeat_interleave(L), lam_t).double(),
                      -1).view(B, L, D, -1)                                       # (B, L, D, S)
    with torch.no_grad():
        pT = torch.softmax(teacher_net(x_t, t, None).double(), -1)                # (B, D, S)
        pu = torch.softmax(net(x_u, u.repeat_interleave(L), lam_u).double(), -1).view(p.shape)
    m = p.mean(1)                                                                 # (B, D, S)

    def C(yv):                               # (B, D) -> log mean_l prod_d p_l - sum_d log m
        pick = p.gather(-1, yv[:, None, :, None].expand(B, L, D, 1))[..., 0]      # (B, L, D)
        joint = pick.prod(-1).mean(1)
        return joint.log() - m.gather(-1, yv[..., None])[..., 0].log().sum(-1)

    def K(a, b):
        return (a * (a.log() - b.log())).sum((-1, -2))

    data_cor = -C(x0)
    data_indep = K(pT, m)
    consis_cor = -torch.stack([C(y[:, i]) for i in range(L)], 1).mean(1)
    consis_indep = K(pu.mean(1), m)
    distil = torch.stack([K(pT, p[:, l]) for l in range(L)], 1).mean(1)
    return (w["distil"] * distil + w["alpha"] * data_cor + data_indep
            + w["consis"] * (consis_cor + consis_indep))


def test_di4c_loss_value_and_gradient_match_the_reference(monkeypatch):
    B, L = 3, 4
    proc, teacher, student, net, x0, x_t, t, u = di4c_problem(B, L)
    draws = []
    real = core.sample_categorical
    monkeypatch.setattr(core, "sample_categorical",
                        lambda *a, **k: draws.append(real(*a, **k)) or draws[-1])
    marg, step = core.make_teacher(teacher, proc.step)
    w = dict(distil=torch.tensor([0.3, 1.0, 2.0]), consis=torch.tensor([1.0, 0.5, 0.0]),
             alpha=torch.tensor([0.7, 0.2, 1.5]), distil_on="x_t")
    loss, terms = core.di4c_loss(student, x0, x_t, t, u, weights=w, L=L, teacher_marginal=marg,
                                 teacher_step=step, generator=gen(5))
    grads = torch.autograd.grad(loss.sum(), list(net.parameters()))
    at_t, at_u = student.calls
    y = draws[-1]                                                    # (B, L, D)
    ref = reference_loss(net, teacher.net, x0, x_t, t, u, at_t["lam"], at_u["x"], at_u["lam"],
                         y, w, L)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    ref_grads = torch.autograd.grad(ref.sum(), list(net.parameters()))
    for name, g, r in zip([n for n, _ in net.named_parameters()], grads, ref_grads):
        assert r.abs().max() > 1e-3, name                            # away from the symmetric point
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-3, atol=1e-5, msg=name)


def test_consistency_marginal_target_is_detached():
    log_m = torch.randn(2, 3, 4).log_softmax(-1).requires_grad_()
    log_u = torch.randn(2, 5, 3, 4).log_softmax(-1).requires_grad_()
    core.consis_loss_indep(log_u, log_m).sum().backward()
    assert log_u.grad is None and log_m.grad.abs().sum() > 0


def test_alpha_and_variant_weights_are_pinned():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    want = torch.tensor([4.5398e-05, 6.6929e-03, 0.5, 0.99331, 0.999955])
    torch.testing.assert_close(core.alpha_t(t), want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(core.alpha_t(t, 0.1), 0.1 * want, rtol=1e-4, atol=1e-8)
    t = torch.tensor([0.01, 0.05, 0.3])
    w = core.variant_weights("maskgit", t, 0.05)
    assert w["distil"].tolist() == pytest.approx([20.0, 20.0, 0.0]) and w["distil_on"] == "x_t"
    assert w["consis"].tolist() == [0.0, 0.0, 1.0]
    w = core.variant_weights("sdtt", t, 0.05)
    assert w["distil"].tolist() == [1.0, 0.0, 0.0] and w["consis"].tolist() == [0.0, 1.0, 1.0]
    torch.testing.assert_close(w["alpha"], 0.1 * torch.sigmoid(20 * (t - 0.5)))
    w = core.variant_weights("tauldr", t)
    assert w["distil_on"] == "tau" and w["consis"].tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(w["alpha"], torch.sigmoid(20 * (t - 0.5)))


# -----------------------------------------------------------------------------
# Mixture teachers against enumeration


def mixture_step_law(table, x, S, m_t, m_u):
    """The exact law of x_u given x_t = x under a mixture teacher's step: the mean over its K
    components of the product over dimensions of the masked posterior, from its definition (a
    masked dimension stays [MASK] w.p. m_u / m_t, else takes v w.p. p_k(v); a clean one is kept).
    Returns (S ** D,) float64 over all_states(D, S)."""
    Y = all_states(x.shape[0], S)
    p0 = table[:, state_index(x[None], S)[0]].double().softmax(-1)       # (K, D, S)
    r, mask = (m_t - m_u) / m_t, S - 1
    law = torch.zeros(len(Y), dtype=torch.float64)
    for k in range(p0.shape[0]):
        for n, y in enumerate(Y.tolist()):
            prob = 1.0
            for d, v in enumerate(y):
                if x[d] != mask:
                    prob *= float(v == x[d])
                else:
                    prob *= r * p0[k, d, v].item() + (1 - r) * (v == mask)
            law[n] += prob / p0.shape[0]
    return law


def test_mixture_teacher_marginal_and_step_against_enumeration():
    """A mixture teacher (4 components, lambda picks one): its marginal is the mean of the
    components' (enumerated); its step t -> u draws x_u from E_lambda[product posterior], a fresh
    lambda per row: the empirical law of 20,000 draws per x_t, against the enumerated law, within
    total variation 0.02 (seeded; the sampling error is about 0.008). The laws of the likely
    mistakes (the step from the marginals passed in: a product model; one lambda for all rows or
    none: one component) are more than 0.06 away (0.14 and 0.23 here)."""
    D, S, K, L = 2, 3, 4, 4096
    table = 2.0 * torch.randn(K, S ** D, D, S, generator=gen(7))
    teacher = Recorder(TableDenoiser(table, S))
    proc = StepRecorder(masked(S))
    marg, step = core.make_teacher(teacher, proc.step, lam_dim=1, L=L)
    x = torch.tensor([[2, 2], [0, 2]])
    got = marg(x, torch.full((2,), 0.7), None, gen(8)).exp()             # (2, D, S)
    exact = table[:, state_index(x, S)].softmax(-1).mean(0)              # mean over components
    assert (got - exact).abs().max() < 4 / math.sqrt(L)
    teacher.calls.clear()
    n, (t, u) = 20000, (0.9, 0.1)
    xr = x.repeat_interleave(n, 0)
    log_m = exact.log().repeat_interleave(n, 0)                          # what di4c_loss passes
    x_u = step(xr, torch.full((2 * n,), t), torch.full((2 * n,), u), log_m, None, gen(9))
    lam = teacher.calls[0]["lam"][:, 0]
    assert len(teacher.calls) == 1 and lam.shape == (2 * n,)
    assert lam[:128].unique().numel() == 128                            # a fresh lambda per row
    tv = lambda p, q: 0.5 * (p - q).abs().sum().item()
    for i in range(2):
        law = mixture_step_law(table, x[i], S, t, u)                  # m(t) = t: masked(S)
        draws = x_u[i * n:(i + 1) * n]
        assert torch.equal(draws[:, x[i] != 2], xr[i * n:(i + 1) * n][:, x[i] != 2])  # clean kept
        emp = torch.bincount(state_index(draws, S), minlength=S ** D).double() / n
        assert tv(emp, law) < 0.02, (i, tv(emp, law))
        one = [mixture_step_law(table[k:k + 1], x[i], S, t, u) for k in range(K)]
        assert min(tv(law, c) for c in one) > 0.06                       # one shared lambda
    r, stay = (t - u) / t, torch.eye(S, dtype=torch.float64)[S - 1]     # m(t) = t here
    product = torch.outer(r * exact[0, 0] + (1 - r) * stay, r * exact[0, 1] + (1 - r) * stay)
    assert tv(product.flatten(), mixture_step_law(table, x[0], S, t, u)) > 0.06  # marginals' step


# -----------------------------------------------------------------------------
# Samplers: lambda per sample and per step, times, hybrid split, final NFE


def test_sampler_lambdas_times_and_hybrid_split():
    S, D, B = 3, 2, 5
    proc = masked(S)
    table = torch.randn(4, S ** D, D, S, generator=gen(10))
    table[..., S - 1] = -1e4
    student, teacher = Recorder(TableDenoiser(table, S)), Recorder(TableDenoiser(table[:1], S))
    times = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])
    core.ancestral_sample(proc, proc.prior(B, D), times, student, lam_dim=1, teacher=teacher,
                          n_teacher=2, final_nfe=False, generator=gen(11))
    assert len(student.calls) == 2 and len(teacher.calls) == 2          # 4 NFEs, the last 2 teacher
    for k, c in enumerate(student.calls + teacher.calls):
        assert torch.equal(c["t"], times[k].expand(B))
    lams = torch.stack([c["lam"][:, 0] for c in student.calls])         # (steps, B)
    assert lams.unique().numel() == lams.numel()                        # fresh per sample, per step
    assert all(c["lam"] is None for c in teacher.calls)
    # with a final argmax NFE (always needed by a CTMC), it counts as one of the teacher's
    R = torch.ones(S, S, dtype=torch.float64) - S * torch.eye(S, dtype=torch.float64)
    ctmc = core.CTMCProcess(R, lambda t: 3 * t, torch.ones(S))
    student.calls.clear(), teacher.calls.clear()
    core.ancestral_sample(ctmc, ctmc.prior(B, D), times[:-1], student, lam_dim=1, teacher=teacher,
                          n_teacher=2, generator=gen(12))
    assert len(student.calls) == 2 and len(teacher.calls) == 2          # 3 steps + the final NFE
    assert [c["t"][0].item() for c in teacher.calls] == pytest.approx([0.55, 0.3])


def test_sampler_fresh_lambdas_and_mixture_teacher_in_a_hybrid():
    """Student and mixture teacher (multi-round) in one hybrid: each draws a fresh lambda per
    sample at each of its NFEs, its own, not the other's."""
    S, D, B = 3, 2, 6
    proc = masked(S)
    table = torch.randn(4, S ** D, D, S, generator=gen(14))
    table[..., S - 1] = -1e4
    student, teacher = Recorder(TableDenoiser(table, S)), Recorder(TableDenoiser(table, S))
    times = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])
    core.ancestral_sample(proc, proc.prior(B, D), times, student, lam_dim=1, teacher=teacher,
                          n_teacher=2, teacher_lam_dim=1, final_nfe=False, generator=gen(15))
    s_lam = torch.stack([c["lam"][:, 0] for c in student.calls])        # (2 steps, B)
    t_lam = torch.stack([c["lam"][:, 0] for c in teacher.calls])        # a mixture teacher: lambdas
    assert s_lam[0].unique().numel() == B and t_lam[0].unique().numel() == B
    assert not torch.equal(s_lam[0], s_lam[1]) and not torch.equal(t_lam[0], t_lam[1])
    assert not torch.equal(s_lam[0], t_lam[0])                          # each network its own


def test_sampler_cache_skips_unchanged_rows_only():
    S, D, B = 3, 2, 64
    proc = masked(S)
    table = torch.randn(1, S ** D, D, S, generator=gen(12))
    table[..., S - 1] = -1e4
    net = Recorder(TableDenoiser(table, S))
    times = torch.linspace(1, 0, 33)
    x1, n1 = core.ancestral_sample(proc, proc.prior(B, D), times, net, generator=gen(13))
    rows_plain = sum(c["x"].shape[0] for c in net.calls)
    net.calls.clear()
    x2, n2 = core.ancestral_sample(proc, proc.prior(B, D), times, net, reuse_unchanged=True,
                                   generator=gen(13))
    rows_cached = sum(c["x"].shape[0] for c in net.calls)
    assert torch.equal(x1, x2)                                          # same law, same draws
    assert rows_cached < rows_plain / 4 and n2 < n1 == 32


# -----------------------------------------------------------------------------
# Categorical draws in float64


def test_categorical_draws_keep_float64_precision():
    """Unnormalised log-probabilities with a large offset: float32 rounds them to one value (and
    its Gumbel noise to steps of 8), so a float32 sampler would return state 0 almost always."""
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    n = 20000
    x = core.sample_categorical((1e8 + p.log()).expand(n, 3), gen(14))
    freq = torch.bincount(x, minlength=3).double() / n
    assert (freq - p).abs().max() < 0.015                               # 4 standard errors


def test_categorical_noise_is_drawn_in_float64(monkeypatch):
    dtypes = []
    real = torch.rand

    def rand(*a, **k):
        dtypes.append(k.get("dtype"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "rand", rand)
    core.sample_categorical(torch.randn(50, 7), gen(15))
    assert dtypes and all(d == torch.float64 for d in dtypes)


def test_lam_param_groups_hold_the_lambda_path_at_its_learning_rate():
    """lam_param_groups(model, lr, mult): the lambda path ("lam_*" names, nested too) in one
    group at lr * mult, every other parameter in the other at lr, each exactly once; a plain
    torch optimizer built from the groups uses those rates (no schedule needed), and a product
    model gets one group."""
    net = torch.nn.Module()
    net.body = torch.nn.Linear(3, 4)
    net.lam_emb = torch.nn.Linear(1, 4)
    net.block = torch.nn.Module()
    net.block.lam_proj = torch.nn.Linear(4, 4)
    net.block.out = torch.nn.Linear(4, 2)
    groups = core.lam_param_groups(net, 2e-4, 10.0)
    names = {id(p): n for n, p in net.named_parameters()}
    held = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    assert held == [["block.out.bias", "block.out.weight", "body.bias", "body.weight"],
                    ["block.lam_proj.bias", "block.lam_proj.weight", "lam_emb.bias",
                     "lam_emb.weight"]]
    opt = torch.optim.Adam(groups)
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 2e-3]
    assert [g["mult"] for g in opt.param_groups] == [1.0, 10.0]
    product = torch.nn.Linear(3, 4)
    assert [len(g["params"]) for g in core.lam_param_groups(product, 1e-3, 10.0)] == [2]


def test_eval_target_unwraps_a_wrapped_student_and_restores_its_mode():
    """The default consistency target (25)-(26) runs the student itself, in eval mode (dropout
    off), without gradients, and gives the mode back; a torch.compile'd student (its
    `_orig_mod`) is unwrapped, never run compiled."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)

        def forward(self, x, t, lam, cond=None):
            return self.drop(self.lin(x))

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, *a):
            raise AssertionError("the wrapper ran")

    torch.manual_seed(0)
    net, x = Net().train(), torch.randn(4, 3)
    assert hasattr(torch.compile(net), "_orig_mod")         # what torch.compile returns
    want = net.lin(x)
    for student in (net, Wrapper(net)):
        got = core.eval_target(student)(x, None, None)
        torch.testing.assert_close(got, want)
        assert net.training and not got.requires_grad
