"""The plot every run writes: quality against network evaluations, one line per model."""
import os


def plot_quality(out_dir: str, title: str, rows: list, key: str, lower_is_better: bool = True):
    """out_dir/quality_vs_steps.png: `key` against NFE (log scale), a line per model (and per
    CFG weight or sample kind where the rows have one). rows: the metrics.json "results"."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = {}
    for r in rows:
        label = r["model"] + "".join(f" {k}={r[k]}" for k in ("w", "kind") if k in r)
        lines.setdefault(label, []).append((r["nfe"], r[key]))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE (network calls per sample)")
    ax.set_ylabel(f"{key} ({'lower' if lower_is_better else 'higher'} is better)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "quality_vs_steps.png"), dpi=120)
    plt.close(fig)
