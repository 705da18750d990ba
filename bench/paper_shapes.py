"""Paper-shape check: each script's `paper` preset at full model size and the real D and S, on
synthetic data written in the real on-disk formats, runs 2 steps of every training stage and one
call of every sampler on this machine (CPU is enough), and projects the cost of the preset.

    python bench/paper_shapes.py                          # the three scripts, full widths
    python bench/paper_shapes.py --script owt_masked      # one of them
    python bench/paper_shapes.py --narrow                 # real D and S, narrow networks (CI)

Shapes: CIFAR-10 3x32x32 pixels with S = 256; ImageNet 16x16 VQGAN tokens, 1,024 codes + [MASK];
OpenWebText 1,024 GPT-2 tokens, 50,257 ids + [MASK]. Data: CIFAR-10 python-pickle batches, an
ImageFolder of JPEGs (ImageNet's train/ and val/ layout, 10 classes) with a random-weight VQGAN
in MaskGIT-pytorch's checkpoint format, an OpenWebText-like parquet shard.

Per training stage it prints: parameters, the rows it ran (global batch x L for Di4C; on a
24 GiB CPU the lambda-batch L is reduced where the preset's does not fit: the table says so),
CPU seconds per step and peak memory, FLOPs per step (the script runs in-process with its
training loop instrumented: `instrumented` counts the first step's FLOPs with torch's
FlopCounterMode and reads memory before and after each stage; scaled linearly to the preset's
global batch and L), and the projection for the preset's iteration
count: GPU-hours on an A100 and an H100 at UTIL of their dense peak (bf16 for bfloat16
presets, TF32 for float32 ones), and memory per GPU when the global batch is split over the
`gpus` of the table without --micro_batch (float32 activations, so an upper estimate under
bf16 autocast), with the --micro_batch that fits 80 GB where it does not. Results go to
OUT/paper_shapes.json and OUT/paper_shapes.md.
"""
import argparse
import importlib
import json
import math
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

UTIL = 0.4                                  # assumed model-FLOP utilisation
PEAK = {"A100": {"bfloat16": 312e12, "float32": 156e12},     # dense bf16 / TF32, SXM
        "H100": {"bfloat16": 989e12, "float32": 495e12}}
GPU_GB = 80


# -----------------------------------------------------------------------------
# Synthetic data in the real on-disk formats


def write_cifar10(root: str, n: int = 64) -> list:
    """CIFAR-10's python-pickle batches: data_batch_1..5 and test_batch ({b"data": (n, 3072)
    uint8, ...})."""
    import numpy as np
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n // 5 + 1, 3072), dtype=np.uint8),
                         b"labels": [0] * (n // 5 + 1)}, f)
    return ["--data_dir", root]


def write_imagenet(root: str, classes: int = 10, per_class: int = 2) -> list:
    """ImageNet's layout (train/<class>/*.JPEG, val/<class>/*.JPEG) at 300x260 pixels, and a
    random-weight f16 VQGAN at the paper's sizes in MaskGIT-pytorch's checkpoint format."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            for j in range(per_class):
                img = rng.integers(0, 256, (260, 300, 3), dtype=np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"img_{j}.JPEG"), quality=90)
    return ["--data_dir", root]


def write_vqgan(path: str, **sizes):
    import torch
    from pretrained import taming_vqgan
    torch.manual_seed(0)
    vq = taming_vqgan.build_vqgan(**sizes)
    torch.save({"state_dict": vq.state_dict()}, path)


def write_openwebtext(root: str, n_docs: int = 120) -> list:
    """A parquet shard with OpenWebText's "text" column (documents of random English words)."""
    import datasets
    words = ("the of and to in is that for it as was with be by on not he this are or his from "
             "at which but have an they you were her she there been one all we their has would "
             "when if so no more out up into do any your what time can only other new some "
             "could these two may first then people than like well such").split()
    rng = random.Random(0)
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(300, 900)))
            for _ in range(n_docs)]
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "train-00000-of-00001.parquet")
    datasets.Dataset.from_dict({"text": docs}).to_parquet(path)
    return ["--data_files", path, "--val_docs", "6"]


# -----------------------------------------------------------------------------
# What runs: per script, its stages, the bench's overrides and the preset's cost model


SCRIPTS = {
    "cifar10_gaussian": dict(
        stages=("teacher", "distill", "sample"), gpus=8,
        bench=dict(teacher_iters=2, teacher_batch=2, distil_iters=2, batch_size=1,
                   control_iters=2, n_samples=2, sample_batch=2, steps=(2,),
                   student_steps=(2,), hybrid_teacher_steps=1),
        narrow=dict(ch=8, L=4),
        fits={"teacher": ("teacher_iters", "teacher_batch", False),
              "student": ("distil_iters", "batch_size", True),
              "control": ("control_iters", "teacher_batch", False)}),
    "imagenet_masked": dict(
        stages=("tokenize", "teacher", "distill", "sample"), gpus=2,
        bench=dict(teacher_iters=2, batch_size=2, distil_iters=2, distil_batch=1, L=8,
                   control_iters=2, n_per_class=1, sample_batch=10, steps=(2,),
                   student_steps=(2,), cfg_ws=(3.0,)),   # the preset's CFG sweep: sampling only
        narrow=dict(n_layer=1, n_embd=32, n_head=2, mlp_dim=64, L=4),   # and a VQGAN of width 32
        fits={"teacher": ("teacher_iters", "batch_size", False),
              "student": ("distil_iters", "distil_batch", True),
              "control": ("control_iters", "batch_size", False)}),
    "owt_masked": dict(
        stages=("teacher", "distill", "sample", "eval"), gpus=2,
        bench=dict(teacher_iters=2, batch_size=2, distil_iters=2, distil_batch=1, L=4,
                   control_iters=2, judge_iters=2, steps=(2,), student_steps=(2,), n_samples=2,
                   sample_batch=2, prefix=(1, 50, 50),
                   judge="trained",              # GPT-2 Large is not here: the trained judge
                   teacher_ckpt=""),             # the teacher's training cost, not SDTT's file
        constants=dict(LATENCY_RUNS=1, N_CONT=2),  # module constants: one timed call, 2 texts
        narrow=dict(n_layer=1, n_embd=32, n_head=2, cond_dim=16, L=1, n_samples=1,
                    sample_batch=1),
        fits={"teacher": ("teacher_iters", "batch_size", False),
              "student": ("distil_iters", "distil_batch", True),
              "control": ("control_iters", "batch_size", False),
              "judge": ("judge_iters", "batch_size", False)}),
}


def cli_args(overrides: dict) -> list:
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", *map(str, v)] if isinstance(v, tuple) else [f"--{k}", str(v)]
    return out


def data_args(name: str, work: str, narrow: bool) -> list:
    if name == "cifar10_gaussian":
        return write_cifar10(os.path.join(work, "cifar10"))
    if name == "imagenet_masked":
        args = write_imagenet(os.path.join(work, "imagenet"))
        from pretrained.taming_vqgan import VQVAE
        m = importlib.import_module(name)            # the script reads the sizes off the file
        paper = m.make_config(m.Config, preset="paper")
        ckpt = os.path.join(work, "vqgan_last.ckpt")
        write_vqgan(ckpt, **{**VQVAE[paper.img_size], **({"ch": 32} if narrow else {})},
                    img_size=paper.img_size)
        return args + ["--vqgan_ckpt", ckpt]
    return write_openwebtext(os.path.join(work, "openwebtext"))


def memory_gb(peak: bool = False, reset: bool = False) -> float:
    """This process's resident set (Linux /proc), or its peak since the last reset; reset=True
    first hands freed heap pages back (glibc) so the next peak counts what a stage allocates."""
    try:
        if reset:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        status = open("/proc/self/status").read()
    except (OSError, AttributeError):  # not Linux / not glibc
        return float("nan")
    return int(status.split("VmHWM:" if peak else "VmRSS:")[1].split()[0]) / 2 ** 20


def instrumented(name: str, argv: list, record: str, constants: dict):
    """Run `python <name>.py argv` in this process with its training loop (fit, accumulate)
    wrapped: per training stage, parameters, rows, seconds per step (after the first), memory
    before the first step and the peak, FLOPs of the first step; merged into the JSON `record`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    m = importlib.import_module(name)
    for k, v in constants.items():     # the bench's sizes of what the scripts keep constant
        setattr(m, k, v)
    fit, accumulate, rec = m.fit, m.accumulate, {}
    # Di4C's validation is not part of the projection (its cost: docs/validation.md), nor are the
    # metric packages and Inception weights it needs on CIFAR-10 and ImageNet
    needs, m.selection = m.run_needs, lambda *args: None
    m.run_needs = lambda cfg: [n for n in needs(cfg) if "FID" not in n[0]]

    def counted(cfg, ctx, stage, *args, **kw):
        r = rec[stage]
        if "flops_per_step" in r:
            out = accumulate(cfg, ctx, stage, *args, **kw)
        else:                          # as the old in-loop accounting: after model, EMA, DDP
            r["mem_start_gb"] = memory_gb(reset=True)
            with FlopCounterMode(display=False) as counter:
                out = accumulate(cfg, ctx, stage, *args, **kw)
            r["flops_per_step"] = counter.get_total_flops()
        r["ends"].append(time.perf_counter())
        return out

    def timed(cfg, ctx, stage, raw, loss_fn, batches, iters, lr, global_batch, **kw):
        plan = m.batch_plan(ctx, global_batch, cfg.micro_batch)
        rec[stage] = dict(ends=[time.perf_counter()])
        out = fit(cfg, ctx, stage, raw, loss_fn, batches, iters, lr, global_batch, **kw)
        ends = rec[stage].pop("ends")
        steps = [b - a for a, b in zip(ends, ends[1:])]
        rec[stage].update(params=sum(p.numel() for p in raw.parameters()),
                          global_batch=global_batch, micro_rows=max(r.stop - r.start for r in plan),
                          sec_per_step=sum(steps[1:]) / (len(steps) - 1) if len(steps) > 1
                          else steps[0], peak_mem_gb=memory_gb(peak=True))
        return out

    m.fit, m.accumulate = timed, counted
    torch.manual_seed(0)
    m.main(m.parse_config(m.Config, argv))
    old = json.load(open(record)) if os.path.exists(record) else {}
    json.dump({**old, **rec}, open(record, "w"), indent=1)


def runtime_gb(name: str) -> float:
    """Resident memory of a process that has only imported the script (subtracted as overhead)."""
    code = f"import sys; sys.path[:0] = {[ROOT, os.path.join(ROOT, 'bench')]!r}; " \
           f"import {name}, paper_shapes; print(paper_shapes.memory_gb())"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    return float(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else 0.0


def shapes(name: str, log: str) -> dict:
    """D and S as the run's log reports them."""
    if name == "cifar10_gaussian":
        m = re.search(r"images \((\d+), (\d+), (\d+)\), S = (\d+)", log)
        return dict(D="x".join(m.groups()[:3]), S=int(m.group(4)))
    if name == "imagenet_masked":
        m = re.search(r"D = (\d+), K = (\d+)", log)
        return dict(D=int(m.group(1)), S=int(m.group(2)) + 1)
    m = re.search(r"blocks of (\d+) tokens, S = (\d+)", log)
    return dict(D=int(m.group(1)), S=int(m.group(2)))


def run_script(name: str, work: str, narrow: bool, log) -> dict:
    """All stages of one script's paper preset; returns its measurements and projections."""
    m = importlib.import_module(name)
    spec = SCRIPTS[name]
    shutil.rmtree(work, ignore_errors=True)                     # nothing from an earlier bench
    out = os.path.join(work, "run")
    args = data_args(name, work, narrow)
    over = {**spec["bench"], **(spec["narrow"] if narrow else {})}
    record = os.path.join(work, "train.json")
    base = [sys.executable, os.path.join("bench", "paper_shapes.py"), "--instrument", name,
            record, json.dumps(spec.get("constants", {})), "--preset", "paper", "--out_dir", out,
            "--device", "cpu", "--dtype", "float32", "--log_every", "1", *args, *cli_args(over)]
    stage_s = {}
    for stage in spec["stages"]:
        t0 = time.perf_counter()
        r = subprocess.run(base + ["--stage", stage], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stage_s[stage] = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"error: {name} --stage {stage} failed (rc {r.returncode}):\n"
                             + (r.stdout + r.stderr)[-3000:])
        log(f"  {name} --stage {stage}: ok in {stage_s[stage]:.1f} s")
    train = json.load(open(record))
    paper = m.make_config(m.Config, preset="paper", **(spec["narrow"] if narrow else {}))
    paper_L = m.make_config(m.Config, preset="paper").L
    overhead = runtime_gb(name)
    rows = []
    for fit, (iters_key, batch_key, di4c) in spec["fits"].items():
        t = train[fit]
        iters = m.control_steps(paper) if iters_key == "control_iters" else \
            getattr(paper, iters_key)
        bench_L = over.get("L", paper_L) if di4c else 1
        scale_L = paper_L / bench_L if di4c else 1.0
        B = getattr(paper, batch_key)
        flops = t["flops_per_step"] * B / t["global_batch"] * scale_L
        per_gpu = math.ceil(B / spec["gpus"])
        state = 12 * t["params"] / 2 ** 30                         # grads + AdamW moments
        fixed = max(0.0, t["mem_start_gb"] - overhead) + state
        act = max(0.0, t["peak_mem_gb"] - t["mem_start_gb"] - state) / t["micro_rows"] * scale_L
        mem = fixed + act * per_gpu
        micro = max(1, int((0.85 * GPU_GB - fixed) / act)) if mem > GPU_GB and act else 0
        dtype = paper.dtype
        rows.append(dict(
            stage=fit, params_M=t["params"] / 1e6,
            bench_rows=f"{t['global_batch']} x L {bench_L}" if di4c else str(t["global_batch"]),
            L_note=(f"L {bench_L} of {paper_L}" if di4c and bench_L != paper_L else ""),
            cpu_s_per_step=t["sec_per_step"], cpu_peak_gb=t["peak_mem_gb"],
            preset_batch=B, preset_iters=iters, tflop_per_step=flops / 1e12,
            a100_hours=flops * iters / (PEAK["A100"][dtype] * UTIL) / 3600,
            h100_hours=flops * iters / (PEAK["H100"][dtype] * UTIL) / 3600,
            gpus=spec["gpus"], gb_per_gpu=mem, micro_batch_for_80gb=micro, dtype=dtype))
    return dict(script=name, narrow=narrow, **shapes(name, open(os.path.join(out, "log.txt"))
                                                    .read()),
                stage_seconds=stage_s, fits=rows)


def markdown(results: list) -> str:
    lines = [f"Projection at {int(UTIL * 100)}% of dense peak (A100 312 / H100 989 TFLOP/s bf16, "
             "156 / 495 TF32); memory: float32 activations, global batch split over the GPUs.",
             "", "| script | D | S | stage | params | bench rows | CPU s/step | CPU peak GB | "
             "preset batch x iters | TFLOP/step | A100 h | H100 h | GPUs | GB/GPU |", "|"
             + "---|" * 14]
    for r in results:
        for f in r["fits"]:
            note = f" ({f['L_note']})" if f["L_note"] else ""
            mem = f"{f['gb_per_gpu']:.1f}" + (f" (--micro_batch {f['micro_batch_for_80gb']})"
                                              if f["micro_batch_for_80gb"] else "")
            lines.append(
                f"| {r['script']} | {r['D']} | {r['S']} | {f['stage']} | {f['params_M']:.1f}M | "
                f"{f['bench_rows']}{note} | {f['cpu_s_per_step']:.2f} | {f['cpu_peak_gb']:.1f} | "
                f"{f['preset_batch']} x {f'{it:,}' if (it := f['preset_iters']) else '0 (off)'} | "
                f"{f['tflop_per_step']:.2f} | "
                f"{f['a100_hours']:.1f} | {f['h100_hours']:.1f} | {f['gpus']} | {mem} |")
    lines.append("")
    for r in results:
        lines.append(f"{r['script']}: stages " + ", ".join(
            f"{k} {v:.0f} s" for k, v in r["stage_seconds"].items()) + " (samplers ran once each)")
    return "\n".join(lines)


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--instrument"]:   # one stage, run by run_script
        return instrumented(sys.argv[2], sys.argv[5:], sys.argv[3], json.loads(sys.argv[4]))
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", choices=sorted(SCRIPTS) + ["all"], default="all")
    p.add_argument("--narrow", action="store_true", help="narrow networks at the real D and S")
    p.add_argument("--out", default="runs/paper_shapes")
    a = p.parse_args(argv)
    names = sorted(SCRIPTS) if a.script == "all" else [a.script]
    os.makedirs(a.out, exist_ok=True)
    results = []
    for name in names:
        print(f"{name}: paper preset{' (narrow)' if a.narrow else ''}", flush=True)
        results.append(run_script(name, os.path.join(os.path.abspath(a.out), name), a.narrow,
                                  lambda s: print(s, flush=True)))
    json.dump(results, open(os.path.join(a.out, "paper_shapes.json"), "w"), indent=1)
    table = markdown(results)
    open(os.path.join(a.out, "paper_shapes.md"), "w").write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
