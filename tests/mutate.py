"""Mutation check of the core's tests: put one single-line bug at a time into a copy of
di4c_core.py, run the core tests on it, and report whether they catch it.

    python tests/mutate.py            # every mutant; prints caught / survived and a score
    python tests/mutate.py -k alpha   # only mutants whose name contains "alpha"

Each mutant is a real mistake a Di4C implementation can make and still train (see
tests/test_core_contracts.py); a survivor means the tests cannot see that class of bug.
Exit status 1 when a mutant survives or no longer applies (the core line it edits changed).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ["tests/test_core_exact.py", "tests/test_core_contracts.py", "tests/test_toy.py"]

# (name, bug class, exact text of one core line (a unique substring), replacement)
MUTANTS = [
    ("target_at_t", "time mix-up: consistency target at t instead of u",
     "log_p_u = log_probs(target(x_u, repeat_batch(u, L),",
     "log_p_u = log_probs(target(x_u, repeat_batch(t, L),"),
    ("teacher_step_to_t", "time mix-up: teacher step t -> t",
     "x_u = teacher_step(repeat_batch(x_t, L), repeat_batch(t, L), repeat_batch(u, L),",
     "x_u = teacher_step(repeat_batch(x_t, L), repeat_batch(t, L), repeat_batch(t, L),"),
    ("student_at_u", "time mix-up: the student's graph call at u",
     "log_p_s = student_log_probs(student, x_t, t, L, lam_dim, generator, cond=cond)",
     "log_p_s = student_log_probs(student, x_t, u, L, lam_dim, generator, cond=cond)"),
    ("target_not_detached", "stop-gradient: gradients flow through the consistency target",
     "return marginal_kl(mixture_marginal_logp(log_p_target).detach(), log_m)",
     "return marginal_kl(mixture_marginal_logp(log_p_target), log_m)"),
    ("student_detached_in_consis_indep", "stop-gradient: the student detached, not the target",
     "return marginal_kl(mixture_marginal_logp(log_p_target).detach(), log_m)",
     "return marginal_kl(mixture_marginal_logp(log_p_target).detach(), log_m.detach())"),
    ("data_indep_detached", "stop-gradient: data_indep's log m detached",
     "return marginal_kl(log_p_teacher, log_m)",
     "return marginal_kl(log_p_teacher, log_m.detach())"),
    ("alpha_sign", "alpha(t) with its sign flipped",
     '"sigmoid": lambda: torch.sigmoid(20 * (t - 0.5))',
     '"sigmoid": lambda: torch.sigmoid(-20 * (t - 0.5))'),
    ("weights_swapped", "weights: distillation term weighted by the consistency weight",
     'loss = (w["distil"] * terms["distil"]',
     'loss = (w["consis"] * terms["distil"]'),
    ("sampler_lambda_shared_in_batch", "lambda sharing: one lambda for the whole batch",
     "lam = draw_lambda(B, dim, generator, x.device) if dim > 0 else None",
     "lam = draw_lambda(1, dim, generator, x.device).expand(B, -1) if dim > 0 else None"),
    ("sampler_lambda_kept_across_steps", "lambda sharing: one lambda for all steps of a sample",
     "lam = draw_lambda(B, dim, generator, x.device) if dim > 0 else None",
     "lam = (draw_lambda(B, dim, generator, x.device) if k == 0 or lam is None else lam) "
     "if dim > 0 else None"),
    ("target_lambda_not_fresh", "lambda sharing: the target reuses one fixed lambda",
     "lam_u = draw_lambda(B * L, lam_dim, generator, x_t.device)",
     "lam_u = torch.zeros(B * L, lam_dim, device=x_t.device)"),
    ("hybrid_one_short", "step grid: the hybrid hands one NFE too few to the teacher",
     "net, dim = (teacher, 0) if k >= n_total - n_teacher else (denoiser, lam_dim)",
     "net, dim = (teacher, 0) if k > n_total - n_teacher else (denoiser, lam_dim)"),
    ("sampler_step_times_swapped", "step grid: the sampler steps from t_{k+1} to t_k",
     "x = process.step(log_p0, x, t_k, times[k + 1].expand(B).to(x.device), generator)",
     "x = process.step(log_p0, x, times[k + 1].expand(B).to(x.device), t_k, generator)"),
    ("float32_logits", "categorical draws in float32 (log-probabilities)",
     "lp = flat[idx].double()", "lp = flat[idx].float()"),
    ("float32_noise", "categorical draws in float32 (Gumbel noise)",
     "u = torch.rand(lp.shape, generator=generator, dtype=torch.float64, device=lp.device)",
     "u = torch.rand(lp.shape, generator=generator, dtype=torch.float32, device=lp.device)"),
    ("mixture_teacher_one_lambda", "a mixture teacher's marginal taken from a single lambda",
     "return mixture_marginal_logp(student_log_probs(teacher, x, t, L, lam_dim, generator,",
     "return mixture_marginal_logp(student_log_probs(teacher, x, t, 1, lam_dim, generator,"),
    ("control_variate_sign", "estimator: control variate added instead of subtracted",
     "return J - (cv.squeeze(1) if y.dim() == 2 else cv)",
     "return J + (cv.squeeze(1) if y.dim() == 2 else cv)"),
    ("joint_without_log_L", "estimator: J^ without its - log L",
     "J = torch.logsumexp(ll, dim=-1) - math.log(L)", "J = torch.logsumexp(ll, dim=-1)"),
    ("cond_not_repeated", "conditioning: cond not repeated with the lambda-batch",
     "logits = student(repeat_batch(x, L), repeat_batch(t, L), lam, repeat_batch(cond, L))",
     "logits = student(repeat_batch(x, L), repeat_batch(t, L), lam, cond)"),
]


def apply(source: str, old: str, new: str) -> str:
    if source.count(old) != 1:
        raise ValueError(f"the line to mutate occurs {source.count(old)} times: {old!r}")
    return source.replace(old, new)


def run_mutant(source: str, workdir: str) -> tuple:
    with open(os.path.join(workdir, "di4c_core.py"), "w") as f:
        f.write(source)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        *TESTS], cwd=workdir, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    failed = [line.split("::")[-1].split(" ")[0] for line in r.stdout.splitlines()
              if line.startswith("FAILED")]
    return r.returncode != 0, failed[:1], time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-k", default="", help="only mutants whose name contains this")
    args = p.parse_args(argv)
    source = open(os.path.join(ROOT, "di4c_core.py")).read()
    chosen = [m for m in MUTANTS if args.k in m[0]]
    rows, bad = [], 0
    with tempfile.TemporaryDirectory() as work:
        shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(work, "tests"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for f in ("toy_correlated.py", "pytest.ini"):
            shutil.copy(os.path.join(ROOT, f), work)
        ok, _, secs = run_mutant(source, work)
        if ok:
            raise SystemExit("error: the core tests fail on the unmutated core; fix them first")
        print(f"unmutated core: tests pass ({secs:.0f} s)")
        for name, what, old, new in chosen:
            try:
                caught, by, secs = run_mutant(apply(source, old, new), work)
                verdict = "caught" if caught else "SURVIVED"
            except ValueError as e:
                caught, by, secs, verdict = False, [str(e)], 0.0, "NOT APPLIED"
            bad += not caught
            rows.append((name, what, verdict, by[0] if by else "", secs))
            print(f"{verdict:<11} {name:<34} {what}  [{by[0] if by else '-'}; {secs:.0f} s]",
                  flush=True)
    print(f"\nscore: {len(rows) - bad}/{len(rows)} mutants caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
