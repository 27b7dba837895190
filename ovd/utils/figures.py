"""The figures of a chain run, drawn from its files alone (`metrics.jsonl`, `final_metrics.json`, `chain_results.json`).

- ``summary.png``: AP50 novel / base / all per stage as grouped bars (the method's claim: novel AP rises stage by stage
  while base AP holds), the oracle upper bound hatched; beside it the pseudo-box precision and the proposal model's AR@20.
- ``curves.png``: every loss, the learning rate and AP50 on one continuous iteration axis: a stage starts where the run
  whose weights it loads ended (``init_from``), so RKD continues base and RKD+PIS+WT continues RKD; a dashed line and the
  stage's name mark each boundary, ▲ on the x axis marks the evaluations. The proposal model trains from scratch in
  parallel with base, so it has its own row of panels on the same axis, starting at 0.

What cannot be read (a missing run, a line cut by a killed run, a stage listed twice) becomes a note printed on the
figure; the rest is drawn. Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global state) and saved
as PNG by matplotlib's Agg renderer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ovd.utils.io import atomic_path

AP_METRICS = ("AP50_novel", "AP50_base", "AP50")
AR_METRICS = ("AR@20_novel", "AR@20_base", "AR@20")
SPLIT_COLORS = {"novel": "tab:orange", "base": "tab:blue", "all": "0.55"}
SPLIT_STYLES = {"novel": ("-", "o"), "base": ("--", "s"), "all": (":", "^")}
UPPER_BOUND_HATCH = "//"


@dataclass
class Stage:
    """One training run of a chain; ``offset`` is where its iteration 0 lies on the chain's axis."""

    name: str
    run_dir: Path
    init_from: str | None = None
    kind: str = "detector"  # "detector" | "proposals"
    upper_bound: bool = False
    rows: list[dict] = field(default_factory=list)
    final: dict[str, float] | None = None  # final_metrics.json[dataset]; None while the run is unfinished
    offset: int = 0

    @property
    def last_iteration(self) -> int | None:
        return max((r["iteration"] for r in self.rows), default=None)


@dataclass
class Chain:
    stages: dict[str, Stage]
    dataset: str | None = None
    proposal_source: str | None = None
    pseudo_boxes: dict | None = None
    notes: list[str] = field(default_factory=list)
    title: str = ""


def split_of(metric: str) -> str:
    """``"AP50_novel"`` → ``"novel"``, ``"AR@20"`` → ``"all"``."""
    tail = metric.rpartition("_")[2]
    return tail if tail in ("novel", "base") else "all"


def read_metrics(run_dir: str | Path, notes: list[str] | None = None) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` that carry an ``iteration``; unreadable lines are skipped, each with a
    note appended to ``notes`` (a line cut by a killed run, a line that is not a JSON object)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            rows.append(row)
        elif notes is not None:
            cut = n == len(lines) and not text.endswith("\n")
            notes.append(f"{path}:{n} " + ("is cut mid-line (a killed run?): skipped" if cut
                                            else "is not a JSON object with an iteration: skipped"))
    return rows


def load_chain(chain_dir: str | Path) -> Chain:
    """Read a chain's output folder: the stages listed in ``chain_results.json`` (or, without it, every sub-folder
    holding a ``metrics.jsonl``, each from iteration 0), their metrics, and each stage's offset."""
    chain_dir = Path(chain_dir)
    if not chain_dir.is_dir():
        raise FileNotFoundError(f"no chain output folder {chain_dir}")
    notes: list[str] = []
    manifest = _read_manifest(chain_dir / "chain_results.json", notes)
    if manifest is None:
        runs = sorted(p.parent for p in chain_dir.glob("*/metrics.jsonl"))
        if not runs:
            why = notes[0] if notes else f"{chain_dir} holds neither chain_results.json nor run folders with a metrics.jsonl"
            raise FileNotFoundError(f"{why}: nothing to draw (has the chain started?)")
        notes.append(f"no readable chain_results.json in {chain_dir}: each run is drawn from its own iteration 0")
        entries = {p.name: {"run_dir": str(p)} for p in runs}
        manifest = {}
    else:
        entries = manifest.get("stages") or {}
        if not entries:
            notes.append(f"{chain_dir / 'chain_results.json'} lists no stage yet")
    stages = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            notes.append(f"stage '{name}' in chain_results.json is not an object: skipped")
            continue
        run_dir = _find_run_dir(chain_dir, Path(entry.get("run_dir") or name))
        stages[name] = Stage(name=name, run_dir=run_dir, init_from=entry.get("init_from"), kind=entry.get("kind", ""),
                             upper_bound=bool(entry.get("upper_bound")))
    chain = Chain(stages=stages, dataset=manifest.get("dataset"), proposal_source=manifest.get("proposal_source"),
                  pseudo_boxes=manifest.get("pseudo_boxes"), notes=notes, title=str(chain_dir))
    _read_stages(chain)
    return chain


def load_runs(run_dirs: Iterable[str | Path]) -> Chain:
    """Independent runs (a sweep, say), each drawn from its own iteration 0 so that they overlay."""
    dirs = [Path(d) for d in run_dirs]
    names = [d.name for d in dirs]
    stages, notes = {}, []
    for d in dirs:
        name = d.name if names.count(d.name) == 1 else f"{d.parent.name}/{d.name}"
        if name in stages:
            notes.append(f"{d} is given twice: drawn once")
            continue
        stages[name] = Stage(name=name, run_dir=d, kind="")
    chain = Chain(stages=stages, notes=notes)
    _read_stages(chain)
    if not any(s.rows for s in chain.stages.values()):
        raise FileNotFoundError("no readable metrics.jsonl in " + ", ".join(map(str, dirs)))
    return chain


def _read_manifest(path: Path, notes: list[str]) -> dict | None:
    if not path.is_file():
        return None
    renamed: list[tuple[str, str]] = []

    def keep_duplicates(pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            new, k = key, 2
            while new in out:
                new, k = f"{key} ({k})", k + 1
            if new != key:
                renamed.append((key, new))
            out[new] = value
        return out

    try:
        manifest = json.loads(path.read_text(), object_pairs_hook=keep_duplicates)
    except json.JSONDecodeError as e:
        notes.append(f"{path} is not valid JSON ({e})")
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
        notes.append(f"{path} is not a chain manifest (an object with a 'stages' object)")
        return None
    for key, new in renamed:
        if new in manifest.get("stages", {}):
            notes.append(f"stage '{key}' is listed twice in {path}: the second is drawn as '{new}'")
    return manifest


def _find_run_dir(chain_dir: Path, run_dir: Path) -> Path:
    # the chain folder holds its runs by name (also when moved); run_dir, relative to where the chain ran, otherwise
    for candidate in (chain_dir / run_dir.name, run_dir):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return run_dir


def _read_stages(chain: Chain) -> None:
    """Fill each stage's rows, final metrics, kind and offset, noting what is missing or unfinished."""
    for s in chain.stages.values():
        try:
            s.rows = read_metrics(s.run_dir, chain.notes)
        except FileNotFoundError:
            chain.notes.append(f"{s.name}: not started (no metrics.jsonl in {s.run_dir})")
            continue
        if chain.dataset is None:
            chain.dataset = next((k.rpartition("/")[0] for r in s.rows for k in r if k.endswith(("/AP50", "/AR@20"))),
                                 None)
        if not s.kind:
            keys = {k.rpartition("/")[2] for r in s.rows for k in r}
            s.kind = "proposals" if "AR@20" in keys and "AP50" not in keys else "detector"
        final = s.run_dir / "final_metrics.json"
        if final.is_file():
            try:
                s.final = json.loads(final.read_text()).get(chain.dataset)
            except (json.JSONDecodeError, AttributeError):
                chain.notes.append(f"{s.name}: {final} is not readable: the last evaluation in metrics.jsonl is used")
        elif s.rows:
            chain.notes.append(f"{s.name}: unfinished (no final_metrics.json), drawn to its iteration {s.last_iteration}")
        else:
            chain.notes.append(f"{s.name}: metrics.jsonl has no readable line yet")
    for s in chain.stages.values():
        s.offset = _offset(chain, s.name, chain.notes if s.rows else [], ())


def _offset(chain: Chain, name: str, notes: list[str], seen: tuple[str, ...]) -> int:
    """Where ``name``'s iteration 0 lies: one past the last iteration of the stage it loads, on that stage's axis."""
    parent = chain.stages[name].init_from
    if parent is None:
        return 0
    if parent in seen or parent == name:
        notes.append(f"{name}: init_from forms a cycle through '{parent}': drawn from iteration 0")
        return 0
    if parent not in chain.stages or chain.stages[parent].last_iteration is None:
        note = f"{name}: loads '{parent}', which has no metrics here: drawn from iteration 0"
        if note not in notes:
            notes.append(note)
        return 0
    return _offset(chain, parent, notes, seen + (name,)) + chain.stages[parent].last_iteration + 1


def stage_metrics(stage: Stage, metrics: Iterable[str], dataset: str | None) -> tuple[dict[str, float], int | None]:
    """The stage's result for ``metrics``: its final metrics, or else its last evaluation in metrics.jsonl, with that
    evaluation's iteration (None for final metrics). Empty when the stage has evaluated nothing yet."""
    metrics = list(metrics)
    if stage.final and all(m in stage.final for m in metrics):
        return {m: float(stage.final[m]) for m in metrics}, None
    for r in reversed(stage.rows):
        if all(f"{dataset}/{m}" in r for m in metrics):
            return {m: float(r[f"{dataset}/{m}"]) for m in metrics}, r["iteration"]
    return {}, None


def stage_label(name: str) -> str:
    """``"rkd_pis_wt"`` → ``"RKD+PIS+WT"``, ``"oracle_rkd_pis_wt"`` → ``"oracle RKD+PIS+WT"``."""
    words, method = [], []
    for w in name.split("_"):
        if w in ("rkd", "pis", "wt"):
            method.append(w.upper())
        else:
            words.append(w)
    return " ".join(words + (["+".join(method)] if method else []))


def draw_stage_bars(ax: Axes, means: Mapping[str, Mapping[str, float]], *,
                    stds: Mapping[str, Mapping[str, float]] | None = None, upper_bounds: Iterable[str] = (),
                    captions: Mapping[str, str] | None = None, faded: Iterable[str] = (),
                    metrics: tuple[str, ...] = AP_METRICS) -> None:
    """Grouped bars on ``ax``: one group per stage (in the order of ``means``, upper bounds last, set apart), one bar
    per metric, in % with the value printed above; ``stds`` adds error bars. Values are fractions, as the evaluators
    log them. Each bar's gid is ``"<stage>/<metric>"``."""
    upper_bounds, faded, captions = set(upper_bounds), set(faded), dict(captions or {})
    names = [n for n in means if n not in upper_bounds] + [n for n in means if n in upper_bounds]
    xs, x = {}, 0.0
    for i, n in enumerate(names):
        if i and n in upper_bounds and names[i - 1] not in upper_bounds:
            ax.axvline(x - 0.25, color="0.6", linestyle="--", linewidth=0.8)
            x += 0.5
        xs[n], x = x, x + 1
    width = 0.8 / len(metrics)
    top = 0.0
    for j, m in enumerate(metrics):
        split = split_of(m)
        for n in names:
            if not math.isfinite(means[n].get(m, math.nan)):
                continue
            h = 100 * means[n][m]
            err = 100 * stds[n][m] if stds and m in stds.get(n, {}) else None
            bx = xs[n] + (j - (len(metrics) - 1) / 2) * width
            bar = ax.bar(bx, h, width * 0.95, yerr=err, capsize=2, color=SPLIT_COLORS[split], edgecolor="black",
                         linewidth=0.4, hatch=UPPER_BOUND_HATCH if n in upper_bounds else None,
                         alpha=0.45 if n in faded else 1.0)
            bar.patches[0].set_gid(f"{n}/{m}")
            ax.text(bx, h + (err or 0) + 1.0, f"{h:.1f}", ha="center", va="bottom", fontsize=7)
            top = max(top, h + (err or 0))
    ax.set_xticks([xs[n] for n in names])
    ax.set_xticklabels([stage_label(n) + ("\n(upper bound)" if n in upper_bounds else "")
                        + (f"\n{captions[n]}" if n in captions else "") for n in names], fontsize=8)
    ax.set_ylim(0, max(100.0, top) * 1.15)
    ax.set_xlim(-0.6, x - 0.4)
    handles = [Patch(facecolor=SPLIT_COLORS[split_of(m)], edgecolor="black", linewidth=0.4, label=split_of(m))
               for m in metrics]
    if upper_bounds & set(names):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=UPPER_BOUND_HATCH,
                             label="upper bound (oracle)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncols=len(handles), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_stage_bars(means: Mapping[str, Mapping[str, float]], out: str | Path, *,
                    stds: Mapping[str, Mapping[str, float]] | None = None, upper_bounds: Iterable[str] = (),
                    title: str = "AP50 per stage (%)") -> Path:
    """Write the grouped-bar chart of :func:`draw_stage_bars` alone to the PNG ``out``.

    ``means[stage]`` (and ``stds[stage]``) map ``"AP50_novel"``, ``"AP50_base"``, ``"AP50"`` to fractions, as in
    ``final_metrics.json``; stages in ``upper_bounds`` are hatched and labelled as upper bounds."""
    fig = Figure(figsize=(max(6.0, 1.3 * len(means) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    draw_stage_bars(ax, means, stds=stds, upper_bounds=upper_bounds)
    ax.set_ylabel("AP50 (%)")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, out)


def summary_figure(chain: Chain) -> Figure:
    """AP50 novel/base/all per detector stage; beside it pseudo-box precision and the proposal model's AR@20."""
    detectors = [s for s in chain.stages.values() if s.kind != "proposals"]
    proposals = [s for s in chain.stages.values() if s.kind == "proposals"]
    means, captions, faded = {}, {}, set()
    for s in detectors:
        values, it = stage_metrics(s, AP_METRICS, chain.dataset)
        means[s.name] = values
        if not values:
            captions[s.name] = "not evaluated yet" if s.rows else "no metrics yet"
        elif it is not None:
            captions[s.name], faded = f"(unfinished: it {it})", faded | {s.name}
    side = []
    precision = (chain.pseudo_boxes or {}).get("precision")
    if precision:
        side.append("pseudo")
    recalls = [(s, *stage_metrics(s, AR_METRICS, chain.dataset)) for s in proposals]
    recalls = [(s, v, it) for s, v, it in recalls if v]
    if recalls:
        side.append("recall")
    fig = Figure(figsize=(max(7.0, 1.25 * len(means) + 3) + 3.2 * bool(side), 4.8 + 0.16 * len(chain.notes)),
                 layout="constrained")
    rows = [1.0] + ([0.04 * len(chain.notes) + 0.02] if chain.notes else [])
    grid = fig.add_gridspec(len(rows), 2 if side else 1, height_ratios=rows, width_ratios=[3, 1] if side else None)
    ax = fig.add_subplot(grid[0, 0])
    if means:
        draw_stage_bars(ax, means, upper_bounds=[s.name for s in detectors if s.upper_bound], captions=captions,
                        faded=faded)
    else:
        ax.text(0.5, 0.5, "no detector stage yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("AP50 (%)")
    ax.set_title(f"AP50 on {chain.dataset or '?'} per stage: novel should rise while base holds", fontsize=10)
    if side:
        sub = grid[0, 1].subgridspec(len(side), 1)
        for i, what in enumerate(side):
            sax = fig.add_subplot(sub[i, 0])
            if what == "pseudo":
                _draw_split_bars(sax, {k: v.get("precision") for k, v in precision.items() if isinstance(v, dict)},
                                 gid="pseudo_boxes")
                stats = (chain.pseudo_boxes or {}).get("stats", {})
                kept = (f"\n{stats['labels_kept']} of {stats['labels']} image labels kept"
                        if "labels_kept" in stats and "labels" in stats else "")
                sax.set_title("pseudo-box precision (%)" + kept, fontsize=9)
            else:
                s, values, it = recalls[-1]
                _draw_split_bars(sax, {split_of(m): v for m, v in values.items()}, gid=s.name)
                source = f" ({chain.proposal_source})" if chain.proposal_source else ""
                sax.set_title(f"proposal model{source}: AR@20 (%)" + (f"\nunfinished: it {it}" if it is not None else ""),
                              fontsize=9)
    if chain.notes:
        _draw_notes(fig.add_subplot(grid[1, :]), chain.notes)
    if chain.title:
        fig.suptitle(chain.title, fontsize=10)
    return fig


def _draw_split_bars(ax: Axes, values: Mapping[str, float | None], *, gid: str) -> None:
    """Small bars of a novel / base / all breakdown, in %; gid ``"<gid>/<split>"``."""
    splits = [s for s in ("novel", "base", "all") if values.get(s) is not None]
    for i, split in enumerate(splits):
        h = 100 * values[split]
        bar = ax.bar(i, h, 0.7, color=SPLIT_COLORS[split], edgecolor="black", linewidth=0.4)
        bar.patches[0].set_gid(f"{gid}/{split}")
        ax.text(i, h + 1.0, f"{h:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(splits)), splits, fontsize=8)
    ax.set_ylim(0, 115)
    ax.tick_params(axis="y", labelsize=7)


def _draw_notes(ax: Axes, notes: list[str]) -> None:
    ax.axis("off")
    ax.text(0, 1, "\n".join(f"note: {n}" for n in notes), va="top", ha="left", fontsize=7, color="firebrick",
            transform=ax.transAxes, wrap=True)


def curves_figure(chain: Chain, *, cols: int = 4) -> Figure:
    """Every loss, the learning rate and AP50 of the detector stages on one continuous iteration axis (dashed line and
    name at each stage boundary, ▲ at evaluations); the proposal model's own row of panels, on the same axis from 0.
    Each line's gid is ``"<stage>/<key>"``."""
    groups = [("detector chain: each stage continues the run whose weights it loads (dashed lines); "
               "▲ marks an evaluation", [s for s in chain.stages.values() if s.kind != "proposals" and s.rows],
               AP_METRICS),
              (f"proposal model{f' ({chain.proposal_source})' if chain.proposal_source else ''}: trained from scratch, "
               "in parallel with base",
               [s for s in chain.stages.values() if s.kind == "proposals" and s.rows], AR_METRICS)]
    groups = [(t, stages, m) for t, stages, m in groups if stages]
    colors = {name: f"C{i % 10}" for i, name in enumerate(chain.stages)}
    layouts = [_panels(stages, metrics, chain.dataset) for _, stages, metrics in groups]
    nrows = [max(1, math.ceil(len(p) / cols)) for p in layouts]
    note_h = 0.18 * len(chain.notes) + 0.2 if chain.notes else 0.0
    fig = Figure(figsize=(4.2 * cols, 2.7 * sum(nrows) + 0.5 * len(groups) + note_h + (0 if groups else 1.0)),
                 layout="constrained")
    heights = [2.7 * r + 0.5 for r in nrows] + ([note_h] if chain.notes else [])
    subfigs = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0] if heights else []
    shared = None
    for (title, stages, metrics), panels, rows, sub in zip(groups, layouts, nrows, subfigs):
        sub.suptitle(title, fontsize=10)
        axes = list(sub.subplots(rows, cols, squeeze=False).flat)
        for ax, key in zip(axes, panels):
            if shared is None:
                shared = ax
            else:
                ax.sharex(shared)
            if key in metrics:
                _draw_eval_panel(ax, stages, key, metrics, chain, colors)
            else:
                _draw_scalar_panel(ax, stages, key, colors)
            _draw_boundaries(ax, stages)
            ax.set_title(key if key not in metrics else f"{key} on {chain.dataset} (%)", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("iteration (chain)", fontsize=7)
        for ax in axes[len(panels):]:
            ax.axis("off")
        # the stages' colours in a spare panel where there is one, so that no curve hides behind the legend
        legend_ax = axes[len(panels)] if len(panels) < len(axes) else axes[0]
        legend_ax.legend(handles=[Line2D([], [], color=colors[s.name], label=stage_label(s.name)
                                         + (" (upper bound)" if s.upper_bound else "")) for s in stages],
                         fontsize=8, loc="upper left" if legend_ax is not axes[0] else "best", title="stage",
                         title_fontsize=8)
    if chain.notes:
        _draw_notes(subfigs[-1].add_subplot(), chain.notes)
    if not groups:
        fig.text(0.5, 0.7, "no stage has logged metrics yet", ha="center")
    if chain.title:
        fig.suptitle(chain.title, fontsize=10)
    return fig


def _panels(stages: list[Stage], metrics: tuple[str, ...], dataset: str | None) -> list[str]:
    keys = {k for s in stages for r in s.rows for k in r}
    losses = sorted(k for k in keys if k.startswith("loss"))
    panels = (["total_loss"] if "total_loss" in keys else []) + losses + (["lr"] if "lr" in keys else [])
    if any(f"{dataset}/{m}" in keys for m in metrics):
        panels.append(metrics[-1])
    return panels


def _eval_iterations(stage: Stage) -> list[int]:
    return [r["iteration"] for r in stage.rows if any("/" in k for k in r)]


def _draw_scalar_panel(ax: Axes, stages: list[Stage], key: str, colors: Mapping[str, str]) -> None:
    values = []
    for s in stages:
        pts = [(s.offset + r["iteration"], r[key]) for r in s.rows if isinstance(r.get(key), (int, float))
               and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), color=colors[s.name], linewidth=1, gid=f"{s.name}/{key}")
            values += [v for _, v in pts]
        evals = [s.offset + i for i in _eval_iterations(s)]
        ax.plot(evals, [0] * len(evals), "^", color=colors[s.name], markersize=5, clip_on=False,
                transform=ax.get_xaxis_transform(), gid=f"{s.name}/evaluations")
    if key != "lr" and values and min(values) > 0:
        ax.set_yscale("log")
        ax.minorticks_off()


def _draw_eval_panel(ax: Axes, stages: list[Stage], key: str, metrics: tuple[str, ...], chain: Chain,
                     colors: Mapping[str, str]) -> None:
    """Each metric of each stage over its evaluations, its line starting from the last evaluation of the run it loads."""
    for s in stages:
        for m in metrics:
            pts = [(s.offset + r["iteration"], 100 * r[f"{chain.dataset}/{m}"]) for r in s.rows
                   if f"{chain.dataset}/{m}" in r]
            parent = chain.stages.get(s.init_from or "")
            start = [(parent.offset + r["iteration"], 100 * r[f"{chain.dataset}/{m}"]) for r in parent.rows
                     if f"{chain.dataset}/{m}" in r][-1:] if parent and pts else []
            if pts:
                style, marker = SPLIT_STYLES[split_of(m)]
                ax.plot(*zip(*(start + pts)), linestyle=style, marker=marker, markersize=3.5, color=colors[s.name],
                        linewidth=1.2, markevery=list(range(len(start), len(start) + len(pts))), gid=f"{s.name}/{m}")
    ax.set_ylim(0, 105)
    ax.legend(handles=[Line2D([], [], color="black", linestyle=SPLIT_STYLES[split_of(m)][0],
                              marker=SPLIT_STYLES[split_of(m)][1], markersize=3.5, label=split_of(m)) for m in metrics],
              fontsize=7, loc="best")


def _draw_boundaries(ax: Axes, stages: list[Stage]) -> None:
    starts: dict[int, list[str]] = {}
    for s in stages:
        if s.offset > 0:
            starts.setdefault(s.offset, []).append(stage_label(s.name))
    for x, names in sorted(starts.items()):
        ax.axvline(x, color="0.3", linestyle="--", linewidth=0.8, gid=f"boundary/{x}")
        ax.text(x, 0.97, ", ".join(names), transform=ax.get_xaxis_transform(), rotation=90, ha="left", va="top",
                fontsize=6.5, bbox=dict(facecolor="white", alpha=0.7, edgecolor="none", pad=0.5))


def save_figure(fig: Figure, out: str | Path, *, dpi: int = 90) -> Path:
    """Save ``fig`` as a PNG, atomically (a reader never sees half a file)."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(out)


def write_chain_figures(chain_dir: str | Path, *, out_dir: str | Path | None = None) -> tuple[Path, Path, list[str]]:
    """``summary.png`` and ``curves.png`` of a chain's output folder (into ``out_dir``, default the folder itself);
    returns both paths and the notes on what could not be read."""
    chain = load_chain(chain_dir)
    out_dir = Path(out_dir or chain_dir)
    summary = save_figure(summary_figure(chain), out_dir / "summary.png")
    curves = save_figure(curves_figure(chain), out_dir / "curves.png")
    return summary, curves, chain.notes
