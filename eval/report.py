"""The end of an image script's eval stage: the metric of its data, sampler latency, student vs
teacher at equal NFE, and the printed table with one RESULT line per student step count."""
import os
import time
from contextlib import nullcontext

import torch


def image_scorer(images, levels: int, dataset: str, out_dir: str, fid_stats: str = "",
                 split: str = "train") -> tuple:
    """(metric key, score(samples) -> {key: ...}) against the `split` images (N, C, H, W) with
    `levels` grey levels: the Frechet distance of classifier features for an embedded 8x8 set
    (eval/digits.py, the classifier cached in out_dir), else pigm's FID / IS (the paper's package,
    eval/inception.py; reference statistics fid_stats or computed once to out_dir)."""
    from eval import digits
    if dataset in digits.EMBEDDED:
        cache = os.path.join(out_dir, f"{dataset}_classifier.pt")
        return "frechet", digits.frechet_scorer(images, levels, dataset, cache)
    from eval import inception
    return "fid", inception.pigm_scorer(images, levels, out_dir, fid_stats,
                                        "pigm" if split == "train" else f"pigm_{split}")


def seconds(fn, device, repeats: int = 5, context=nullcontext) -> list:
    """Wall seconds of each call fn(1) .. fn(repeats) inside context(), after a warm-up call
    fn(0), CUDA-synchronised: the latency protocol of the three scripts."""
    out = []
    for r in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with context():
            fn(r)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out[1:]


def latency(teacher_fn, student_fn, device, repeats: int = 5, context=nullcontext) -> dict:
    """{teacher_s, student_s, overhead_pct}: mean seconds per sampler call (`seconds`, the
    teacher's calls first) and the student's overhead in percent."""
    t, s = (sum(v) / len(v) for v in (seconds(teacher_fn, device, repeats, context),
                                      seconds(student_fn, device, repeats, context)))
    return dict(teacher_s=t, student_s=s, overhead_pct=100 * (s / t - 1))


def finish(cfg, ctx, res: dict, key: str, draw, script: str):
    """The end of the eval stage (rank 0): the latency of teacher and student at each student
    step count (draw(name, n, r) = one sampler call), metrics.json (results, speedups at equal
    quality), the quality-vs-NFE plot and the printed table, then the warning naming every cell
    where the student is worse than its teacher (eval/validation.py)."""
    from eval import plot, results_table, validation
    lat = {str(n): latency(lambda r: draw("teacher", n, r), lambda r: draw("student", n, r),
                           ctx.device) for n in cfg.student_steps}
    rows = [dict(model=label.split("@")[0], **r) for label, r in res.items()]
    results_table.update_metrics(cfg, ctx, {"eval": res, "latency": lat, "results": rows,
                                            "primary": key,
                                            "speedup": results_table.speedups(rows, key)})
    plot.plot_quality(cfg.out_dir, f"{script} --preset {cfg.preset}", rows, key)
    print_table(res, lat, key)
    results_table.update_metrics(cfg, ctx, {"worse_than_teacher": validation.warn_worse(
        ctx, rows, key)})


def print_table(res: dict, lat: dict, key: str):
    """The eval table ({label "model@steps": {key, nfe, steps}}), latency, and a RESULT line
    per student step count that the teacher was also sampled at."""
    print(f"\n{'sampler':<14}{'NFE':>5}{key:>10}")
    for label in sorted(res, key=lambda k: (k.split("@")[0], res[k]["steps"])):
        print(f"{label:<14}{res[label]['nfe']:>5}{res[label][key]:>10.3f}")
    print_latency_and_results(res, lat, key)


def print_latency_and_results(res: dict, lat: dict, key: str):
    """The latency lines and a RESULT line per student step count the teacher was sampled at
    (the image scripts' table ends with them)."""
    for n, v in lat.items():
        print(f"latency @{n} NFE: teacher {v['teacher_s']:.3f} s, student {v['student_s']:.3f} s "
              f"({v['overhead_pct']:+.1f}%)")
    for label in sorted(res):
        if label.startswith("student@") and label.replace("student", "teacher") in res:
            t = res[label.replace("student", "teacher")]
            print(f"RESULT {label} {key}={res[label][key]:.3f} teacher {key}={t[key]:.3f}")
