"""Check that README's `make demo` table is what a fresh run printed (or write it there with --write).

    python tools/check_readme_results.py                       # after `make demo`: exit 1 and a diff if they differ
    python tools/check_readme_results.py --write               # put the run's table into README

The table lives between ``<!-- make-demo-results:begin -->`` and ``<!-- make-demo-results:end -->`` in README.md and is
rendered from the chain's ``chain_results.json`` (AP50 per stage, the proposals' recall, the pseudo boxes), so every
digit README shows comes from a run. The same machine and thread count give the same digits (the chain records both);
another machine's BLAS can move them within the spread the ablation reports (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from ovd.utils.io import read_json, write_text

BEGIN, END = "<!-- make-demo-results:begin -->", "<!-- make-demo-results:end -->"


def render(manifest: dict) -> str:
    """The README block of one chain run (`tools/run_chain.py`'s ``chain_results.json``)."""
    lines = ["| stage | AP50 novel | AP50 base | AP50 all |", "|---|---|---|---|"]
    for stage, r in manifest["results"].items():
        label = f"{stage} (oracle proposals: upper bound)" if manifest["stages"][stage].get("upper_bound") else stage
        lines.append(f"| {label} | {100 * r['AP50_novel']:.1f} | {100 * r['AP50_base']:.1f} | {100 * r['AP50']:.1f} |")
    lines.append("")
    for source, rec in manifest.get("proposal_recall", {}).items():
        lines.append(f"Proposals ({source}), {manifest['dataset']}: AR@20 novel {100 * rec['AR@20_novel']:.1f} / base "
                     f"{100 * rec['AR@20_base']:.1f}, recall@0.5 novel {100 * rec['recall@0.5_novel']:.1f} / base "
                     f"{100 * rec['recall@0.5_base']:.1f}.")
    p, st = manifest.get("pseudo_boxes", {}).get("precision"), manifest.get("pseudo_boxes", {}).get("stats", {})
    if p:
        lines.append(f"Pseudo boxes: precision {p['all']['precision']:.3f} (base {p['base']['precision']:.3f}, novel "
                     f"{p['novel']['precision']:.3f}); {st.get('labels_kept')} of {st.get('labels')} image labels kept.")
    lines.append(f"Run: `{manifest['command']}`, {manifest.get('threads')} thread(s), "
                 f"{manifest.get('machine', '')}.")
    return "\n".join(lines)


def replace_block(text: str, block: str, *, source: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{source} has no {BEGIN} ... {END} block")
    return text[: start + len(BEGIN)] + "\n" + block + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="output/shapes/chain_results.json", help="the chain's manifest")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--write", action="store_true", help="write the run's table into README instead of checking")
    args = p.parse_args(argv)
    manifest = read_json(args.results, what="chain results (run `make demo` first)")
    if "results" not in manifest:
        print(f"error: {args.results} has no final results: the chain did not finish", file=sys.stderr)
        return 2
    readme = Path(args.readme)
    text = readme.read_text()
    try:
        wanted = replace_block(text, render(manifest), source=str(readme))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.write:
        write_text(readme, wanted)
        print(f"wrote the results of {args.results} into {readme}")
        return 0
    if wanted == text:
        print(f"{readme} shows the results of {args.results}")
        return 0
    sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), wanted.splitlines(True), str(readme), args.results))
    print(f"\n{readme} differs from the run in {args.results} (lines above); `--write` puts the run's table there",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
