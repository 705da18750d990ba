"""Mutation check of the tests: put one single-line bug at a time into a copy of the core or of
a domain script, run the tests that pin that file on it, and report whether they catch it.

    python tests/mutate.py              # every mutant; prints caught / survived and a score
    python tests/mutate.py -k cifar     # only mutants whose name contains "cifar"

Each mutant is a real mistake a Di4C implementation can make and still train: in the core
(tests/test_core_contracts.py), in each script's Di4C wiring (tests/test_pipelines.py: the
times drawn, the teacher's step, the per-row weights, labels and prefixes, CFG, the hybrid,
the control's compute) and in the selection of the student kept (tests/test_validation.py). A
survivor means the tests cannot see that class of bug.
Exit status 1 when a mutant survives or no longer applies (the line it edits changed).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE_TESTS = ["tests/test_core_exact.py", "tests/test_core_contracts.py", "tests/test_toy.py"]
TESTS = {"di4c_core.py": CORE_TESTS,        # the file a mutant edits -> the tests that pin it
         "cifar10_gaussian.py": ["tests/test_pipelines.py", "tests/test_cifar10.py"],
         "imagenet_masked.py": ["tests/test_pipelines.py", "tests/test_imagenet.py"],
         "owt_masked.py": ["tests/test_pipelines.py", "tests/test_owt.py"],
         "eval/validation.py": ["tests/test_validation.py"]}

# (name, bug class, exact text of one core line (a unique substring), replacement)
CORE = [
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
     "return const * torch.sigmoid(20 * (t - 0.5))",
     "return const * torch.sigmoid(-20 * (t - 0.5))"),
    ("weights_swapped", "weights: distillation term weighted by the consistency weight",
     'loss = (w["distil"] * terms["distil"]',
     'loss = (w["consis"] * terms["distil"]'),
    ("sampler_lambda_shared_in_batch", "lambda sharing: one lambda for the whole batch",
     "lam = draw_lambda(B, dim, generator, x.device) if dim > 0 else None   # (B, dim)",
     "lam = draw_lambda(1, dim, generator, x.device).expand(B, -1) if dim > 0 else None"),
    ("sampler_lambda_kept_across_steps", "lambda sharing: one lambda for all steps of a sample",
     "lam = draw_lambda(B, dim, generator, x.device) if dim > 0 else None   # (B, dim)",
     "lam = (draw_lambda(B, dim, generator, x.device) if k == 0 or lam is None else lam) "
     "if dim > 0 else None"),
    ("target_lambda_not_fresh", "lambda sharing: the target reuses one fixed lambda",
     "lam_u = draw_lambda(B * L, lam_dim, generator, x_t.device)",
     "lam_u = torch.zeros(B * L, lam_dim, device=x_t.device)"),
    ("hybrid_one_short", "step grid: the hybrid hands one NFE too few to the teacher",
     "net, dim = ((teacher, teacher_lam_dim) if k >= n_total - n_teacher",
     "net, dim = ((teacher, teacher_lam_dim) if k > n_total - n_teacher"),
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
    ("mixture_teacher_step_from_marginals", "a mixture teacher's step drawn from the marginals",
     "            log_p0 = log_probs(teacher(x_t, t, lam, cond))",
     "            log_p0 = log_p0"),
    ("control_variate_sign", "estimator: control variate added instead of subtracted",
     "return J - (cv.squeeze(1) if y.dim() == 2 else cv)",
     "return J + (cv.squeeze(1) if y.dim() == 2 else cv)"),
    ("joint_without_log_L", "estimator: J^ without its - log L",
     "J = torch.logsumexp(ll, dim=-1) - math.log(L)", "J = torch.logsumexp(ll, dim=-1)"),
    ("cond_not_repeated", "conditioning: cond not repeated with the lambda-batch",
     "logits = student(repeat_batch(x, L), repeat_batch(t, L), lam, repeat_batch(cond, L))",
     "logits = student(repeat_batch(x, L), repeat_batch(t, L), lam, cond)"),
]

# The scripts' Di4C wiring: (name, bug class, unique text in the script, replacement)
CIFAR = [
    ("cifar_teacher_step_zero", "teacher step: length zero (u = t)",
     "    u = t - delta\n", "    u = t\n"),
    ("cifar_delta_range", "times: delta drawn from LogU[1e-2, 1e-1] instead of [1e-3, 1e-2]",
     "delta = 10 ** (-3 + rand())", "delta = 10 ** (-2 + rand())"),
    ("cifar_tau_range_50x", "times: tau drawn from a range 50x too wide",
     "(rand() < 0.5).float() * rand() * 0.01", "(rand() < 0.5).float() * rand() * 0.5"),
    ("cifar_x_t_at_u", "times: x_t noised at u instead of t",
     "x_t, x_tau = proc.add_noise(x0, t, g), proc.add_noise(x0, tau, g)",
     "x_t, x_tau = proc.add_noise(x0, u, g), proc.add_noise(x0, tau, g)"),
    ("cifar_alpha_const_dropped", "weights: the data term's alpha_const dropped",
     'weights = core.variant_weights("tauldr", t, alpha_const=cfg.alpha_const)',
     'weights = core.variant_weights("tauldr", t)'),
    ("cifar_control_rows", "control compute: a Di4C step counted without its x_tau rows",
     "(3 * 2 * B * L + B * L + 2 * B)", "(3 * B * L + B * L + 2 * B)"),
    ("cifar_hybrid_without_teacher", "hybrid: stage_sample drops the teacher NFEs",
     "n_teacher=n_teacher, seed=cfg.seed + lo)", "n_teacher=0, seed=cfg.seed + lo)"),
    ("cifar_hybrid_runs", "hybrid: the sample sets get one teacher NFE too many",
     '(f"hybrid@{n}", "student", n, cfg.hybrid_teacher_steps)',
     '(f"hybrid@{n}", "student", n, cfg.hybrid_teacher_steps + 1)'),
    ("cifar_control_variate_ignored", "switch: --control_variate not passed on",
     "control_variate=cfg.control_variate, generator=g)", "generator=g)"),
    ("validation_on_training_images", "validation: CIFAR-10 scored against the training images",
     'val = load_images(cfg, "val")\n', 'val = load_images(cfg)\n'),
]
IMAGENET = [
    ("imagenet_teacher_step_zero", "teacher step: length zero (u = t)",
     "u = (t - R_DELTA).clamp_min(0)", "u = t"),
    ("imagenet_teacher_reveals_at_t", "teacher step: reveals for r instead of r + R_DELTA",
     "n = ((1 - gamma(r_next)) * D - (D - masked)).floor().long()",
     "n = ((1 - gamma(r)) * D - (D - masked)).floor().long()"),
    ("imagenet_labels_not_passed", "labels: the Di4C step runs unconditionally",
     "weights=weights, cond=y,", "weights=weights,"),
    ("imagenet_labels_never_dropped", "labels: no CFG label dropout in the Di4C step",
     "< LABEL_DROP, n_classes, y)\n        t = torch.rand(B, generator=g, device=dev)",
     "< 0.0, n_classes, y)\n        t = torch.rand(B, generator=g, device=dev)"),
    ("imagenet_data_term_ignored", "weights: --alpha_const 0 still weights the data term",
     "R_DELTA, cfg.alpha_const)", "R_DELTA, cfg.alpha_const or 0.1)"),
    ("imagenet_cfg_sign", "CFG: the combination's sign flipped (default sampler)",
     "logits = (1 + w * ratio) * logits - w * ratio * u_logits\n        n = torch.full",
     "logits = (1 + w * ratio) * logits + w * ratio * u_logits\n        n = torch.full"),
    ("imagenet_lfg_ignored", "CFG: --lfg's teacher branch not used by the sampler",
     "u_logits = (uncond(x, None, None, dropped) if uncond is not None",
     "u_logits = (net(x, None, lam, dropped) if uncond is not None"),
    ("imagenet_cfg_fresh_lambda", "CFG: the unconditional branch draws its own lambda",
     "else net(x, None, lam, dropped)).float()",
     "else net(x, None, core.draw_lambda(N, lam_dim, generator, dev), dropped)).float()"),
    ("imagenet_lfg_not_passed", "CFG: stage_sample never hands --lfg the teacher",
     'uncond = nets["teacher"][0] if cfg.lfg else None', "uncond = None"),
    ("imagenet_control_rows", "control compute: counted on the teacher's batch",
     "    B, L = cfg.distil_batch, cfg.L\n    return math.ceil(cfg.distil_iters * (3 * B * L + B",
     "    B, L = cfg.batch_size, cfg.L\n    return math.ceil(cfg.distil_iters * (3 * B * L + B"),
    ("validation_on_training_images", "validation: ImageNet scored against the training images",
     'image_folder(cfg, "val"), WORKERS) for img in x)',
     'image_folder(cfg, "train"), WORKERS) for img in x)'),
]
OWT = [
    ("owt_teacher_step_zero", "teacher step: length zero (u = t)",
     "return t, t - torch.minimum(torch.full_like(t, 1 / cfg.T), t / 2)",
     "return t, t - 0 * torch.minimum(torch.full_like(t, 1 / cfg.T), t / 2)"),
    ("owt_split_inverted", "times: the distillation / consistency split inverted",
     "distil = torch.rand(B, generator=g, device=dev) < DISTIL_PROB",
     "distil = torch.rand(B, generator=g, device=dev) >= DISTIL_PROB"),
    ("owt_snap_down", "times: t snapped down to the grid (t = 0 possible)",
     "t = ((t * cfg.T).floor().clamp_max(cfg.T - 1) + 1) / cfg.T",
     "t = (t * cfg.T).floor() / cfg.T"),
    ("owt_x_t_at_u", "times: x_t masked at u instead of t",
     "x_t = process.add_noise(x0, t, g)                                     # (B, D)\n"
     "        weights",
     "x_t = process.add_noise(x0, u, g)                                     # (B, D)\n"
     "        weights"),
    ("owt_alpha_const_dropped", "weights: ALPHA_CONST dropped (the variant's default 0.1)",
     'core.variant_weights("sdtt", t, cfg.delta, ALPHA_CONST)',
     'core.variant_weights("sdtt", t, cfg.delta)'),
    ("owt_prefix_dropped", "prefixes: conditional samples start from an all-[MASK] x_T",
     "x_cond[:, :prefix_len] = prefix.repeat_interleave(N_CONT, 0)",
     "x_cond[:, :0] = prefix.repeat_interleave(N_CONT, 0)"),
    ("owt_control_rows", "control compute: a Di4C step counted with x_tau rows",
     "(3 * B * L + B * L + B) / (3 * cfg.batch_size))",
     "(3 * 2 * B * L + B * L + 2 * B) / (3 * cfg.batch_size))"),
]
VALIDATION = [      # never worse than the teacher: the selection and the warning
    ("validation_ratio_inverted", "selection: teacher / student instead of student / teacher",
     "log_ratio = sum(math.log(values[c] / self.teacher[c]) for c in values) / len(values)",
     "log_ratio = sum(math.log(self.teacher[c] / values[c]) for c in values) / len(values)"),
    ("validation_keeps_the_last", "selection: every validated student replaces the best",
     "if self.best is None or (worse, log_ratio) < tuple(self.best[0]):", "if True:"),
    ("validation_best_not_restored", "selection: the last weights written, not the best",
     "        model.load_state_dict(self.best[2])\n", "        pass\n"),
    ("validation_warning_direction", "warning: the better cells named instead of the worse",
     "if r[\"model\"] in models and t is not None and r[key] > t:",
     "if r[\"model\"] in models and t is not None and r[key] < t:"),
]
MUTANTS = {"di4c_core.py": CORE, "cifar10_gaussian.py": CIFAR, "imagenet_masked.py": IMAGENET,
           "owt_masked.py": OWT, "eval/validation.py": VALIDATION}



def apply(source: str, old: str, new: str) -> str:
    if source.count(old) != 1:
        raise ValueError(f"the line to mutate occurs {source.count(old)} times: {old!r}")
    return source.replace(old, new)


def run_tests(target: str, source: str, workdir: str) -> tuple:
    """Write `source` as `target` in the copy, run its tests (stop at the first failure)."""
    with open(os.path.join(workdir, target), "w") as f:
        f.write(source)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        *TESTS[target]], cwd=workdir, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    failed = [line.split("::")[-1].split(" ")[0] for line in r.stdout.splitlines()
              if line.startswith("FAILED")]
    return r.returncode != 0, failed[:1], time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-k", default="", help="only mutants whose name contains this")
    args = p.parse_args(argv)
    rows, bad = [], 0
    with tempfile.TemporaryDirectory() as work:
        copy = os.path.join(work, "repo")
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache"))
        for target, mutants in MUTANTS.items():
            chosen = [m for m in mutants if args.k in m[0]]
            if not chosen:
                continue
            source = open(os.path.join(ROOT, target)).read()
            caught, _, secs = run_tests(target, source, copy)
            if caught:
                raise SystemExit(f"error: the tests of {target} fail on the unmutated file; "
                                 "fix them first")
            print(f"unmutated {target}: tests pass ({secs:.0f} s)", flush=True)
            for name, what, old, new in chosen:
                try:
                    caught, by, secs = run_tests(target, apply(source, old, new), copy)
                    verdict = "caught" if caught else "SURVIVED"
                except ValueError as e:
                    caught, by, secs, verdict = False, [str(e)], 0.0, "NOT APPLIED"
                bad += not caught
                rows.append((name, what, verdict, by[0] if by else "", secs))
                print(f"{verdict:<11} {name:<34} {what}  [{by[0] if by else '-'}; {secs:.0f} s]",
                      flush=True)
            with open(os.path.join(copy, target), "w") as f:
                f.write(source)
    print(f"\nscore: {len(rows) - bad}/{len(rows)} mutants caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
