"""`compare --plot FILE.png`: each prompt's quality against its cost, one panel per quality figure.

The choice of a prompt is a trade: Rank-1 or label agreement bought at a price per 1,000 images. One
point per scoreboard row, labelled, cost on x; a panel for each quality figure the scoreboard has
(Rank-1 and mAP with `--retrieval`, label agreement with `--attributes`, cross-camera consistency
always). matplotlib draws it with its Agg backend (no display, no GUI toolkit), so it works on a
server and in CI alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.errors import OutputError
from pipeline.review.compare import ScoreRow, Scoreboard

Figure = tuple[str, Callable[[ScoreRow], float | None]]

FIGURES: tuple[Figure, ...] = (
    ("retrieval Rank-1", lambda r: r.retrieval.rank(1) if r.retrieval is not None else None),
    ("retrieval mAP", lambda r: r.retrieval.mAP if r.retrieval is not None else None),
    ("agreement with attribute labels", lambda r: r.labels_overall),
    ("cross-camera consistency", lambda r: r.consistency),
)


def panels(board: Scoreboard) -> list[tuple[str, list[tuple[int, float, float]]]]:
    """(title, [(row number from 1, as the table numbers it; cost per 1,000 images; value)]) for each
    figure some row has (pure). A row of unknown cost is left out (it has no place on the cost axis)."""
    out = []
    for title, get in FIGURES:
        points = [(n, r.cost_per_1000, v) for n, r in enumerate(board.rows, 1)
                  if (v := get(r)) is not None and r.cost_per_1000 is not None]
        if points:
            out.append((title, points))
    return out


def label_spots(points: list[tuple[int, float, float]], x_span: float,
                x_near: float = 0.04, y_near: float = 4.0) -> list[tuple[float, float, list[int]]]:
    """(cost, value in %, row numbers) per label: points closer than `x_near` of the cost axis and
    `y_near` percentage points share one label ("#2, #3"), so labels of near points never print over each
    other (pure)."""
    spots: list[tuple[float, float, list[int]]] = []
    for number, cost, value in sorted(points):  # by row number: a label sits at its best row's point
        y = 100 * value
        for c, v, numbers in spots:
            if abs(c - cost) <= x_near * x_span and abs(v - y) <= y_near:
                numbers.append(number)
                break
        else:
            spots.append((cost, y, [number]))
    for _, _, numbers in spots:
        numbers.sort()
    return spots


def plot_scoreboard(board: Scoreboard, path: Path) -> list[str]:
    """Write the PNG; returns the panel titles drawn. Points are numbered as the table numbers its rows
    (#1 best), one colour per row in every panel, the legend below; rows on the same spot share a label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = panels(board)
    n = max(1, len(drawn))
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.2 + 0.22 * len(board.rows)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (title, points) in zip(axes[0], drawn):
        right = max(cost for _, cost, _ in points) * 1.2 or 1.0  # costs are >= 0; all free: a $0-1 axis
        for number, cost, value in points:
            ax.scatter([cost], [100 * value], s=40, color=colours((number - 1) % 10), zorder=3)
        for cost, value, numbers in label_spots(points, right):
            ax.annotate(", ".join(f"#{k}" for k in numbers), (cost, value), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("USD per 1,000 images")
        ax.set_ylabel("%")
        ax.set_ylim(-4, 106)
        ax.set_xlim(-0.04 * right, right)
        ax.grid(alpha=0.3)
    if not drawn:
        axes[0][0].text(0.5, 0.5, "no quality figure to plot", ha="center", va="center")
        axes[0][0].set_axis_off()
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours((k - 1) % 10)) for k in
               range(1, len(board.rows) + 1)]
    fig.legend(handles, [f"#{k} {r.label}" for k, r in enumerate(board.rows, 1)], loc="lower center",
               ncol=1 if n == 1 else 2, fontsize=8, frameon=False)
    fig.suptitle("Prompt quality against cost", fontsize=11)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * ((len(board.rows) + 1) // (1 if n == 1 else 2)), 1, 1))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return [t for t, _ in drawn]
