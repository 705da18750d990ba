"""Checks a run makes before any work, so that a later stage cannot fail after hours of training:
the packages its metrics need, the checkpoints it was given, and what another Di4C round allows.
Each script's run_needs() lists (problem, fix) pairs; preflight() stops with one line naming them.
"""
import importlib.util
import os


def package_needs(packages: dict) -> list:
    """[(problem, fix)] for every {import name: (pip name, what needs it)} not installed."""
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
    """Stop before any work when a later stage would fail: `needs` are (problem, fix) pairs."""
    if needs:
        raise SystemExit("error: a later stage of this run would fail, so nothing was started: "
                         + "; ".join(f"{problem} ({fix})" for problem, fix in needs))


def check_round(cfg, lam_T: int):
    """Another Di4C round (a student as --teacher_ckpt, lam_T > 0; docs/method.md (35)): no
    control (a mixture has no loss of its own to fine-tune with)."""
    if lam_T and cfg.control_iters:
        raise SystemExit("error: the control fine-tunes a product teacher with its own loss; a "
                         "Di4C student as teacher (another round) has none: add --control_iters 0")
