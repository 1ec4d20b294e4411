"""Matplotlib figures people look at: vector norms, score histograms, sweeps, scatter plots."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (110 dpi) and close a figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_extraction(summary: dict, scored: list[dict], run_dir: Path) -> list[Path]:
    """Per-layer vector norm, and pos/neg histograms of trait score and coherence."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    norms = summary["vector_norm_response_avg"]
    ax.plot(range(len(norms)), norms, marker="o", ms=3, label="‖v[l]‖")
    if summary.get("resid_norm"):
        rel = [v / r if r else 0 for v, r in zip(norms, summary["resid_norm"], strict=True)]
        ax2 = ax.twinx()
        ax2.plot(range(len(rel)), rel, color="tab:orange", ls="--", label="‖v[l]‖ / resid norm")
        ax2.set_ylabel("relative to residual norm", color="tab:orange")
    ax.set_xlabel("layer")
    ax.set_ylabel("norm")
    ax.set_title(f"{summary['trait']} vector norm per layer ({summary['model']})")
    p1 = save_figure(fig, run_dir / "vector_norms.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, field, title in ((axes[0], "trait_score", "trait score"), (axes[1], "coherence", "coherence")):
        for side, color in (("pos", "tab:red"), ("neg", "tab:blue")):
            xs = [r[field] for r in scored if r["side"] == side and r.get(field) is not None]
            ax.hist(xs, bins=20, range=(0, 100), alpha=0.6, color=color, label=f"{side} (n={len(xs)})")
        ax.axvline(50, color="k", lw=0.8, ls=":")
        ax.set_title(f"{summary['trait']}: {title} ({summary['judge']})", fontsize=9)
        ax.legend()
    p2 = save_figure(fig, run_dir / "score_histograms.png")
    return [p1, p2]


def plot_sweep(rows: list[dict], path: Path, title: str) -> Path:
    """Trait score and coherence against coefficient, one line per layer."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    layers = sorted({r["layer"] for r in rows})
    for layer in layers:
        pts = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["coef"])
        xs = [r["coef"] for r in pts]
        axes[0].plot(xs, [r["trait_mean"] for r in pts], marker="o", label=f"layer {layer}")
        axes[1].plot(xs, [r["coherence_mean"] for r in pts], marker="o", label=f"layer {layer}")
    axes[0].set_ylabel("trait score")
    axes[1].set_ylabel("coherence")
    axes[1].axhline(75, color="k", lw=0.8, ls=":")
    for ax in axes:
        ax.set_xlabel("steering coefficient")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, Path(path))


def plot_scatter(xs: list[float], ys: list[float], groups: list[str], path: Path, title: str,
                 xlabel: str, ylabel: str) -> Path:
    """A scatter coloured by group (e.g. system prompt or number of shots)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    names = list(dict.fromkeys(groups))
    cmap = plt.get_cmap("coolwarm", max(len(names), 2))
    for i, g in enumerate(names):
        pts = [(x, y) for x, y, gg in zip(xs, ys, groups, strict=True) if gg == g]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=cmap(i), label=g, alpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(names) <= 12:
        ax.legend(fontsize=7, loc="best")
    return save_figure(fig, Path(path))


def plot_validity(curves: dict[str, list[float | None] | None], layer: int | None, thresholds: dict[str, float],
                  path: Path, title: str) -> Path:
    """Every validity check per layer, the chosen layer marked, thresholds as dotted lines of the same colour."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (name, curve) in enumerate(curves.items()):
        if curve is None or all(v is None for v in curve):
            continue
        color = f"C{i}"
        ax.plot(range(len(curve)), [float("nan") if v is None else v for v in curve], marker="o", ms=3,
                color=color, label=name.replace("_", " "))
        if name in thresholds:
            ax.axhline(thresholds[name], color=color, ls=":", lw=1)
    if layer is not None:
        ax.axvline(layer, color="k", lw=0.8, ls="--", label=f"chosen layer {layer}")
    ax.set(xlabel="layer", ylabel="value", ylim=(-1.02, 1.02), title=title)
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)
