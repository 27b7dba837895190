"""The whole method on the shapes world (`make demo`): each stage is one of the project's tools, run in order.

    world → toy CLIP teacher → text embeddings → oracle proposals → region embeddings → pseudo boxes
          → train base → RKD (from base) → RKD+PIS+WT (from RKD) → one table

Every stage skips itself when its output already exists and is valid (the tools check their own outputs; training
runs are complete when `final_metrics.json` is written, and resume from their last checkpoint otherwise), so a second
run is fast and an interrupted run continues. The commands are printed, so each stage can be rerun by hand.

    python tools/run_shapes_chain.py                      # the demo: base, rkd, rkd_pis_wt
    python tools/run_shapes_chain.py --stages base rkd pis rkd_pis rkd_pis_wt control --output output/ablation/seed1 SEED 1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ovd.utils.paths import datasets_root
from ovd.evaluation import format_results_table
from ovd.utils.io import read_json

STAGES = ("base", "control", "rkd", "pis", "rkd_pis", "rkd_pis_wt")
INIT_FROM = {"control": "base", "rkd": "base", "pis": "base", "rkd_pis": "base", "rkd_pis_wt": "rkd"}  # DESIGN §2
PY = [sys.executable]
REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    """Run a tool of this repository (paths relative to its root), echoing the command."""
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def prepare(root: Path, *, num_train: int, num_val: int, teacher_steps: int, pseudo_threshold: float | None) -> dict:
    """The offline steps of the method; returns the pseudo-box report."""
    ann, props, regions = root / "annotations", root / "proposals", root / "region_embeddings"
    teacher = f"local-dir:{root / 'toy_clip'}"
    text = root / "text_embeddings" / "toy_clip.npy"
    pseudo = root / "pseudo_boxes" / "train.json"
    run(PY + ["tools/make_shapes_world.py", "--out", str(root), "--num-train", str(num_train), "--num-val", str(num_val),
              "--workers", "2"])
    run(PY + ["tools/train_toy_clip.py", "--world", str(root), "--steps", str(teacher_steps)])
    if not _text_is_current(text, teacher):
        run(PY + ["tools/dump_text_embeddings.py", "--model", teacher, "--coco-json", str(ann / "val.json"),
                  "--out", str(text)])
    for split, src in (("train", "train_all"), ("val", "val")):
        if not (props / f"{split}_oracle.json").is_file():
            run(PY + ["tools/make_oracle_proposals.py", "--dataset-json", str(ann / f"{src}.json"),
                      "--out", str(props / f"{split}_oracle.json")])
        # 10 regions per training image: RKD uses the best 5, the miner chooses among all 10
        top_k = "10" if split == "train" else "5"
        run(PY + ["tools/extract_region_embeddings.py", "--dataset", f"shapes_{src}", "--proposals",
                  str(props / f"{split}_oracle.json"), "--model", teacher, "--top-k", top_k, "--out",
                  str(regions / split), "--no-progress"])
    if not pseudo.is_file():
        run(PY + ["tools/mine_pseudo_labels.py", "--image-labels", str(ann / "train_image_labels.json"),
                  "--image-root", str(root / "images" / "train"), "--region-store", str(regions / "train"),
                  "--text-embeddings", str(text), "--model", teacher, "--gt", str(ann / "train_all.json"),
                  "--out", str(pseudo), "--no-progress",
                  *(["--threshold", str(pseudo_threshold)] if pseudo_threshold is not None else [])])
    return read_json(pseudo).get("info", {})


def _text_is_current(path: Path, teacher: str) -> bool:
    sidecar = path.with_suffix(".json")
    return path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("model") == teacher


def train_stage(stage: str, out: Path, opts: list[str]) -> dict:
    run_dir = out / stage
    done = run_dir / "final_metrics.json"
    if not (done.is_file() and (run_dir / "model_final.pth").is_file()):
        init = ["MODEL.WEIGHTS", str(out / INIT_FROM[stage] / "model_final.pth")] if stage in INIT_FROM else []
        run(PY + ["tools/train_net.py", "--config-file", f"configs/shapes/{stage}.yaml", "--resume",
                  "OUTPUT_DIR", str(run_dir), *init, *opts])
    return read_json(done)["shapes_val"]


def summary(results: dict[str, dict], pseudo_info: dict) -> str:
    lines = [f"{'stage':<12} {'AP50 novel':>10} {'AP50 base':>10} {'AP50 all':>9} {'cos novel':>10} {'agree novel':>12}"]
    for stage, r in results.items():
        lines.append(f"{stage:<12} {100 * r['AP50_novel']:>10.1f} {100 * r['AP50_base']:>10.1f} {100 * r['AP50']:>9.1f} "
                     f"{r.get('fidelity/cosine_novel', float('nan')):>10.3f} {r.get('fidelity/agreement_novel', float('nan')):>12.3f}")
    p, st = pseudo_info.get("precision"), pseudo_info.get("stats", {})
    if p:
        lines.append(f"pseudo boxes: precision {p['all']['precision']:.3f} (base {p['base']['precision']:.3f}, novel "
                     f"{p['novel']['precision']:.3f}); {st.get('labels_kept')} of {st.get('labels')} image labels kept")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=["base", "rkd", "rkd_pis_wt"])
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=300)
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--pseudo-threshold", type=float, help="miner's score threshold (default: the miner's)")
    p.add_argument("--output", default="output/shapes", help="folder of the training runs, one per stage")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every training stage")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    root = datasets_root() / "shapes"
    pseudo_info = prepare(root, num_train=args.num_train, num_val=args.num_val, teacher_steps=args.teacher_steps,
                          pseudo_threshold=args.pseudo_threshold)
    out = Path(args.output)
    results = {}
    for stage in args.stages:
        if stage in INIT_FROM and INIT_FROM[stage] not in results and not (out / INIT_FROM[stage] / "model_final.pth").is_file():
            results[INIT_FROM[stage]] = train_stage(INIT_FROM[stage], out, args.opts)
        results[stage] = train_stage(stage, out, args.opts)
    run(PY + ["tools/plot_metrics.py", *[str(out / s) for s in results], "--out", str(out / "curves.png")])
    last = list(results)[-1]
    val_images = sorted((root / "images" / "val").glob("*.png"))[:6]
    run(PY + ["tools/demo.py", "--config-file", f"configs/shapes/{last}.yaml", "--weights",
              str(out / last / "model_final.pth"), "--input", *map(str, val_images), "--vocabulary", "shapes",
              "--confidence-threshold", "0.5", "--output", str(out / "demo_images"), *args.opts])
    print()
    for stage, r in results.items():
        print(format_results_table(r, title=f"{stage} on shapes_val (AP in %)"), "\n")
    print(summary(results, pseudo_info))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s. Outputs:")
    print(f"  world, teacher, proposals, regions, pseudo boxes: {root}")
    for stage in results:
        print(f"  {stage + ':':<12} {out / stage}/ (model_final.pth, metrics.jsonl, tensorboard/, inference/)")
    print(f"  curves:      {out / 'curves.png'}")
    print(f"  detections drawn on 6 val images ({last}, all 16 names incl. the 5 novel): {out / 'demo_images'}")
    return results


if __name__ == "__main__":
    main()
