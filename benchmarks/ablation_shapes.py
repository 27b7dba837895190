"""The paper's ablation on the shapes world, with the proposal source as a dimension: for each of the oracle (jittered
true boxes of every class: an upper bound), the RPN and OLN proposal models (trained on base boxes only), the
control (the base model trained for the same extra iterations with none of the method's losses), RKD, PIS and
RKD+PIS+WT, over several training seeds on one world and teacher.

    python benchmarks/ablation_shapes.py --seeds 0 1 2 --jobs 2        # writes docs/RESULTS.md and its figure

First the offline steps of each source run once (proposal model, proposals, region embeddings, pseudo boxes; under
$OVD_DATASETS/shapes); then each (seed, source) runs `tools/run_chain.py` on configs/shapes/chain.yaml into
output/ablation/seed<N>/<source>,
the base and control runs shared by the sources of a seed. ``--jobs`` chains run at once, each on ``--threads``
threads, so the numbers depend on the thread count, not on the load. Stages resume/skip, so an interrupted
ablation continues.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ovd.utils.figures import plot_stage_bars
from ovd.utils.io import read_json, replace_markdown_section

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/shapes/chain.yaml"
SOURCES = ["oracle", "rpn", "oln"]
SHARED = ["base", "control"]  # independent of the proposals
PER_SOURCE = ["rkd", "pis", "rkd_pis_wt"]
COLUMNS = [("AP50_novel", "AP50 novel", 100), ("AP50_base", "AP50 base", 100), ("AP50", "AP50 all", 100),
           ("fidelity/cosine_novel", "cos novel", 1), ("fidelity/agreement_novel", "agree novel", 1)]
AP_KEYS = ("AP50_novel", "AP50_base", "AP50")


def mean_std(values: list[float], scale: float) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.3g}" if scale == 1 else f"{values[0]:.1f}"
    m, s = statistics.mean(values), statistics.stdev(values)
    return f"{m:.3f} ± {s:.3f}" if scale == 1 else f"{m:.1f} ± {s:.1f}"


def rows(results: dict[int, dict[str, dict]]) -> dict[str, list[dict]]:
    """Row name → the runs of that row over seeds (shared stages once, then each source's)."""
    names = SHARED + [f"{src}: {stage}" for src in SOURCES for stage in PER_SOURCE]
    out = {n: [r[n] for r in results.values() if n in r] for n in names}
    return {n: runs for n, runs in out.items() if runs}


def table(results: dict[int, dict[str, dict]]) -> str:
    lines = ["| stage | " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for name, runs in rows(results).items():
        label = f"{name} (upper bound)" if name.startswith("oracle") else name
        cells = [mean_std([run[k] for run in runs if k in run], scale) for k, _, scale in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def source_table(info: dict[str, dict]) -> str:
    lines = ["| proposals | AR@10 novel / base | AR@20 novel / base | AR@100 novel / base | recall@0.5 novel / base "
             "| pseudo-box precision novel / base | labels kept |", "|---|---|---|---|---|---|---|"]
    for src, i in info.items():
        r, p, st = i["proposal_recall"][src], i["pseudo_boxes"].get("precision", {}), i["pseudo_boxes"].get("stats", {})
        pair = lambda k: f"{100 * r[f'{k}_novel']:.1f} / {100 * r[f'{k}_base']:.1f}"  # noqa: E731
        lines.append(f"| {src}{' (upper bound)' if src == 'oracle' else ''} | {pair('AR@10')} | {pair('AR@20')} | "
                     f"{pair('AR@100')} | {pair('recall@0.5')} | {p['novel']['precision']:.3f} / "
                     f"{p['base']['precision']:.3f} | {st.get('labels_kept')} of {st.get('labels')} |")
    return "\n".join(lines)


def chain(args: list[str], threads: int, log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["tools/run_chain.py", "--config-file", CONFIG, *args]
    print("$ python", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        subprocess.run([sys.executable, *cmd], check=True, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def run_seed(seed: int, out: Path, sources: list[str], threads: int) -> dict[str, dict]:
    """The chains of one seed; the base and control runs of the first source are reused by the others."""
    results: dict[str, dict] = {}
    for i, src in enumerate(sources):
        run_dir = out / f"seed{seed}" / src
        stages = SHARED + PER_SOURCE
        if i:
            for stage in SHARED:
                if not (run_dir / stage / "final_metrics.json").is_file():
                    shutil.copytree(out / f"seed{seed}" / sources[0] / stage, run_dir / stage, dirs_exist_ok=True)
        chain(["--proposals", src, "--stages", *stages, "--output", str(run_dir), "SEED", str(seed)], threads,
              run_dir / "chain.log")
        for stage in stages:
            metrics = read_json(run_dir / stage / "final_metrics.json")["shapes_val"]
            results[stage if stage in SHARED else f"{src}: {stage}"] = metrics
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=SOURCES)
    p.add_argument("--jobs", type=int, default=2, help="seeds trained at once (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="threads per training process (default: %(default)s)")
    p.add_argument("--output", default="output/ablation")
    p.add_argument("--results", default="docs/RESULTS.md")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.output)
    info = {}
    for src in args.sources:  # the offline steps once per source, before the seeds share them
        chain(["--proposals", src, "--stages", "--output", str(out / "offline" / src)], args.jobs * args.threads,
              out / "offline" / f"{src}.log")
        info[src] = read_json(out / "offline" / src / "chain_results.json")
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {s: pool.submit(run_seed, s, out, args.sources, args.threads) for s in args.seeds}
        results = {s: f.result() for s, f in futures.items()}
    wall = time.perf_counter() - t0

    figure = Path(args.results).parent / "ablation_shapes.png"
    grouped = rows(results)
    means = {n: {k: statistics.mean(r[k] for r in runs) for k in AP_KEYS} for n, runs in grouped.items()}
    stds = {n: {k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in AP_KEYS}
            for n, runs in grouped.items()}
    plot_stage_bars(means, REPO / figure, stds=stds, upper_bounds=[n for n in means if n.startswith("oracle")],
                    title=f"AP50 on shapes_val by proposal source, mean ± std over seeds {args.seeds} (%)")
    body = f"""Command: `python benchmarks/ablation_shapes.py --seeds {' '.join(map(str, args.seeds))} --jobs {args.jobs} --threads {args.threads}`
(wall time {wall / 60:.0f} min on {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, Python
{platform.python_version()}; {args.threads} thread(s) per training process, so these numbers do not depend on the load).
One world (2000 train / 300 val images, seed 0) and one toy-CLIP teacher; training seeds {args.seeds}; base 500
iterations, every other stage 200 more from the checkpoint DESIGN §2 names (control, RKD, PIS from base; RKD+PIS+WT
from RKD). Proposals: `oracle` = jittered true boxes of *every* class, novel ones included (an upper bound, never the
method's result); `rpn` and `oln` = the project's proposal models (`configs/shapes/proposals_{{rpn,oln}}.yaml`),
trained on the base boxes only, one model each (seed 0). Mean ± std over seeds; AP50 in %, COCO-style on shapes_val
(11 base / 5 novel classes).

![AP50 per stage and proposal source](ablation_shapes.png)

{table(results)}

Proposals and pseudo boxes per source (one world and one proposal model per source, so one value each; recall in %
on shapes_val, class-agnostic, COCO's IoU 0.5:0.95 for AR; pseudo boxes on the image-labelled training images):

{source_table(info)}
"""
    replace_markdown_section(REPO / args.results, "Ablation on the shapes world", body)
    print(table(results))
    print(source_table(info))
    print(f"wrote {args.results} and {figure} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
