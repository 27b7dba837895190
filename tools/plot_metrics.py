"""Figures of training runs, from their `metrics.jsonl` and `final_metrics.json` alone (nothing is re-run).

    python tools/plot_metrics.py --chain output/shapes                  # output/shapes/summary.png and curves.png
    python tools/plot_metrics.py output/sweep/a output/sweep/b --out curves.png    # independent runs, overlaid

--chain reads the chain's `chain_results.json`: summary.png has AP50 novel/base/all per stage (the oracle upper
bound hatched), the pseudo-box precision and the proposal model's AR@20; curves.png puts the stages on one
continuous iteration axis, each starting where the run whose weights it loads ended. Run folders given by name
are drawn each from its own iteration 0. What cannot be read is printed as a note and written on the figure.
"""

from __future__ import annotations

import argparse
import sys

from ovd.utils.figures import curves_figure, load_runs, save_figure, write_chain_figures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="run folders (OUTPUT_DIR) holding metrics.jsonl")
    p.add_argument("--chain", help="a chain's output folder (holding chain_results.json and one folder per stage)")
    p.add_argument("--out", default="curves.png", help="the curves of the runs given by name")
    args = p.parse_args(argv)
    if bool(args.chain) == bool(args.runs):
        p.error("give either --chain FOLDER or run folders")
    try:
        if args.chain:
            *written, notes = write_chain_figures(args.chain)
        else:
            chain = load_runs(args.runs)
            written, notes = [save_figure(curves_figure(chain), args.out)], chain.notes
    except FileNotFoundError as e:
        sys.exit(f"plot_metrics: {e}")
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
