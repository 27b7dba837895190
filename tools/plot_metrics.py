"""Training curves from `metrics.jsonl`: every loss, the learning rate, and AP at the evaluation points, as one PNG.

    python tools/plot_metrics.py output/shapes/base [output/shapes/rkd ...] --out curves.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ovd.utils.io import atomic_path  # noqa: E402


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n} is not a JSON line") from None
    return rows


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One panel per loss, one for the learning rate, one for AP50 (novel/base/all) at evaluation points."""
    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    losses = sorted({k for rows in runs.values() for r in rows for k in r if k.startswith("loss") or k == "total_loss"})
    ap_keys = sorted({k for rows in runs.values() for r in rows for k in r if k.split("/")[-1] in ("AP50", "AP50_novel", "AP50_base")})
    panels = losses + ["lr"] + (["AP50"] if ap_keys else [])
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(5 * cols, 3.2 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, panels):
        for name, rows in runs.items():
            if key == "AP50":
                for k in ap_keys:
                    pts = [(r["iteration"], 100 * r[k]) for r in rows if k in r]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{name} {k.split('/')[-1]}")
            else:
                pts = [(r["iteration"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(*zip(*pts), label=name, linewidth=1)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        if key.startswith("loss") and any(r.get(key, 1) > 0 for rows in runs.values() for r in rows):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (OUTPUT_DIR) holding metrics.jsonl")
    p.add_argument("--out", default="curves.png")
    args = p.parse_args(argv)
    print(plot_runs(args.runs, args.out))


if __name__ == "__main__":
    main()
