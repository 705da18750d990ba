"""Exact checks of di4c_core against brute-force enumeration on tiny problems (D in {2, 3}, S in {3, 4})."""
import math

import pytest
import torch

import di4c_core as core
from tests.exact import (TableDenoiser, all_states, kl, marginals, product_joint, random_joint,
                         state_index, total_correlation)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_rate_matrix(S, g):
    R = torch.rand(S, S, generator=g, dtype=torch.float64)
    R.fill_diagonal_(0)
    return R - torch.diag(R.sum(1))


def make_ctmc(S, g, eps=0.0):
    R = random_rate_matrix(S, g)
    evals, evecs = torch.linalg.eig(R.T)                     # stationary law: left null vector
    pi = evecs[:, evals.real.abs().argmin()].real.abs()
    return core.CTMCProcess(R, lambda t: 2.0 * (torch.exp(t) - 1), pi, eps=eps)


def make_masked(S):
    return core.MaskedProcess(S, lambda t: t.double().clamp(0, 1))


PROCESSES = [("ctmc", 3), ("ctmc", 4), ("masked", 3), ("masked", 4)]


def explicit(B, distil=1.0, consis=1.0, alpha=1.0):
    """Explicit di4c_loss weights (every term on), distillation reusing x_t."""
    full = lambda v: torch.full((B,), float(v))
    return dict(distil=full(distil), consis=full(consis), alpha=full(alpha), distil_on="x_t")


def build(kind, S, seed=0):
    return make_ctmc(S, gen(seed)) if kind == "ctmc" else make_masked(S)


# -----------------------------------------------------------------------------
# Forward kernels and posteriors


@pytest.mark.parametrize("kind,S", PROCESSES)
def test_kernels_stochastic_and_chapman_kolmogorov(kind, S):
    proc = build(kind, S)
    t, u, s = torch.tensor([0.9, 0.6]), torch.tensor([0.5, 0.3]), torch.tensor([0.2, 0.05])
    for a, b in [(t, u), (u, s), (t, s)]:
        Q = proc.transition(a, b)
        assert (Q >= 0).all()
        torch.testing.assert_close(Q.sum(-1), torch.ones(2, S, dtype=torch.float64))
    # Q_{t|s} = Q_{u|s} Q_{t|u} (rows are "from", so the earlier step multiplies first)
    torch.testing.assert_close(proc.transition(u, s) @ proc.transition(t, u), proc.transition(t, s),
                               atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(proc.transition(s) @ proc.transition(t, s), proc.transition(t))


def brute_posterior(pi, states, proc, x_t, t, s, S):
    """p(x_s^d = b | x_t) by Bayes over every joint x0: (D, S)."""
    D = states.shape[1]
    Q_t0, Q_s0, Q_ts = (proc.transition(torch.tensor([a]), None if b is None else torch.tensor([b]))[0]
                        for a, b in [(t, None), (s, None), (t, s)])
    lik = Q_t0[states, x_t[None, :]]                          # (N, D): Q_{t|0}(x0^d -> x_t^d)
    out = torch.zeros(D, S, dtype=torch.float64)
    for d in range(D):
        others = torch.cat([lik[:, :d], lik[:, d + 1:]], 1).prod(1)        # (N,)
        joint = (pi * others)[:, None] * Q_s0[states[:, d]] * Q_ts[:, x_t[d]][None, :]
        out[d] = joint.sum(0)
    return out / out.sum(-1, keepdim=True)


def brute_x0_marginals(pi, states, proc, x_t, t, n_data):
    """True per-dimension posterior p(x0^d | x_t): (D, n_data) -- the exact x0-prediction."""
    Q_t0 = proc.transition(torch.tensor([t]))[0]
    w = pi * Q_t0[states, x_t[None, :]].prod(1)
    return marginals(w / w.sum(), states, n_data)


@pytest.mark.parametrize("kind,S", PROCESSES)
@pytest.mark.parametrize("D", [2, 3])
def test_posterior_equals_bayes(kind, S, D):
    proc = build(kind, S, seed=D)
    n_data = S - 1 if kind == "masked" else S               # [MASK] never appears in data
    data_states = all_states(D, n_data)
    pi = random_joint(len(data_states), gen(10 + D))
    t, s = 0.7, 0.3
    x_ts = all_states(D, S)
    p_xt = torch.stack([(pi * proc.transition(torch.tensor([t]))[0][data_states, x[None]].prod(1)).sum()
                        for x in x_ts])
    checked = 0
    for x_t, p in zip(x_ts, p_xt):
        if p < 1e-12:
            continue
        p0 = brute_x0_marginals(pi, data_states, proc, x_t, t, n_data)          # (D, n_data)
        log_p0 = torch.full((D, S), -float("inf"), dtype=torch.float64)
        log_p0[:, :n_data] = p0.log()
        got = proc.posterior(log_p0[None], x_t[None], t, s)[0]
        torch.testing.assert_close(got, brute_posterior(pi, data_states, proc, x_t, t, s, S),
                                   atol=1e-9, rtol=1e-7)
        checked += 1
    assert checked >= 2 ** D


@pytest.mark.parametrize("kind,S", PROCESSES)
def test_step_draws_from_posterior(kind, S):
    """The sampled step (float64 Gumbel race / Bernoulli + categorical) matches `posterior`."""
    proc, g = build(kind, S), gen(3)
    D, n = 2, 40000
    log_p0 = torch.randn(1, D, S, generator=g)
    log_p0[..., -1] = -float("inf") if kind == "masked" else log_p0[..., -1]
    x_t = torch.tensor([[S - 1, 0]])
    want = proc.posterior(log_p0, x_t, 0.8, 0.4)[0]                          # (D, S)
    draws = proc.step(log_p0.expand(n, D, S), x_t.expand(n, D), 0.8, 0.4, g)  # (n, D)
    freq = torch.stack([torch.bincount(draws[:, d], minlength=S) for d in range(D)]).double() / n
    assert (freq - want).abs().max() < 4.5 * math.sqrt(0.25 / n)


# -----------------------------------------------------------------------------
# Mixture model, control variate, marginal KL


def test_mixture_loglik_and_marginals_equal_enumeration():
    B, L, D, S = 2, 3, 3, 3
    log_p = torch.randn(B, L, D, S, generator=gen(0), dtype=torch.float64).log_softmax(-1)
    Y = all_states(D, S)                                                     # (27, D)
    J = core.mixture_joint_loglik(log_p, Y[None].expand(B, -1, -1))          # (B, 27)
    for b in range(B):
        brute = torch.stack([product_joint(log_p[b, l], Y) for l in range(L)]).mean(0)
        torch.testing.assert_close(J[b].exp(), brute)
        torch.testing.assert_close(core.mixture_marginal_logp(log_p)[b].exp(),
                                   marginals(brute, Y, S))
        torch.testing.assert_close(core.mixture_joint_loglik(log_p[b:b + 1], Y[5:6])[0], J[b, 5])
    torch.testing.assert_close(J.exp().sum(-1), torch.ones(B, dtype=torch.float64))
    # one component (or identical components) is the product model: C^ = 0
    same = log_p[:, :1].expand(B, L, D, S)
    torch.testing.assert_close(core.cv_loglik(same, Y[None].expand(B, -1, -1)),
                               torch.zeros(B, len(Y), dtype=torch.float64))


@pytest.mark.parametrize("D,S", [(2, 4), (3, 3)])
def test_control_variate_identity_exact(D, S):
    """E_pi[-C] + sum_d KL(pi^d || m^d) + TC(pi) = KL(pi || p) for a mixture p with L components."""
    g = gen(D * 10 + S)
    Y = all_states(D, S)
    pi = random_joint(len(Y), g)
    log_p = torch.randn(1, 5, D, S, generator=g, dtype=torch.float64).log_softmax(-1)
    p = core.mixture_joint_loglik(log_p, Y[None])[0].exp()
    C = core.cv_loglik(log_p, Y[None])[0]                                    # (N,)
    pi_marg = marginals(pi, Y, S)
    lhs = -(pi * C).sum() + core.marginal_kl(pi_marg.log()[None], core.mixture_marginal_logp(log_p))[0] \
        + total_correlation(pi, Y, S)
    torch.testing.assert_close(lhs, kl(pi, p))


def test_marginal_kl_handles_zero_mass_without_nan():
    log_pi = torch.tensor([[[0.0, -float("inf")]]])
    log_m = torch.tensor([[[-0.1, -float("inf")]]], requires_grad=True)
    out = core.marginal_kl(log_pi, log_m)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(log_m.grad).all()


# -----------------------------------------------------------------------------
# Monte Carlo losses converge to the KL they stand for


def piecewise_student(D, S_in, S_out, K, g, scale=2.0):
    """K-component table denoiser over every x in S_in**D (so mixtures are exactly enumerable)."""
    return TableDenoiser(scale * torch.randn(K, S_in ** D, D, S_out, generator=g), S_in)


def exact_mixture_joint(student, x_row, Y):
    comps = student.component_log_probs(x_row)                               # (K, D, S)
    return torch.stack([product_joint(c, Y) for c in comps]).mean(0)        # (N,)


def mc_mean(values):
    values = values.double()
    return values.mean().item(), values.std().item() / math.sqrt(values.numel())


def test_data_loss_converges_and_control_variate_reduces_variance():
    """data_cor + data_indep -> KL(pi || p) - TC(pi); plain -J^ -> KL(pi || p) + H(pi).

    The mean over x0 is taken exactly (pi-weighted over all 27 states); only lambda is sampled,
    R times per state. The variances compare the full estimators, x0 ~ pi and lambda drawn.
    """
    D, S, K, R = 3, 3, 4, 1000
    g = gen(1)
    Y = all_states(D, S)
    N = len(Y)
    pi = random_joint(N, g)
    student = piecewise_student(D, S, S, K, g)
    p = exact_mixture_joint(student, torch.zeros(D, dtype=torch.long), Y)
    exact_cv = (kl(pi, p) - total_correlation(pi, Y, S)).item()
    exact_plain = (kl(pi, p) - (pi * pi.log()).sum()).item()
    log_pi_marg = marginals(pi, Y, S).log()[None].expand(R * N, D, S)
    x0 = Y.repeat(R, 1)                                                      # (R*N, D), state-major inner
    weights = pi.repeat(R).view(R, N)
    x_t = torch.zeros(R * N, D, dtype=torch.long)
    errors = []
    for L in [4, 16, 64, 256]:
        log_p = core.student_log_probs(student, x_t, torch.ones(R * N), L, 1, g).double()
        log_m = core.mixture_marginal_logp(log_p)
        cv = core.data_loss_cor(log_p, x0, True, log_m) + core.data_loss_indep(log_pi_marg, log_m)
        plain = core.data_loss_cor(log_p, x0, False)
        (m_cv, se_cv), (m_plain, se_plain) = (mc_mean((v.view(R, N) * weights).sum(1)) for v in (cv, plain))
        # full-estimator variances: x0 ~ pi (weights), lambda drawn
        var = {k: ((v.view(R, N) - m) ** 2 * weights).sum(1).mean().item()
               for k, v, m in [("cv", cv, m_cv), ("plain", plain, m_plain)]}
        errors.append(abs(m_cv - exact_cv))
        print(f"L={L:4d}  CV mean {m_cv:.4f} +- {se_cv:.4f} (exact {exact_cv:.4f})  plain mean "
              f"{m_plain:.4f} +- {se_plain:.4f} (exact {exact_plain:.4f})  "
              f"variance plain/CV {var['plain'] / var['cv']:.1f}")
        assert abs(m_cv - exact_cv) < 1.0 / L + 4 * se_cv
        assert abs(m_plain - exact_plain) < 1.0 / L + 4 * se_plain
        assert var["cv"] < var["plain"] / 2
    assert errors[-1] < errors[0] / 10


def masked_consistency_problem(D=2, S=3, K=3, seed=0):
    g = gen(seed)
    proc = make_masked(S)
    teacher = TableDenoiser(2.0 * torch.randn(1, S ** D, D, S, generator=g), S)
    student = piecewise_student(D, S, S, K, g)
    for tab in (teacher.table, student.table):                               # SUBS: no mass on [MASK]
        tab[..., S - 1] = -1e4
    return proc, teacher, student


def exact_composite(proc, teacher, student, x_t, t, u, S):
    """pi(x0 | x_t) = sum_{x_u} p^theta_{0|u}(x0 | x_u) p^psi_{u|t}(x_u | x_t), every state enumerated."""
    D = x_t.shape[0]
    X, Y = all_states(D, S), all_states(D, S - 1)
    step = proc.posterior(core.log_probs(teacher(x_t[None], None, None)).double(), x_t[None], t, u)[0]
    pi = torch.zeros(len(Y), dtype=torch.float64)
    for x_u in X:
        w = step[torch.arange(D), x_u].prod()
        if w > 0:
            pi += w * exact_mixture_joint(student, x_u, X)[state_index(Y, S)]
    return pi, Y


def test_consistency_and_distillation_converge():
    D, S, R = 2, 3, 3000
    proc, teacher, student = masked_consistency_problem(D, S)
    x_t_row, t, u = torch.tensor([S - 1, S - 1]), 0.8, 0.5
    pi, Y = exact_composite(proc, teacher, student, x_t_row, t, u, S)
    p = exact_mixture_joint(student, x_t_row, all_states(D, S))[state_index(Y, S)]
    exact_consis = kl(pi, p) - total_correlation(pi, Y, S - 1)
    comps = student.component_log_probs(x_t_row)
    log_T = core.log_probs(teacher(x_t_row[None], None, None)).double()[0]
    exact_distil = torch.stack([core.marginal_kl(log_T, c) for c in comps]).mean()
    marg, step = core.make_teacher(teacher, proc.step)
    x_t = x_t_row[None].expand(R, D)
    errors = []
    for L in [4, 32, 256]:
        _, terms = core.di4c_loss(student, x_t, x_t, torch.full((R,), t), torch.full((R,), u),
                                  teacher_marginal=marg, teacher_step=step, L=L,
                                  weights=explicit(R), generator=gen(L))
        m, se = mc_mean(terms["consis_cor"] + terms["consis_indep"])
        md, sed = mc_mean(terms["distil"])
        errors.append(abs(m - exact_consis.item()))
        print(f"L={L:4d}  consistency {m:.4f} +- {se:.4f} (exact {exact_consis:.4f})  "
              f"distil {md:.4f} +- {sed:.4f} (exact {exact_distil:.4f})")
        assert abs(m - exact_consis.item()) < 2.0 / L + 4 * se
        assert abs(md - exact_distil.item()) < 4 * sed + 1e-6
    assert errors[-1] < errors[0]


# -----------------------------------------------------------------------------
# Losses and gradients vanish where the student equals its target


class LinearStudent(torch.nn.Module):
    """x_t one-hot -> logits, plus a lambda path whose weights start at zero (function-preserving)."""

    def __init__(self, D, S, teacher_weight=None):
        super().__init__()
        self.net = torch.nn.Linear(D * S, D * S)
        self.lam = torch.nn.Linear(1, D * S)
        torch.nn.init.zeros_(self.lam.weight), torch.nn.init.zeros_(self.lam.bias)
        if teacher_weight is not None:
            self.net.load_state_dict(teacher_weight)
        self.D, self.S = D, S

    def forward(self, x, t, lam, cond=None):
        h = torch.nn.functional.one_hot(x, self.S).float().flatten(1)
        out = self.net(h) + (0 if lam is None else self.lam(lam))
        return out.view(-1, self.D, self.S)


def test_losses_and_gradients_vanish_at_the_target():
    D, S, B, L = 3, 4, 5, 8
    torch.manual_seed(0)
    teacher = LinearStudent(D, S)
    student = LinearStudent(D, S, teacher.net.state_dict())
    # flat schedule between u and t: the teacher step cannot change x, so the composite target
    # p^theta_{0|u} o p^psi_{u|t} equals the (time-free) student at t.
    proc = core.MaskedProcess(S, lambda t: torch.where(t < 0.4, t / 0.4 * 0.5, torch.full_like(t, 0.5)))
    marg, step = core.make_teacher(teacher, proc.step)
    x0 = torch.randint(0, S - 1, (B, D), generator=gen(0))
    x_t = proc.add_noise(x0, torch.full((B,), 0.6), gen(1))
    loss, terms = core.di4c_loss(student, x0, x_t, torch.full((B,), 0.6), torch.full((B,), 0.45),
                                 teacher_marginal=marg, teacher_step=step, L=L,
                                 weights=explicit(B), generator=gen(2))
    # data_cor is -C^(x0) = 0 for a lambda-free mixture, whatever x0 is
    for name in ["distil", "data_indep", "data_cor", "consis_cor", "consis_indep"]:
        assert terms[name].abs().max() < 1e-5, (name, terms[name])
    loss.sum().backward()
    for name, prm in student.named_parameters():
        assert prm.grad.abs().max() < 1e-5, name
    # a perturbed student gets non-zero losses and gradients (the check above can fail)
    with torch.no_grad():
        student.lam.weight.normal_()
    loss, terms = core.di4c_loss(student, x0, x_t, torch.full((B,), 0.6), torch.full((B,), 0.45),
                                 teacher_marginal=marg, teacher_step=step, L=L,
                                 weights=explicit(B), generator=gen(2))
    assert terms["distil"].min() > 1e-4 and terms["consis_cor"].abs().max() > 1e-4


# -----------------------------------------------------------------------------
# docs/method.md (11): correlated coins, product samplers have TV 1/(2N), a one-step mixture is exact


def coins_denoiser(x, t, lam, cond=None):
    """Exact per-dimension x0-prediction for data uniform on {(0,0), (1,1)}; states {0, 1, MASK=2}."""
    N = x.shape[0]
    logits = torch.full((N, 2, 3), -1e4)
    for d in range(2):
        other = x[:, 1 - d]
        own = x[:, d]
        seen = torch.where(own != 2, own, other)                             # copy what is revealed
        logits[:, d, :2] = torch.where((seen == 2)[:, None], torch.zeros(N, 2),
                                       torch.nn.functional.one_hot(seen.clamp(max=1), 2) * 1e4 - 1e4)
    return logits


def exact_sampler_law(proc, denoisers, times):
    """Law of the N-step sampler over {0,1,2}^2, propagated exactly; each denoiser entry is a list of
    equally weighted product components (a 1-D lambda mixture with piecewise-constant components)."""
    X = all_states(2, 3)
    law = torch.zeros(len(X), dtype=torch.float64)
    law[state_index(torch.tensor([[2, 2]]), 3)] = 1.0
    for k in range(len(times) - 1):
        new = torch.zeros_like(law)
        for comp in denoisers[k]:
            post = proc.posterior(core.log_probs(comp(X, None, None)).double(), X, times[k], times[k + 1])
            trans = post[:, 0, :, None] * post[:, 1, None, :]                 # (9, 3, 3)
            new += (law[:, None, None] * trans).sum(0).flatten() / len(denoisers[k])
        law = new
    return law, X


def test_correlated_coins_product_tv_is_one_over_2n_and_mixture_is_exact():
    proc = make_masked(3)
    data = torch.zeros(9, dtype=torch.float64)
    data[state_index(torch.tensor([[0, 0], [1, 1]]), 3)] = 0.5
    for N in [1, 2, 3, 4, 8, 16]:
        times = [1 - k / N for k in range(N + 1)]
        law, _ = exact_sampler_law(proc, [[coins_denoiser]] * N, times)
        tv = 0.5 * (law - data).abs().sum().item()
        assert abs(tv - 1 / (2 * N)) < 1e-9, (N, tv)
    # one-step mixture: lambda < 1/2 -> delta(0,0), lambda >= 1/2 -> delta(1,1)
    comps = [lambda x, t, lam, v=v: torch.tensor([[-1e4, -1e4, -1e4]]).repeat(x.shape[0], 2, 1)
             .index_fill(2, torch.tensor([v]), 0.0) for v in (0, 1)]
    law, _ = exact_sampler_law(proc, [comps], [1.0, 0.0])
    assert 0.5 * (law - data).abs().sum().item() < 1e-9


def test_ancestral_sample_matches_exact_law_and_is_deterministic():
    proc, N, n = make_masked(3), 2, 20000
    times = torch.linspace(1, 0, N + 1)
    law, X = exact_sampler_law(proc, [[coins_denoiser]] * N, times.tolist())
    x, nfe = core.ancestral_sample(proc, proc.prior(n, 2), times, coins_denoiser, generator=gen(0))
    assert nfe == N                                                          # nothing left to unmask
    freq = torch.bincount(state_index(x, 3), minlength=9).double() / n
    assert 0.5 * (freq - law).abs().sum() < 0.02
    x2, _ = core.ancestral_sample(proc, proc.prior(n, 2), times, coins_denoiser, generator=gen(0))
    assert torch.equal(x, x2)
    # hybrid: last NFE by the teacher; reuse_unchanged skips calls whose input did not change
    calls = []
    def counting(x, t, lam, cond=None):
        calls.append(1)
        return coins_denoiser(x, t, lam)
    x3, nfe3 = core.ancestral_sample(proc, proc.prior(4, 2), torch.tensor([1.0, 0.9, 0.8, 0.7, 0.0]),
                                     counting, reuse_unchanged=True, generator=gen(1))
    assert nfe3 == len(calls) and nfe3 <= 4 and not (x3 == 2).any()


def test_mixture_sampler_draws_a_fresh_lambda_per_step():
    """A mixture sampler mixes the components at every step (a fresh lambda per sample per
    NFE, (37)): its law is the enumerated step-by-step mixture, not the average of the
    components' whole-trajectory laws (one lambda kept per sample), which differs by more than
    0.1 here. 40,000 draws, TV tolerance 0.02 (sampling TV is about 0.006)."""
    proc, N, n = make_masked(3), 2, 40000
    times = torch.linspace(1, 0, N + 1)
    table = torch.randn(2, 9, 2, 3, generator=gen(5))
    table[0, ..., 0] += 3                                  # component 0 leans to 0, component 1 to 1
    table[1, ..., 1] += 3
    table[..., 2] = -1e4                                                     # never predict [MASK]
    net = TableDenoiser(table, 3)
    comps = [lambda x, t, lam, c=c: net(x, t, torch.full((x.shape[0], 1), (c + 0.5) / 2))
             for c in range(2)]
    fresh, _ = exact_sampler_law(proc, [comps] * N, times.tolist())
    kept = sum(exact_sampler_law(proc, [[c]] * N, times.tolist())[0] for c in comps) / 2
    assert 0.5 * (fresh - kept).abs().sum() > 0.1
    x, _ = core.ancestral_sample(proc, proc.prior(n, 2), times, net, lam_dim=1, generator=gen(6))
    freq = torch.bincount(state_index(x, 3), minlength=9).double() / n
    assert 0.5 * (freq - fresh).abs().sum() < 0.02
