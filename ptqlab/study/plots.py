"""Plots of a study (matplotlib, Agg canvas; each figure as PNG and SVG).

* ``<model>_ppl_vs_bits``: mean PPL against storage bits per weight, one
  panel per activation precision, one colour per method, LoRC runs as
  diamonds labelled with their rank, the Pareto front (no other run is both
  smaller and better) as a dashed step line, FP16 as a dotted line;
* ``<model>_ppl_vs_lorc_rank``: mean PPL against the LoRC rank for every
  (method, precision) swept over ranks;
* ``<model>_ppl_vs_speed``: mean PPL against decode tokens/s (batch 1 and
  16) and against the model's bytes on the GPU, for runs timed with
  ``speed: true`` (``--kernel real``), FP16 as a star;
* ``<model>_sensitivity_<granularity>``: heat map of the PPL degradation
  when only one part is quantized (``ptqlab sensitivity``): blocks x module
  types for ``layer``, precisions x targets for ``module`` and ``block``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .recipe import method_label, precision_label
from .report import PPL, Metric, Result, context_label, precision_sort_key, row_labels

_MARKERS = "osv^<>p*hX"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        path = out_dir / f"{stem}.{ext}"
        fig.savefig(path, format=ext, dpi=120, bbox_inches="tight")  # long suptitles are not clipped
        paths.append(path)
    return paths


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "model"  # no hidden files


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another (fewer or equal bits and lower or equal PPL), by increasing bits."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _groups(results: list[Result]) -> dict[tuple, list[Result]]:
    out: dict[tuple, list[Result]] = {}
    for r in results:
        out.setdefault((r.model, r.context), []).append(r)
    return out


def _model_slugs(models: list[str]) -> dict[str, str]:
    """A file-name stem per model: the folder's or hub id's last part, made unique."""
    out: dict[str, str] = {}
    for model in models:
        base = _slug(model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])
        slug, n = base, 1
        while slug in out.values():
            n += 1
            slug = f"{base}-{n}"
        out[model] = slug
    return out


def _stem(slug: str, contexts_of_model: int, index: int, what: str) -> str:
    return f"{slug}{f'_ctx{index}' if contexts_of_model > 1 else ''}_{what}"


def plot_ppl_vs_bits(model: str, context: tuple, group: list[Result], out_dir: Path, stem: str,
                     metric: Metric = PPL) -> list[Path]:
    """The metric (default mean PPL) against bits per weight, with the Pareto front (lower is better: for a
    task accuracy the y-axis is the accuracy and the front keeps the higher)."""
    quant = [r for r in group if r.kind == "quant" and r.done and r.bits_per_weight is not None
             and metric.value(r) is not None]
    base = next((r for r in quant if r.is_baseline), None)
    runs = [r for r in quant if not r.is_baseline]
    y = metric.value
    sign = 1.0 if metric.lower_is_better else -1.0
    ylabel = "mean perplexity" if metric == PPL else ("mean " if metric.kind != "task" and not metric.dataset else "") \
        + metric.name + (f" ({metric.dataset})" if metric.dataset else "")
    if not runs:
        return []
    abits_values = sorted({r.spec.get("abits", 16) for r in runs}, reverse=True)
    fig = _figure(5.5 * len(abits_values), 4.2)
    axes = fig.subplots(1, len(abits_values), squeeze=False)[0]
    def _m(r) -> str:  # the method with its transform (awq+rtn); LoRC is drawn as its own marker
        t = r.spec.get("transform", "none")
        return r.spec["method"] if t == "none" else f"{t}+{r.spec['method']}"

    methods = list(dict.fromkeys(_m(r) for r in runs))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, abits in zip(axes, abits_values):
        panel = [r for r in runs if r.spec.get("abits", 16) == abits]
        for m in methods:
            pts = [r for r in panel if _m(r) == m]
            plain = [r for r in pts if not r.spec.get("lorc_rank")]
            lorc = [r for r in pts if r.spec.get("lorc_rank")]
            if plain:
                ax.scatter([r.bits_per_weight for r in plain], [y(r) for r in plain], color=colours[m],
                           marker="o", label=m, zorder=3)
            if lorc:
                ax.scatter([r.bits_per_weight for r in lorc], [y(r) for r in lorc], color=colours[m],
                           marker="D", facecolors="none", label=f"{m} + LoRC", zorder=3)
                for r in lorc:
                    ax.annotate(f"r{r.spec['lorc_rank']}", (r.bits_per_weight, y(r)), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(r.bits_per_weight, sign * y(r)) for r in panel])
        if front:
            xs, ys = zip(*front)
            ys = [sign * v for v in ys]
            ax.step(xs, ys, where="post", color="k", linestyle="--", linewidth=1, label="Pareto front", zorder=2)
        if base is not None:
            ax.axhline(y(base), color="grey", linestyle=":", label=f"FP16 {y(base):.3g}")
        ys = [y(r) for r in panel] + ([y(base)] if base else [])
        if min(ys) > 0 and max(ys) / min(ys) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight (scales, zero points, LoRC included)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"A{abits}" if abits != 16 else "weight-only (A16)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{model}: {metric.name} vs bits ({context_label(context)})", fontsize=10)
    return _save(fig, out_dir, stem)


# the x axes of the speed plot: record key -> (axis label, scale to the shown unit)
SPEED_AXES = (("decode_tok_s_b1", "decode tokens/s, batch 1", 1.0),
              ("decode_tok_s_b16", "decode tokens/s, batch 16", 1.0),
              ("weight_bytes", "model bytes on the GPU (MiB)", 2.0**-20))


def plot_ppl_vs_speed(model: str, context: tuple, group: list[Result], out_dir: Path, stem: str) -> list[Path]:
    """Mean PPL against decode tokens/s (batch 1, batch 16) and against the model's memory, one panel each, one
    point per timed run (``speed: true``), labelled with its precision; the FP16 run as a star."""
    timed = [r for r in group if r.kind == "quant" and r.done and r.speed]
    if not timed:
        return []
    labels = row_labels([r for r in timed if not r.is_baseline])
    axes_keys = [a for a in SPEED_AXES if any(a[0] in r.speed for r in timed)]
    fig = _figure(5.0 * len(axes_keys), 4.2)
    axes = fig.subplots(1, len(axes_keys), squeeze=False)[0]
    methods = list(dict.fromkeys(labels.values()))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, (key, xlabel, scale) in zip(axes, axes_keys):
        for r in timed:
            if key not in r.speed:
                continue
            x, y = r.speed[key] * scale, r.mean_ppl
            if r.is_baseline:
                ax.scatter([x], [y], color="k", marker="*", s=90, label="FP16", zorder=4)
                continue
            m = labels[id(r)]
            ax.scatter([x], [y], color=colours[m], marker="o", zorder=3,
                       label=m if m not in ax.get_legend_handles_labels()[1] else None)
            ax.annotate(precision_label(r.spec), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean perplexity")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{model}: PPL vs speed and memory ({context_label(context)})", fontsize=10)
    return _save(fig, out_dir, stem)


def plot_ppl_vs_lorc_rank(model: str, context: tuple, group: list[Result], out_dir: Path, stem: str) -> list[Path]:
    quant = [r for r in group if r.kind == "quant" and r.done and not r.is_baseline]
    labels = row_labels(quant)
    series: dict[str, list[Result]] = {}
    for r in quant:
        s = dict(r.spec)
        s["lorc_rank"] = 0
        rest = labels[id(r)][len(method_label(r.spec)):]
        series.setdefault(f"{method_label(s)}{rest} {precision_label(r.spec)}", []).append(r)
    series = {k: v for k, v in series.items() if len({r.spec.get("lorc_rank", 0) for r in v}) > 1}
    if not series:
        return []
    ranks = sorted({r.spec.get("lorc_rank", 0) for v in series.values() for r in v})
    pos = {rank: i for i, rank in enumerate(ranks)}
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for i, (label, rs) in enumerate(sorted(series.items())):
        rs = sorted(rs, key=lambda r: r.spec.get("lorc_rank", 0))
        ax.plot([pos[r.spec.get("lorc_rank", 0)] for r in rs], [r.mean_ppl for r in rs],
                marker=_MARKERS[i % len(_MARKERS)], label=label)
    base = next((r for r in group if r.is_baseline and r.done), None)
    if base is not None:
        ax.axhline(base.mean_ppl, color="grey", linestyle=":", label=f"FP16 {base.mean_ppl:.2f}")
    ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("LoRC rank")
    ax.set_ylabel("mean perplexity")
    ax.set_title(f"{model}: PPL vs LoRC rank ({context_label(context)})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, stem)


def _heatmap(ax, matrix: list[list[float]], rows: list[str], cols: list[str], fig,
             vmin: float | None = None, vmax: float | None = None) -> None:
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    im = ax.imshow(data, aspect="auto", cmap="magma_r", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if data.size <= 300:
        finite = data[np.isfinite(data)]
        lo = vmin if vmin is not None else (finite.min() if finite.size else 0)
        hi = vmax if vmax is not None else (finite.max() if finite.size else 0)
        mid = (lo + hi) / 2
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if math.isfinite(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2g}", ha="center", va="center", fontsize=6,
                            color="white" if data[i, j] > mid else "black")
    fig.colorbar(im, ax=ax, label="dPPL vs FP16")


def plot_sensitivity(model: str, context: tuple, group: list[Result], out_dir: Path, stem: str) -> list[Path]:
    paths = []
    sens = [r for r in group if r.kind == "sensitivity" and r.delta() is not None]
    for granularity in sorted({r.granularity for r in sens}):
        part = [r for r in sens if r.granularity == granularity]
        precisions = sorted({precision_label(r.spec): precision_sort_key(r.spec) for r in part}.items(),
                            key=lambda kv: kv[1])
        precisions = [p for p, _ in precisions]
        if granularity == "layer":
            blocks = sorted({int(r.target.split(":", 1)[0]) for r in part})
            modules = list(dict.fromkeys(r.target.split(":", 1)[1] for r in part))
            fig = _figure(max(4.5, 0.7 * len(modules) + 2.5) * len(precisions), max(3, 0.35 * len(blocks) + 2))
            axes = fig.subplots(1, len(precisions), squeeze=False)[0]
            deltas = [r.delta() for r in part]  # one colour scale for every panel
            for ax, p in zip(axes, precisions):
                cell = {r.target: r.delta() for r in part if precision_label(r.spec) == p}
                matrix = [[cell.get(f"{b}:{m}") for m in modules] for b in blocks]
                _heatmap(ax, matrix, [f"block {b}" for b in blocks], modules, fig, min(deltas), max(deltas))
                ax.set_title(p, fontsize=9)
        else:
            tgts = list(dict.fromkeys(r.target for r in part))
            cell = {(precision_label(r.spec), r.target): r.delta() for r in part}
            matrix = [[cell.get((p, t)) for t in tgts] for p in precisions]
            fig = _figure(max(5, 0.6 * len(tgts) + 3), max(2.5, 0.4 * len(precisions) + 2))
            ax = fig.subplots()
            _heatmap(ax, matrix, precisions, [f"block {t}" if granularity == "block" else t for t in tgts], fig)
        fig.suptitle(f"{model}: sensitivity per {granularity} (RTN on that part only; {context_label(context)})",
                     fontsize=9)
        paths += _save(fig, out_dir, f"{stem}_{granularity}")
    return paths


def make_plots(results: list[Result], out_dir: str | Path, metric: Metric = PPL) -> list[Path]:
    """Write every plot the results allow to ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    groups = _groups(results)
    per_model: dict[str, int] = {}
    for model, _ in groups:
        per_model[model] = per_model.get(model, 0) + 1
    slugs = _model_slugs(list(per_model))
    seen: dict[str, int] = {}
    for (model, context), group in groups.items():
        index = seen[model] = seen.get(model, -1) + 1
        stem = lambda what: _stem(slugs[model], per_model[model], index, what)  # noqa: E731
        what = "ppl" if metric == PPL else re.sub(r"[^A-Za-z0-9]+", "_", metric.name).strip("_").lower()
        paths += plot_ppl_vs_bits(model, context, group, out_dir, stem(f"{what}_vs_bits"), metric)
        paths += plot_ppl_vs_lorc_rank(model, context, group, out_dir, stem("ppl_vs_lorc_rank"))
        paths += plot_ppl_vs_speed(model, context, group, out_dir, stem("ppl_vs_speed"))
        paths += plot_sensitivity(model, context, group, out_dir, stem("sensitivity"))
    paths += plot_size_trends(results, out_dir)  # nothing unless 2+ sizes of a testbed family
    return paths


def plot_size_trends(results: list[Result], out_dir: str | Path, dataset: str | None = None) -> list[Path]:
    """``<family>_dppl_vs_size``: dPPL against parameter count (log), one panel per precision, one line per
    method, for every testbed family with two or more sizes in the results (``report.size_trend_groups``).
    dPPL is on a symmetric-log axis: it spans from a few hundredths to hundreds between W8 and W3."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    from .report import _method_sort_key, size_trend_groups

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    groups = size_trend_groups(results)
    per_family: dict[str, int] = {}
    for index, ((family, context), by_size) in enumerate(groups.items()):
        ds = dataset or context[1][0]
        series: dict[str, dict[str, list[tuple[int, float]]]] = {}
        order: dict[str, tuple] = {}
        morder: dict[str, tuple] = {}
        for params, runs in by_size.items():
            for r in runs:
                d = r.delta(ds)
                if d is None:
                    continue
                pl, ml = precision_label(r.spec), method_label(r.spec)
                order[pl], morder[ml] = precision_sort_key(r.spec), _method_sort_key(r.spec)
                series.setdefault(pl, {}).setdefault(ml, []).append((params, d))
        if not series:
            continue
        precisions = sorted(series, key=order.get)
        ncol = min(4, len(precisions))
        nrow = math.ceil(len(precisions) / ncol)
        fig = _figure(3.4 * ncol, 2.8 * nrow)
        axes = fig.subplots(nrow, ncol, squeeze=False)
        methods = sorted({m for s in series.values() for m in s}, key=morder.get)
        for i, pl in enumerate(precisions):
            ax = axes[i // ncol][i % ncol]
            for j, ml in enumerate(methods):
                pts = sorted(series[pl].get(ml, []))
                if pts:
                    ax.plot([p for p, _ in pts], [d for _, d in pts], marker=_MARKERS[j % len(_MARKERS)],
                            color=f"C{j}", label=ml)
            ax.set_xscale("log")
            # ticks at the family's sizes ("26.5M"), not matplotlib's crowded log-scale minor labels
            sizes = sorted({p for s in series[pl].values() for p, _ in s})
            ax.xaxis.set_major_locator(FixedLocator(sizes))
            ax.xaxis.set_major_formatter(FixedFormatter([f"{p / 1e6:.1f}M" for p in sizes]))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="x", labelsize=8)
            ax.set_yscale("symlog", linthresh=0.1)
            ax.axhline(0.1, color="grey", lw=0.6, ls=":")
            ax.axhline(0.5, color="grey", lw=0.6, ls="--")
            ax.set_title(pl, fontsize=10)
            ax.set_xlabel("parameters")
            ax.set_ylabel(f"dPPL ({ds})")
            ax.grid(alpha=0.3, which="both")
        for k in range(len(precisions), nrow * ncol):
            axes[k // ncol][k % ncol].set_visible(False)
        seen = {l: h for ax in fig.axes for h, l in zip(*ax.get_legend_handles_labels())}
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=min(6, len(seen)), fontsize=8)
        fig.suptitle(f"{family}: dPPL vs size ({context_label(context)}); dotted 0.1 / dashed 0.5 = class bounds",
                     fontsize=10)
        n = per_family[family] = per_family.get(family, -1) + 1
        paths += _save(fig, out_dir, f"{_slug(family)}{f'_ctx{n}' if n else ''}_dppl_vs_size")
    return paths
