"""Training cost of a Di4C step over a teacher step, at equal x_t per step, side by side in one
run: the paper's lambda injection (every block) against late fusion (--lam_late k: only the last
k blocks see lambda, the trunk runs once per x_t). Text (owt_masked.py) only for now.

    python bench/step_cost.py                    # demo and paper sizes
    python bench/step_cost.py --sizes demo --repeats 5

Per size: B x_t per step (random tokens, half masked on average as the loss draws t), the
teacher step = MDLM loss forward + backward on the B x_t; a Di4C step = core.di4c_loss (SDTT
variant) forward + backward with L lambdas per x_t. Median seconds of `repeats` steps after one
warm-up, float32 on this machine's CPU. At the paper size the CPU runs L = 4 (of 16), said in
the table.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import di4c_core as core  # noqa: E402
import owt_masked as owt  # noqa: E402

SIZES = {   # preset, overrides, B (x_t per step), L, late-fusion k values to compare
    "demo": ("demo", {}, 4, 8, (1, 2)),
    "paper": ("paper", {}, 1, 4, (1, 2, 4)),
}


def timed(fn, repeats: int) -> float:
    fn()                                                   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(size: str, repeats: int) -> list:
    preset, over, B, L, ks = SIZES[size]
    cfg = owt.make_config(owt.Config, preset=preset, dropout=0.0, **over)
    S = 50258 if preset == "paper" else 5031               # GPT-2 + [MASK]; the demo's remapped ids
    torch.manual_seed(0)
    teacher = owt.build_model(cfg, S).eval().requires_grad_(False)
    process = owt.make_process(S)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, S - 1, (B, cfg.seq_len), generator=g)
    trainee = owt.build_model(cfg, S)
    trainee.load_state_dict(teacher.state_dict())

    def teacher_step():
        trainee.zero_grad()
        loss, _ = owt.mdlm_loss(trainee, x0, process, g)
        loss.mean().backward()

    rows = [("teacher step (MDLM loss)", B, "-", timed(teacher_step, repeats))]
    marginal, step = core.make_teacher(teacher, process, 0, L)
    for k in (0, *ks):
        student = core.student_from_teacher(owt.build_model(cfg, S, lam_dim=1, lam_late=k),
                                            teacher.state_dict())

        def di4c_step():
            student.zero_grad()
            t, u = owt.di4c_times(cfg, B, g)
            x_t = process.add_noise(x0, t, g)
            w = core.variant_weights("sdtt", t, cfg.delta, cfg.alpha_const)
            loss, _ = core.di4c_loss(student, x0, x_t, t, u, weights=w, teacher_marginal=marginal,
                                     teacher_step=step, L=L, lam_dim=1,
                                     student_target=core.eval_target(student), generator=g)
            loss.mean().backward()

        name = "Di4C step, paper injection" if k == 0 else f"Di4C step, late fusion k = {k}"
        rows.append((name, B, L, timed(di4c_step, repeats)))
    return [(size, cfg.n_layer, *r) for r in rows]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["demo", "paper"])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    print("| size | blocks | step | x_t | L | seconds | / teacher step |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for size in a.sizes:
        rows = measure(size, a.repeats)
        base = rows[0][-1]
        for size_, n, name, B, L, sec in rows:
            print(f"| {size_} | {n} | {name} | {B} | {L} | {sec:.3f} | {sec / base:.1f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
