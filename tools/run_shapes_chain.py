"""The whole method on the shapes world (`make demo`): each stage is one of the project's tools, run in order.

    world → toy CLIP teacher → text embeddings
          → proposal model trained on base boxes (OLN; or RPN) → proposals of the train and val images
          → region embeddings (RKD targets) → pseudo boxes (PIS)
          → train base → RKD (from base) → RKD+PIS+WT (from RKD) → one table, summary.png, curves.png

No novel box is seen anywhere but in the evaluation: the proposal model trains on the base boxes only (its leak guard
refuses others). ``--proposals oracle`` swaps in jittered true boxes of every class (a labelled upper bound), and
``--upper-bound`` adds the oracle's RKD and RKD+PIS+WT as extra rows beside the chain's own.

Every stage skips itself when its output already exists and is valid (training runs are complete when
`final_metrics.json` is written, and resume from their last checkpoint otherwise), so a second run is fast and an
interrupted run continues. The commands are printed, so each stage can be rerun by hand. Offline products live under
`$OVD_DATASETS/shapes/{proposals,region_embeddings,pseudo_boxes}/<source>/`; training runs under --output, with
`chain_results.json` (the manifest and final table, updated after each stage) and `summary.txt` (the table printed).

    python tools/run_shapes_chain.py                      # the demo: OLN proposals; base, rkd, rkd_pis_wt
    python tools/run_shapes_chain.py --proposals rpn --stages base control rkd pis rkd_pis rkd_pis_wt \\
        --output output/ablation/rpn/seed1 SEED 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from ovd.data.build import load_dataset
from ovd.data.proposals import load_proposals
from ovd.evaluation import format_results_table
from ovd.evaluation.proposal_recall import proposal_recall
from ovd.utils.io import read_json, write_json, write_text
from ovd.utils.paths import datasets_root

STAGES = ("base", "control", "rkd", "pis", "rkd_pis", "rkd_pis_wt")
INIT_FROM = {"control": "base", "rkd": "base", "pis": "base", "rkd_pis": "base", "rkd_pis_wt": "rkd"}  # DESIGN §2
SOURCES = ("oln", "rpn", "oracle")
UPPER_BOUND = ("rkd", "rkd_pis_wt")  # the oracle rows of --upper-bound
PY = [sys.executable]
REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    """Run a tool of this repository (paths relative to its root), echoing the command."""
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def source_paths(root: Path, source: str) -> dict[str, Path]:
    """Where the offline products of one proposal source live."""
    return {
        "train_proposals": root / "proposals" / source / "train.json",
        "val_proposals": root / "proposals" / source / "val.json",
        "train_regions": root / "region_embeddings" / source / "train",
        "val_regions": root / "region_embeddings" / source / "val",
        "pseudo": root / "pseudo_boxes" / source / "train.json",
    }


def source_overrides(paths: dict[str, Path]) -> list[str]:
    """Config overrides pointing the training stages at one source's regions and pseudo boxes."""
    return ["MODEL.RKD_FEAT_PATH", str(paths["train_regions"]), "TEST.RKD_FEAT_PATH", str(paths["val_regions"]),
            "MODEL.PIS_PROP_PATH", str(paths["pseudo"])]


def prepare_teacher(root: Path, *, num_train: int, num_val: int, teacher_steps: int) -> tuple[str, Path]:
    """The world, the toy CLIP teacher and its text embeddings of the 16 names."""
    teacher = f"local-dir:{root / 'toy_clip'}"
    text = root / "text_embeddings" / "toy_clip.npy"
    run(PY + ["tools/make_shapes_world.py", "--out", str(root), "--num-train", str(num_train), "--num-val", str(num_val),
              "--workers", "2"])
    run(PY + ["tools/train_toy_clip.py", "--world", str(root), "--steps", str(teacher_steps)])
    if not _text_is_current(text, teacher):
        run(PY + ["tools/dump_text_embeddings.py", "--model", teacher, "--coco-json", str(root / "annotations" / "val.json"),
                  "--out", str(text)])
    return teacher, text


def make_proposals(root: Path, source: str, out: Path, opts: list[str]) -> dict:
    """The class-agnostic proposals of the training and val images: from a proposal model trained here on base boxes
    (`configs/shapes/proposals_<source>.yaml`, run in ``out/proposals_<source>``), or the noisy oracle. Returns the
    recall of the val proposals (all / base / novel)."""
    paths = source_paths(root, source)
    ann = root / "annotations"
    splits = (("train", "shapes_train_all", "train_all"), ("val", "shapes_val", "val"))
    if source == "oracle":
        for split, _, src in splits:
            if not paths[f"{split}_proposals"].is_file():
                run(PY + ["tools/make_oracle_proposals.py", "--dataset-json", str(ann / f"{src}.json"),
                          "--out", str(paths[f"{split}_proposals"])])
    elif not all(paths[f"{split}_proposals"].is_file() for split, _, _ in splits):
        weights = train_stage(f"proposals_{source}", out, opts, config=f"configs/shapes/proposals_{source}.yaml")
        for split, dataset, _ in splits:
            # generation reads the images only; the annotations of shapes_train_all name which images to read
            run(PY + ["tools/generate_proposals.py", "--config-file", f"configs/shapes/proposals_{source}.yaml",
                      "--weights", str(weights), "--dataset", dataset, "--top-k", "50", "--batch-size", "8",
                      "--out", str(paths[f"{split}_proposals"]), "--no-progress", *opts])
    dataset = load_dataset("shapes_val")
    proposals, _ = load_proposals(paths["val_proposals"])
    return proposal_recall(dataset, proposals)


def prepare_regions(root: Path, source: str, *, teacher: str, text: Path, pseudo_threshold: float | None) -> dict:
    """Region embeddings of the source's proposals and the pseudo boxes mined from them; returns the pseudo-box report."""
    paths = source_paths(root, source)
    ann = root / "annotations"
    for split, dataset in (("train", "shapes_train_all"), ("val", "shapes_val")):
        # 10 regions per training image: RKD uses the best 5, the miner chooses among all 10
        top_k = "10" if split == "train" else "5"
        run(PY + ["tools/extract_region_embeddings.py", "--dataset", dataset, "--proposals",
                  str(paths[f"{split}_proposals"]), "--model", teacher, "--top-k", top_k, "--out",
                  str(paths[f"{split}_regions"]), "--no-progress"])
    if not paths["pseudo"].is_file():
        run(PY + ["tools/mine_pseudo_labels.py", "--image-labels", str(ann / "train_image_labels.json"),
                  "--image-root", str(root / "images" / "train"), "--region-store", str(paths["train_regions"]),
                  "--text-embeddings", str(text), "--model", teacher, "--gt", str(ann / "train_all.json"),
                  "--out", str(paths["pseudo"]), "--no-progress",
                  *(["--threshold", str(pseudo_threshold)] if pseudo_threshold is not None else [])])
    return read_json(paths["pseudo"]).get("info", {})


def _text_is_current(path: Path, teacher: str) -> bool:
    sidecar = path.with_suffix(".json")
    return path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("model") == teacher


def train_stage(name: str, out: Path, opts: list[str], *, config: str, init: Path | None = None) -> Path:
    """Train ``config`` into ``out/name`` unless finished there; returns its final weights."""
    run_dir = out / name
    if not ((run_dir / "final_metrics.json").is_file() and (run_dir / "model_final.pth").is_file()):
        run(PY + ["tools/train_net.py", "--config-file", config, "--resume", "OUTPUT_DIR", str(run_dir),
                  *(["MODEL.WEIGHTS", str(init)] if init else []), *opts])
    return run_dir / "model_final.pth"


def with_inits(stages: list[str]) -> list[str]:
    """``stages`` in order, each preceded by the stages its weights come from (DESIGN §2)."""
    order: list[str] = []

    def add(stage: str) -> None:
        if stage not in order:
            if stage in INIT_FROM:
                add(INIT_FROM[stage])
            order.append(stage)

    for stage in stages:
        add(stage)
    return order


def summary(results: dict[str, dict], pseudo_info: dict, recall: dict[str, dict]) -> str:
    lines = [f"{'stage':<18} {'AP50 novel':>10} {'AP50 base':>10} {'AP50 all':>9} {'cos novel':>10} {'agree novel':>12}"]
    for stage, r in results.items():
        lines.append(f"{stage:<18} {100 * r['AP50_novel']:>10.1f} {100 * r['AP50_base']:>10.1f} {100 * r['AP50']:>9.1f} "
                     f"{r.get('fidelity/cosine_novel', float('nan')):>10.3f} {r.get('fidelity/agreement_novel', float('nan')):>12.3f}")
    for source, rec in recall.items():
        lines.append(f"proposals ({source}) on shapes_val: AR@20 novel {100 * rec['AR@20_novel']:.1f}, base "
                     f"{100 * rec['AR@20_base']:.1f}; recall@0.5 novel {100 * rec['recall@0.5_novel']:.1f}, base "
                     f"{100 * rec['recall@0.5_base']:.1f}")
    p, st = pseudo_info.get("precision"), pseudo_info.get("stats", {})
    if p:
        lines.append(f"pseudo boxes: precision {p['all']['precision']:.3f} (base {p['base']['precision']:.3f}, novel "
                     f"{p['novel']['precision']:.3f}); {st.get('labels_kept')} of {st.get('labels')} image labels kept")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="*", choices=STAGES, default=["base", "rkd", "rkd_pis_wt"],
                   help="training stages (default: %(default)s); none: only the offline steps")
    p.add_argument("--proposals", choices=SOURCES, default="oln",
                   help="where the class-agnostic proposals come from (default: %(default)s; oracle = upper bound)")
    p.add_argument("--upper-bound", action="store_true", help="also run RKD and RKD+PIS+WT on oracle proposals")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=300)
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--pseudo-threshold", type=float, help="miner's score threshold (default: the miner's)")
    p.add_argument("--output", default="output/shapes", help="folder of the training runs, one per stage")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every training stage")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    root = datasets_root() / "shapes"
    out = Path(args.output)
    manifest: dict = {"proposal_source": args.proposals, "dataset": "shapes_val", "stages": {},
                      "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                      "command": " ".join(["tools/run_shapes_chain.py", *(argv if argv is not None else sys.argv[1:])])}

    def record(name: str, **entry) -> None:
        manifest["stages"][name] = {"run_dir": str(out / name), **entry}
        write_json(out / "chain_results.json", manifest, indent=2)

    teacher, text = prepare_teacher(root, num_train=args.num_train, num_val=args.num_val, teacher_steps=args.teacher_steps)
    sources = [args.proposals] + (["oracle"] if args.upper_bound and args.proposals != "oracle" else [])
    recall, pseudo = {}, {}
    for source in sources:
        if source != "oracle":
            record(f"proposals_{source}", init_from=None, kind="proposals")
        recall[source] = make_proposals(root, source, out, args.opts)
        pseudo[source] = prepare_regions(root, source, teacher=teacher, text=text, pseudo_threshold=args.pseudo_threshold)
    manifest.update(proposal_recall={s: recall[s] for s in recall}, pseudo_boxes=pseudo[args.proposals])
    write_json(out / "chain_results.json", manifest, indent=2)
    if not args.stages:
        print(summary({}, pseudo[args.proposals], recall))
        return {}

    # (run name, config, proposal source); a stage's starting point runs before it, even when not asked for
    plan = [(s, s, args.proposals) for s in with_inits(args.stages)]
    if len(sources) > 1:
        plan += [(f"oracle_{s}", s, "oracle") for s in UPPER_BOUND]
    results = {}
    for name, stage, source in plan:
        init_name = INIT_FROM.get(stage)
        if name.startswith("oracle_") and init_name in UPPER_BOUND:
            init_name = f"oracle_{init_name}"
        record(name, init_from=init_name, **({"upper_bound": True} if name.startswith("oracle_") else {}))
        init = out / init_name / "model_final.pth" if init_name else None
        opts = source_overrides(source_paths(root, source)) + args.opts
        train_stage(name, out, opts, config=f"configs/shapes/{stage}.yaml", init=init)
        results[name] = read_json(out / name / "final_metrics.json")["shapes_val"]
    manifest["results"] = results
    table = summary(results, pseudo[args.proposals], recall)
    manifest["table"] = table
    write_json(out / "chain_results.json", manifest, indent=2)
    write_text(out / "summary.txt", table + "\n")

    run(PY + ["tools/plot_metrics.py", "--chain", str(out)])
    last = [name for name in results if not manifest["stages"][name].get("upper_bound")][-1]
    val_images = sorted((root / "images" / "val").glob("*.png"))[:6]
    run(PY + ["tools/demo.py", "--config-file", f"configs/shapes/{last}.yaml", "--weights",
              str(out / last / "model_final.pth"), "--input", *map(str, val_images), "--vocabulary", "shapes",
              "--confidence-threshold", "0.5", "--output", str(out / "demo_images"), *args.opts])
    print()
    for stage, r in results.items():
        print(format_results_table(r, title=f"{stage} on shapes_val (AP in %)"), "\n")
    print(table)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s ({torch.get_num_threads()} threads). Outputs:")
    print(f"  world, teacher, proposals, regions, pseudo boxes: {root}")
    for stage in manifest["stages"]:
        print(f"  {stage + ':':<18} {out / stage}/ (model_final.pth, metrics.jsonl, tensorboard/, inference/)")
    print(f"  table:       {out / 'summary.txt'}, {out / 'chain_results.json'}")
    print(f"  figures:     {out / 'summary.png'}, {out / 'curves.png'}")
    print(f"  detections drawn on 6 val images ({last}, all 16 names incl. the 5 novel): {out / 'demo_images'}")
    return results


if __name__ == "__main__":
    main()
