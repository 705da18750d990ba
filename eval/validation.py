"""Never worse than the teacher (docs/validation.md): the student is scored during Di4C on a
held-out split, beside its teacher at the same NFEs, and the best-scored student is the one kept;
after the eval stage, every cell where the student is still worse than its teacher is named.

A score is lower-is-better (Frechet distance, FID, gen-PPL, NELBO) and positive.
"""
import math


class Selection:
    """fit's `validate`: selection(step, model) scores the model (the weights fit would write)
    with score(model) -> {cell: value}, on rank 0 (every rank gets its values, so all decide
    alike), and keeps a copy of the best weights: the fewest cells worse than the teacher's
    value, then the lowest mean over cells of log(value / teacher's value), the geometric-mean
    ratio. So a student no worse than the teacher anywhere beats one with a lower ratio that is
    worse somewhere. fit calls it at step 0, where the student is its teacher (its lambda path
    starts at zero, docs/method.md (14)). The curve, the best and its weights travel in fit's
    training state (exact resume)."""

    def __init__(self, ctx, score, teacher: dict):
        self.ctx, self.score, self.teacher = ctx, score, teacher
        self.curve, self.best = [], None    # best: ((n worse, log ratio), step, state dict)

    @classmethod
    def against(cls, ctx, score, teacher) -> "Selection":
        """A Selection whose teacher values are score(teacher), computed on rank 0."""
        return cls(ctx, score, ctx.gather(score(teacher) if ctx.rank == 0 else None)[0])

    def __call__(self, step: int, model):
        training = model.training
        values = self.ctx.gather(self.score(model.eval()) if self.ctx.rank == 0 else None)[0]
        model.train(training)
        log_ratio = sum(math.log(values[c] / self.teacher[c]) for c in values) / len(values)
        worse = sum(values[c] > self.teacher[c] for c in values)
        self.curve.append(dict(step=step, ratio=math.exp(log_ratio), worse=worse, **values))
        if self.best is None or (worse, log_ratio) < tuple(self.best[0]):
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            self.best = ((worse, log_ratio), step, weights)
        self.ctx.log(f"validation step {step}: " + ", ".join(
            f"{c} {v:.3f} (teacher {self.teacher[c]:.3f})" for c, v in values.items())
            + f" | ratio {math.exp(log_ratio):.3f}, {worse} worse | best: step {self.best[1]}")

    def state_dict(self) -> dict:
        return {"curve": self.curve, "best": self.best and list(self.best)}

    def load_state_dict(self, state: dict):
        self.curve, self.best = state["curve"], state["best"] and tuple(state["best"])

    def restore_best(self, model) -> dict:
        """Load the best weights into model, plot the curve (rank 0: out_dir/validation.png);
        returns the record for metrics.json."""
        model.load_state_dict(self.best[2])
        (worse, log_ratio), step = self.best[:2]
        self.ctx.log(f"validation: keeping the student of step {step} (ratio to the teacher "
                     f"{math.exp(log_ratio):.3f}, {worse} cell(s) worse)")
        record = {"teacher": self.teacher, "curve": self.curve, "best_step": step,
                  "best_ratio": math.exp(log_ratio), "best_worse": worse}
        if self.ctx.rank == 0:
            plot_curve(self.ctx.out_dir, record)
        return record


def worse_cells(rows: list, key: str, models=("student",)) -> list:
    """Labels "model@nfe[_wW][_kind]" of every row of `models` whose `key` is above (worse than)
    the teacher's row at the same NFE (and guidance w, sample kind), with both values."""
    def cell(r):
        return (r.get("kind"), r.get("w"), r["nfe"])
    teacher = {cell(r): r[key] for r in rows if r["model"] == "teacher"}
    out = []
    for r in rows:
        t = teacher.get(cell(r))
        if r["model"] in models and t is not None and r[key] > t:
            tags = "".join(f"_{k}{r[k]:g}" if k == "w" else f"_{r[k]}"
                           for k in ("w", "kind") if r.get(k) is not None)
            out.append(f"{r['model']}@{r['nfe']:g}{tags} ({r[key]:.3f} vs teacher {t:.3f})")
    return out


def warn_worse(ctx, rows: list, key: str) -> list:
    """The eval stage's last line: the student's cells worse than the teacher at equal NFE."""
    cells = worse_cells(rows, key)
    if cells:
        ctx.log(f"WARNING: the student is worse than its teacher ({key}) at: " + ", ".join(cells))
    return cells


def plot_curve(out_dir: str, record: dict, name: str = "validation.png"):
    """The validation curve: each cell's score over Di4C steps (dashed: the teacher's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = [p["step"] for p in record["curve"]]
    for i, c in enumerate(record["teacher"]):
        line, = ax.plot(steps, [p[c] for p in record["curve"]], "o-", label=f"student {c}")
        ax.axhline(record["teacher"][c], ls="--", color=line.get_color(), lw=1)
    ax.axvline(record["best_step"], color="k", lw=0.8, ls=":")
    ax.set(xlabel="Di4C step", ylabel="validation score (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out_dir}/{name}", dpi=100)
    plt.close(fig)
