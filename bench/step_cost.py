"""Training cost of a Di4C step over a teacher step, at equal x_t per step, side by side in one
run, in the three domain scripts.

    python bench/step_cost.py                                   # all domains, demo and paper sizes
    python bench/step_cost.py --domains images pixels --sizes demo --repeats 5

Per domain and size: B x_t per step; the teacher step = the script's teacher objective forward +
backward on the B x_t (text: MDLM loss; images: MaskGIT's; pixels: tauLDR's); a Di4C step = the
script's Di4C objective (core.di4c_loss in its variant) forward + backward with L lambdas per
x_t (pixels: also the x_tau rows of the tauLDR variant). Median seconds of `repeats` steps after
one warm-up, float32 on this machine's CPU. At the paper sizes the CPU runs L = 4 (of the
presets' 16 or 32), said in the table.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cifar10_gaussian as pix  # noqa: E402
import di4c_core as core  # noqa: E402
import imagenet_masked as img  # noqa: E402
import owt_masked as owt  # noqa: E402

SIZES = {   # domain -> size -> (preset, overrides, B (x_t per step), L)
    "text": {"demo": ("demo", {}, 4, 8), "paper": ("paper", {}, 1, 4)},
    "images": {"demo": ("demo", {}, 4, 16), "paper": ("paper", {}, 1, 4)},
    "pixels": {"demo": ("demo", {}, 8, 16), "paper": ("paper", {}, 1, 4)},
}


def timed(fn, repeats: int) -> float:
    fn()                                                   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_text(size: str, repeats: int) -> list:
    preset, over, B, L = SIZES["text"][size]
    cfg = owt.make_config(owt.Config, preset=preset, dropout=0.0, L=L, **over)
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
    student = core.student_from_teacher(owt.build_model(cfg, S, lam_dim=1), teacher.state_dict())
    loss = owt.di4c_loss(cfg, teacher, student, process)

    def di4c_step():
        student.zero_grad()
        loss(student, x0, g)[0].mean().backward()

    rows.append(("Di4C step", B, L, timed(di4c_step, repeats)))
    return [("text", size, *r) for r in rows]


def measure_images(size: str, repeats: int) -> list:
    """imagenet_masked.py: MaskGIT's loss vs its Di4C loss (MaskGIT variant, class labels)."""
    preset, over, B, L = SIZES["images"][size]
    cfg = img.make_config(img.Config, preset=preset, dropout=(0.0, 0.0), L=L, **over)
    meta = ({"K": 1024, "grid": cfg.img_size // 16, "n_classes": 1000}
            if preset == "paper" else {"K": 17, "grid": 8, "n_classes": 5})
    torch.manual_seed(0)
    teacher = img.build_model(cfg, meta).eval().requires_grad_(False)
    process = img.make_process(meta)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, meta["K"], (B, meta["grid"] ** 2), generator=g),
             torch.randint(0, meta["n_classes"], (B,), generator=g))
    trainee = img.build_model(cfg, meta)
    trainee.load_state_dict(teacher.state_dict())
    teacher_loss = img.maskgit_loss(cfg, process, meta["n_classes"])

    def teacher_step():
        trainee.zero_grad()
        teacher_loss(trainee, batch, g)[0].mean().backward()

    rows = [("teacher step (MaskGIT loss)", B, "-", timed(teacher_step, repeats))]
    student = core.student_from_teacher(img.build_model(cfg, meta, lam_dim=1),
                                        teacher.state_dict())
    loss = img.di4c_loss(cfg, teacher, student, process, meta["n_classes"])

    def di4c_step():
        student.zero_grad()
        loss(student, batch, g)[0].mean().backward()

    rows.append(("Di4C step", B, L, timed(di4c_step, repeats)))
    return [("images", size, *r) for r in rows]


def measure_pixels(size: str, repeats: int) -> list:
    """cifar10_gaussian.py: tauLDR's loss vs its Di4C step (tauLDR variant, x_tau rows too)."""
    preset, over, B, L = SIZES["pixels"][size]
    cfg = pix.make_config(pix.Config, preset=preset, dropout=0.0, L=L, **over)
    C, H = (3, 32) if preset == "paper" else (1, 8)
    torch.manual_seed(0)
    teacher = pix.build_unet(cfg, C, H, lam=False).eval().requires_grad_(False)
    proc = pix.build_process(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, cfg.S, (B, C * H * H), generator=g)
    trainee = pix.build_unet(cfg, C, H, lam=False)
    trainee.load_state_dict(teacher.state_dict())
    teacher_loss = pix.teacher_objective(cfg, proc)

    def teacher_step():
        trainee.zero_grad()
        teacher_loss(trainee, (x0,), g)[0].mean().backward()

    rows = [("teacher step (tauLDR loss)", B, "-", timed(teacher_step, repeats))]
    fns = core.make_teacher(teacher, proc.step)
    student = pix.student_from_teacher(teacher, cfg)

    def di4c_step():
        student.zero_grad()
        pix.di4c_step(student, student, fns, proc, x0, cfg, g)[0].mean().backward()

    rows.append(("Di4C step", B, L, timed(di4c_step, repeats)))
    return [("pixels", size, *r) for r in rows]


MEASURE = {"text": measure_text, "images": measure_images, "pixels": measure_pixels}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", nargs="+", choices=sorted(MEASURE), default=sorted(MEASURE))
    p.add_argument("--sizes", nargs="+", choices=("demo", "paper"), default=["demo", "paper"])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    print("| domain | size | step | x_t | L | seconds | / teacher step |")
    print("|---|---|---|---:|---:|---:|---:|")
    for domain in a.domains:
        for size in a.sizes:
            rows = MEASURE[domain](size, a.repeats)
            base = rows[0][-1]
            for dom, size_, name, B, L, sec in rows:
                print(f"| {dom} | {size_} | {name} | {B} | {L} | {sec:.3f} | "
                      f"{sec / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
