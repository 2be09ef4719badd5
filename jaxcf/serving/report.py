"""``python -m jaxcf.report``: figures and a Markdown summary of a trained model, drawn headless.

    python -m jaxcf.report --model runs/bias [--out runs/bias/report]

Writes into ``--out`` (default: ``report/`` next to the model folder, i.e. ``WORKDIR/report``):

- ``curves.png``: training and validation loss and validation RMSE per epoch, from
  ``WORKDIR/metrics.jsonl`` when it is there, else ``metadata.json["metrics"]``;
- ``embeddings_pca.png``: a 2-D PCA map of the embeddings of the most-rated items (counts from the
  training pairs), the most-rated titles labelled where they do not overlap;
- ``item_bias.png`` (bias model): the items with the highest and lowest learned bias among those
  with enough training ratings;
- ``report.md``: the summary that links them.

Figures use Matplotlib's object API on an Agg canvas, so no display and no global backend switch
are needed.

The report folder is written as a whole (a new folder, then one rename), so a failure leaves no
partial report. Any model a run can export gets a report: one factor (a 1-D map), one item, a handful
of ratings.

One concept at some length: the report, its figures and its Markdown.

What does not live here: the inference (``jaxcf.serving.inference``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxcf.core.errors import ModelError
from jaxcf.core.fileio import replace_directory, replaceable, staging_directory
from jaxcf.serving.inference import Model

# Items in the PCA map: the most-rated ones (fastai's lesson uses the top 1000 as well).
PCA_ITEMS = 1000
PCA_LABELS = 40
# Bias rankings only among items with at least this many training ratings: with a handful of
# ratings a bias mostly reflects its initial value and the weight decay, not the item.
BIAS_MIN_RATINGS = 20
BIAS_SHOWN = 15
DPI = 120


def read_metrics(model: Model) -> tuple[list[dict], str]:
    """The per-epoch metric records and where they came from.

    ``metrics.jsonl`` in the training workdir (the model folder's parent) is preferred: it is
    rewritten after every epoch, so it also covers a run stopped before the export.
    """
    jsonl = model.path.parent / "metrics.jsonl" if model.path is not None else None
    if jsonl is not None and jsonl.is_file():
        try:
            records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
            return records, str(jsonl)
        except (OSError, json.JSONDecodeError):
            pass  # a damaged log: fall back to the copy inside the (verified) export
    return list(model.metadata.get("metrics") or []), "metadata.json"


def short_title(title: str | None, fallback: str, width: int = 32) -> str:
    """A title cut to ``width`` characters, keeping a trailing "(year)"."""
    text = title if title else fallback
    if len(text) <= width:
        return text
    year = text[-6:] if len(text) >= 6 and text[-6] == "(" and text[-5:-1].isdigit() and text[-1] == ")" else ""
    head = width - len(year) - 2
    return f"{text[:head].rstrip()}… {year}".rstrip()


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    path.write_bytes(buffer.getvalue())


def plot_curves(records: list[dict], path: Path) -> None:
    """Loss (train and validation MSE) and validation RMSE against the epoch.

    Under early stopping the closing record repeats an earlier epoch (the exported one); the curves
    keep each epoch once, in order.
    """
    curve: list[dict] = []
    for record in records:
        if not curve or record["epoch"] > curve[-1]["epoch"]:
            curve.append(record)
    records = curve
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    loss_ax, rmse_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in records]
    implicit = is_implicit(records)
    losses = (("train_loss", "train loss"),) if implicit else (
        ("train_loss", "train loss (smoothed MSE)"), ("valid_mse", "validation MSE"))
    for key, label in losses:
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            loss_ax.plot(epochs, values, marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss" if implicit else "MSE", title="Loss")
    loss_ax.legend()
    if implicit:
        for key, colour in (("ndcg@20", "C2"), ("recall@20", "C4")):
            rmse_ax.plot(epochs, [r.get(key) for r in records], marker="o", color=colour, label=key)
        rmse_ax.set(xlabel="epoch", ylabel="on the test interactions", title="Ranking metrics")
        rmse_ax.legend()
    else:
        prefix, part = held_out(records[-1])
        values = [r.get(prefix + "rmse") for r in records]
        rmse_ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", color="C2")
        rmse_ax.set(xlabel="epoch", ylabel="RMSE", title=f"{part.capitalize()} RMSE" if part else "RMSE")
    for ax in (loss_ax, rmse_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, path)


def held_out(record: dict) -> tuple[str, str | None]:
    """(metric prefix, name) of the part a rating model's record was scored on: the validation part,
    else the test part (a named fold, or ``data.test_path``), else none (``data.valid_fraction: 0``)."""
    if "valid_rmse" in record:
        return "valid_", "validation"
    if "test_rmse" in record:
        return "test_", "test"
    return "", None


def is_implicit(records: list[dict]) -> bool:
    """Whether the records are an implicit-feedback model's (ranking metrics, no RMSE)."""
    return bool(records) and "valid_rmse" not in records[-1] and "ndcg@20" in records[-1]


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal components (zero where there are fewer: one factor, one item).

    Args:
      vectors: float[n, F].

    Returns:
      (float64[n, 2] coordinates, float64[2] fraction of the variance each explains).
    """
    coords, explained = np.zeros((len(vectors), 2)), np.zeros(2)
    if len(vectors) == 0:
        return coords, explained
    centred = vectors.astype(np.float64) - vectors.mean(axis=0, dtype=np.float64)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    count = min(2, len(singular))
    variance = singular**2
    total = variance.sum()
    coords[:, :count] = centred @ components[:count].T
    if total > 0:
        explained[:count] = variance[:count] / total
    return coords, explained


def _place_labels(ax, fig: Figure, points: np.ndarray, labels: list[str]) -> int:
    """Greedy labelling: each label tries a few offsets around its point and is dropped when every
    spot overlaps a label already placed. Returns how many were placed."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw_without_rendering()
    axes_box = ax.get_window_extent(renderer)
    placed = []
    offsets = ((4, 4, "left", "bottom"), (4, -4, "left", "top"), (-4, 4, "right", "bottom"), (-4, -4, "right", "top"))
    for (x, y), label in zip(points, labels):
        for dx, dy, ha, va in offsets:
            text = ax.annotate(
                label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=7,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.75},
            )
            box = text.get_window_extent(renderer).expanded(1.02, 1.1)
            inside = axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
            if inside and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()
    return len(placed)


def plot_embedding_map(model: Model, path: Path) -> dict:
    """PCA map of the most-rated items' embeddings; returns what was drawn (for the summary)."""
    rated = np.flatnonzero(model.item_counts > 0)
    order = rated[np.argsort(-model.item_counts[rated], kind="stable")][:PCA_ITEMS]
    coords, explained = pca_2d(model.item_embedding[order])
    colour_values = model.item_bias[order] if model.item_bias is not None else np.log10(np.maximum(
        model.item_counts[order], 1))
    fig = Figure(figsize=(10, 8), layout="constrained")
    ax = fig.subplots()
    scatter = ax.scatter(coords[:, 0], coords[:, 1], c=colour_values, cmap="viridis", s=9, alpha=0.7, linewidths=0)
    fig.colorbar(scatter, ax=ax, label="learned item bias" if model.item_bias is not None else "log10 training ratings")
    labelled = order[:PCA_LABELS]
    labels = [short_title(model.titles[i], f"item {model.item_ids.raw[i]}") for i in labelled.tolist()]
    ax.scatter(coords[: len(labelled), 0], coords[: len(labelled), 1], s=16, facecolors="none", edgecolors="black")
    ax.set(
        xlabel=f"PC1 ({explained[0]:.1%} of variance)", ylabel=f"PC2 ({explained[1]:.1%} of variance)",
        title=f"Item embeddings: the {len(order)} most-rated items, first two principal components",
    )
    ax.grid(alpha=0.3)
    shown = _place_labels(ax, fig, coords[: len(labelled)], labels)
    _save(fig, path)
    return {"items": len(order), "labels": shown, "explained": explained.tolist()}


def plot_item_bias(model: Model, path: Path) -> tuple:
    """Highest and lowest learned item biases (bias model); returns the two rankings."""
    top = model.bias_ranking("item", BIAS_SHOWN, lowest=False, min_ratings=BIAS_MIN_RATINGS)
    bottom = model.bias_ranking("item", BIAS_SHOWN, lowest=True, min_ratings=BIAS_MIN_RATINGS)
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, ranking, colour, name in ((axes[0], top, "C2", "Highest"), (axes[1], bottom, "C3", "Lowest")):
        labels = [short_title(t, f"item {i}", 40) for i, t in zip(ranking.ids.tolist(), ranking.titles)]
        positions = np.arange(len(labels))
        ax.barh(positions, ranking.scores, color=colour)
        ax.set_yticks(positions, labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set(xlabel="learned item bias (logit units)", title=f"{name} item bias")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Items with at least {BIAS_MIN_RATINGS} training ratings")
    _save(fig, path)
    return top, bottom


def _md_table(ranking, score_name: str) -> list[str]:
    lines = [f"| rank | item | {score_name} | title |", "|---:|---:|---:|---|"]
    for rank, (raw, title, score) in enumerate(zip(ranking.ids.tolist(), ranking.titles, ranking.scores.tolist()), 1):
        lines.append(f"| {rank} | {raw} | {score:.3f} | {(title or '').replace('|', '/')} |")
    return lines


# Everything a report folder holds; a folder with anything else in it is never replaced.
REPORT_FILES = ("report.md", "curves.png", "embeddings_pca.png", "item_bias.png")


def is_report(folder: Path) -> bool:
    """Whether ``folder`` is a report jaxcf wrote (``report.md`` and its figures, nothing else)."""
    names = {p.name for p in folder.iterdir()}
    return "report.md" in names and names <= set(REPORT_FILES)


def write_report(model: Model, out: str | Path) -> Path:
    """Draws the figures and writes ``report.md`` into ``out``, replacing a report there as a whole (never
    anything else).

    Returns:
      The path of ``report.md``.

    Raises:
      ModelError: ``out`` is a file, a link, or a folder that is not a previous report.
    """
    target = Path(out)
    reason = replaceable(target, is_report, "report")
    if reason is not None:
        raise ModelError(f"--out: {reason}")
    with staging_directory(target) as staging:
        _write(model, staging)
        replace_directory(staging, target)
    return target / "report.md"


def _write(model: Model, out: Path) -> None:
    records, metrics_source = read_metrics(model)
    info = model.metadata.get("model", {})
    data = model.metadata.get("data", {})
    lines = [
        "# jaxcf model report",
        "",
        f"- model: `{model.path}`; kind **{model.kind}**, {info.get('n_factors')} factors"
        + (f", output range {list(model.y_range)}" if model.y_range else ""),
        f"- data: {data.get('source')} (ratings sha256 `{str(data.get('sha256'))[:12]}…`), "
        f"{data.get('num_train')} training and {data.get('num_valid')} validation ratings, split {data.get('split')!r}",
        f"- {model.num_users} users, {model.num_items} items",
        "",
        "## Training curves",
        "",
    ]
    if records:
        plot_curves(records, out / "curves.png")
        last = records[-1]
        if is_implicit(records):
            summary = (f"NDCG@20 **{last['ndcg@20']:.4f}**, recall@20 {last['recall@20']:.4f}, MRR "
                       f"{last['mrr']:.4f} on the test interactions ({last['scored_users']} users scored), "
                       f"train loss {last['train_loss']:.4f}.")
        else:
            prefix, part = held_out(last)
            scored = (f"{part} RMSE **{last[prefix + 'rmse']:.4f}**, {part} MSE {last[prefix + 'mse']:.4f}, "
                      if part else "nothing held out, ")
            summary = scored + f"train loss {last['train_loss']:.4f}."
        lines += [
            f"Per-epoch metrics from `{metrics_source}`. After epoch {last['epoch']}: {summary}",
            "",
            "![training curves](curves.png)",
            "",
        ]
    else:
        lines += ["No per-epoch metrics were found.", ""]
    drawn = plot_embedding_map(model, out / "embeddings_pca.png")
    lines += [
        "## Item embeddings",
        "",
        f"The {drawn['items']} most-rated items (training ratings), projected on the first two principal "
        f"components of their embeddings ({drawn['explained'][0]:.1%} and {drawn['explained'][1]:.1%} of the "
        f"variance). The {PCA_LABELS} most-rated are circled; {drawn['labels']} of them are labelled (labels that "
        "would overlap are left out).",
        "",
        "![PCA map of item embeddings](embeddings_pca.png)",
        "",
    ]
    if model.has_biases:
        top, bottom = plot_item_bias(model, out / "item_bias.png")
        lines += [
            "## Learned item bias",
            "",
            f"Among items with at least {BIAS_MIN_RATINGS} training ratings.",
            "",
            "![highest and lowest item biases](item_bias.png)",
            "",
            "Highest:",
            "",
            *_md_table(top._replace(ids=top.ids[:5], titles=top.titles[:5], scores=top.scores[:5]), "item bias"),
            "",
            "Lowest:",
            "",
            *_md_table(bottom._replace(ids=bottom.ids[:5], titles=bottom.titles[:5], scores=bottom.scores[:5]),
                      "item bias"),
            "",
        ]
    else:
        lines += ["The dot model has no biases, so there is no bias ranking.", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
