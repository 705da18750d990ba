"""Markdown results tables from a run's metrics.json (the README's tables are made with it), and
update_metrics, which the scripts write it with.

    python -m eval.results_table runs/cifar10_demo [runs/imagenet_demo ...]
    python -m eval.results_table --seeds runs/cifar10_demo runs/cifar10_demo_s1 runs/cifar10_demo_s2
    python -m eval.results_table runs/cifar10_demo_r2 --teacher_from runs/cifar10_demo

One table per run (and per CFG weight / sample kind where the run has them): a row per model
(teacher, student, hybrid, control), a column per NFE, the primary metric in each cell, and for
every non-teacher cell the step speedup at matched quality: the teacher NFE that reaches the
same score (log-linear interpolation on the measured teacher grid) divided by the cell's NFE;
">x" where the model beats every teacher NFE measured, "<x" where it is worse than the fewest.

--seeds: the runs are training seeds of one experiment (same models, step counts and metric); one
table whose cells (keyed by step count) are mean ± sd over the runs (sd with n - 1, "mean ± sd" of n = 3 seeds in the README)
and the mean ± sd of the speedups, each measured against its own run's teacher; a bound (">", "<")
is marked when it holds in every run, "~" when only some runs are bounds (the mean then mixes a
bound with interpolations).

"!" marks a student cell worse than its teacher at the same NFE (with --seeds: "!k/n", worse in k
of the n runs), the cells the eval stage's warning names (eval/validation.py).

--teacher_from BASE [BASE ...] (one per run, after the runs): measure against BASE's teacher
rows instead of each run's own, which are dropped. For another Di4C round (docs/method.md (35)),
whose own "teacher" is the round-1 student: its speedup over the original product teacher.
"""
import json
import math
import os
import sys

ORDER = ("teacher", "student", "hybrid", "control")
LOWER_IS_BETTER = {"frechet": True, "fid": True, "gen_ppl": True, "is_mean": False}


def update_metrics(cfg, ctx, new: dict):
    """Merge `new` into out_dir/metrics.json on rank 0, one level deep (atomic rename)."""
    if ctx.rank != 0:
        return
    path = os.path.join(cfg.out_dir, "metrics.json")
    metrics = json.load(open(path)) if os.path.exists(path) else {}
    for k, v in new.items():
        metrics[k] = {**metrics.get(k, {}), **v} if isinstance(v, dict) else v
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(path + ".tmp", path)


def matched_nfe(teacher: list, score: float, lower: bool = True) -> tuple:
    """(NFE the teacher needs for `score`, relation) on the teacher's (nfe, score) points:
    relation "=" when interpolated, ">" when `score` beats every point, "<" when it is worse
    than the point with the fewest NFE."""
    pts = sorted(teacher)
    better = (lambda a, b: a <= b) if lower else (lambda a, b: a >= b)
    if not better(score, pts[0][1]):
        return pts[0][0], "<"
    for (n0, s0), (n1, s1) in zip(pts, pts[1:]):
        if better(score, s0) and not better(score, s1) or score == s1:
            if s1 == s0:
                return n1, "="
            w = (score - s0) / (s1 - s0)
            return math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0))), "="
    return pts[-1][0], ">"


def speedup(teacher: list, nfe: float, score: float, lower: bool = True) -> str:
    n, rel = matched_nfe(teacher, score, lower)
    return f"{rel if rel != '=' else ''}{n / nfe:.1f}x"


def speedups(rows: list, key: str) -> list:
    """The step speedup at matched quality of every non-teacher row of a run's "results":
    [{model, nfe, [steps], [w | kind], key, teacher_nfe, relation ("=", ">" or "<"), speedup}] where
    teacher_nfe is the teacher NFE with the same score (log-NFE interpolation) and speedup =
    teacher_nfe / nfe (a lower bound for ">", an upper bound for "<")."""
    lower, out = LOWER_IS_BETTER.get(key, True), []
    for r in rows:
        tag = {k: r[k] for k in ("w", "kind") if k in r}
        teacher = [(t["nfe"], t[key]) for t in rows if t["model"] == "teacher"
                   and all(t.get(k) == v for k, v in tag.items())]
        if r["model"] == "teacher" or not teacher:
            continue
        n, rel = matched_nfe(teacher, r[key], lower)
        steps = {"steps": r["steps"]} if "steps" in r else {}
        out.append(dict(model=r["model"], nfe=r["nfe"], **steps, **tag, **{key: r[key]},
                        teacher_nfe=n, relation=rel, speedup=n / r["nfe"]))
    return out


def tables(metrics: dict, title: str = "") -> str:
    """Markdown tables of one run's results (see the module docstring)."""
    rows, key = metrics["results"], metrics["primary"]
    lower = LOWER_IS_BETTER.get(key, True)
    groups = {}
    for r in rows:
        tag = ", ".join(f"{k} = {r[k]}" for k in ("w", "kind") if k in r)
        groups.setdefault(tag, []).append(r)
    out = []
    for tag, rs in sorted(groups.items()):
        nfes = sorted({r["nfe"] for r in rs})
        teacher = [(r["nfe"], r[key]) for r in rs if r["model"] == "teacher"]
        head = f"{title} {key}" + (f" ({tag})" if tag else "")
        out.append(f"| {head.strip()} | " + " | ".join(f"NFE {n:g}" for n in nfes) + " |")
        out.append("|---|" + "---:|" * len(nfes))
        for model in ORDER:
            cells = {r["nfe"]: r[key] for r in rs if r["model"] == model}
            if not cells:
                continue
            row = []
            for n in nfes:
                if n not in cells:
                    row.append("")
                elif model == "teacher" or not teacher:
                    row.append(f"{cells[n]:.2f}")
                else:
                    row.append(f"{cells[n]:.2f} ({speedup(teacher, n, cells[n], lower)})"
                               + _mark([(cells[n], dict(teacher).get(n))], model, lower))
            out.append(f"| {model} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def _mark(pairs: list, model: str, lower: bool) -> str:
    """" !" (" !k/n" over n runs) when the student's score is worse than its teacher's at the same
    NFE in k of the (student, teacher) pairs; "" otherwise or without a teacher cell."""
    k = sum(t is not None and (s > t if lower else s < t) for s, t in pairs)
    if model != "student" or not k:
        return ""
    return " !" if len(pairs) == 1 else f" !{k}/{len(pairs)}"


def tag(r: dict) -> tuple:
    """A result row's CFG weight / sample kind, the group its teacher rows must match."""
    return tuple((k, r[k]) for k in ("w", "kind") if k in r)


def _mean_sd(v: list) -> tuple:
    m = sum(v) / len(v)
    return m, (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0


def seed_table(runs: list, title: str = "") -> str:
    """One Markdown table over training seeds (`runs`: metrics dicts of one experiment): the
    cell is the score's mean ± sd and the speedup's mean ± sd (see the module docstring)."""
    key = runs[0]["primary"]
    if any(m["primary"] != key for m in runs):
        raise SystemExit("error: --seeds runs measure different metrics: "
                         + ", ".join(m["primary"] for m in runs))
    at = lambda r: (r["model"], r.get("steps", r["nfe"]), tag(r))     # by step count: the NFE
    cells = [{at(r): r[key] for r in m["results"]} for m in runs]     # measured (16.5 with a
    sps = [{at(r): r for r in speedups(m["results"], key)} for m in runs]   # final argmax) varies
    if any(set(c) != set(cells[0]) for c in cells):
        raise SystemExit("error: --seeds runs differ in their models, NFEs or CFG weights")
    out = []
    for t in sorted({k[2] for k in cells[0]}):
        nfes = sorted({k[1] for k in cells[0] if k[2] == t})
        label = ", ".join(f"{k} = {v}" for k, v in t)
        head = f"{title} {key}, mean ± sd of {len(runs)} seeds" + (f" ({label})" if label else "")
        out.append(f"| {head.strip()} | " + " | ".join(f"NFE {n:g}" for n in nfes) + " |")
        out.append("|---|" + "---:|" * len(nfes))
        for model in ORDER:
            if not any((model, n, t) in cells[0] for n in nfes):
                continue
            row = []
            for n in nfes:
                if (model, n, t) not in cells[0]:
                    row.append("")
                    continue
                m, sd = _mean_sd([c[model, n, t] for c in cells])
                cell = f"{m:.2f} ± {sd:.2f}"
                if (model, n, t) in sps[0]:
                    got = [s[model, n, t] for s in sps]
                    rels = {g["relation"] for g in got}
                    mark = "~" if len(rels) > 1 else rels.pop().replace("=", "")
                    sm, ssd = _mean_sd([g["speedup"] for g in got])
                    cell += f" ({mark}{sm:.1f} ± {ssd:.1f}x)"
                cell += _mark([(c[model, n, t], c.get(("teacher", n, t))) for c in cells], model,
                              LOWER_IS_BETTER.get(key, True))
                row.append(cell)
            out.append(f"| {model} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def _load(run: str) -> dict:
    path = os.path.join(run, "metrics.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path!r} not found: run the eval stage first")
    metrics = json.load(open(path))
    if "results" not in metrics:
        raise SystemExit(f"error: {path!r} has no results: run the eval stage first")
    return metrics


def with_teacher_of(metrics: dict, base: dict) -> dict:
    """`metrics` with its teacher rows replaced by `base`'s (same metric; every CFG weight /
    sample kind of `metrics` must have base teacher rows)."""
    if base["primary"] != metrics["primary"]:
        raise SystemExit(f"error: --teacher_from run measures {base['primary']}, "
                         f"not {metrics['primary']}")
    teacher = [r for r in base["results"] if r["model"] == "teacher"]
    missing = {tag(r) for r in metrics["results"]} - {tag(r) for r in teacher}
    if missing:
        raise SystemExit(f"error: the --teacher_from run has no teacher rows for {sorted(missing)}")
    rows = [r for r in metrics["results"] if r["model"] != "teacher"]
    return {**metrics, "results": teacher + rows}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    usage = ("usage: python -m eval.results_table [--seeds] RUN_DIR [RUN_DIR ...] "
             "[--teacher_from BASE_DIR ...]")
    seeds = bool(argv) and argv[0] == "--seeds"
    runs = argv[1:] if seeds else list(argv)
    bases = []
    if "--teacher_from" in runs:
        i = runs.index("--teacher_from")
        runs, bases = runs[:i], runs[i + 1:]
        if len(bases) != len(runs):
            raise SystemExit(f"error: --teacher_from needs one run folder per run "
                             f"({len(runs)}), got {len(bases)}")
    if not runs:
        raise SystemExit(usage)
    metrics = [_load(r) for r in runs]
    names = [os.path.basename(os.path.normpath(r)) for r in runs]
    if bases:
        metrics = [with_teacher_of(m, _load(b)) for m, b in zip(metrics, bases)]
        names = [f"{n} vs {os.path.basename(os.path.normpath(b))}'s teacher"
                 for n, b in zip(names, bases)]
    if seeds:
        if len(runs) < 2:
            raise SystemExit("error: --seeds needs at least two run folders (one per seed)")
        print(seed_table(metrics, names[0]))
        return
    for m, name in zip(metrics, names):
        print(tables(m, name))


if __name__ == "__main__":
    main()
