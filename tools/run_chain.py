"""The whole method on the datasets a config names, one command (`make demo` runs it on configs/shapes/chain.yaml):

    [shapes world → toy CLIP teacher]            (CHAIN.PREPARE: shapes only)
    image labels from captions                    (DATASETS.CUSTOM entries with CAPTIONS, when their JSON is missing)
    teacher text embeddings of the vocabulary     (CHAIN.CLIP_MODEL / CLIP_PRETRAINED)
    proposal model on the box source's boxes (OLN; or RPN) → proposals of the training and test images
    region embeddings (RKD targets) → pseudo boxes (PIS)
    base → RKD (from base) → RKD+PIS+WT (from RKD), each evaluated on DATASETS.TEST[0] → one table, figures

No novel box is seen anywhere but in the evaluation: the proposal model trains on the box source only (its leak guard
refuses novel boxes). ``--proposals oracle`` swaps in jittered true boxes of every class from CHAIN.ALL_BOXES_DATASET
(a labelled upper bound), and ``--upper-bound`` adds the oracle's RKD and RKD+PIS+WT rows beside the chain's own.

Every stage skips itself when its output exists (a training run is complete when `final_metrics.json` is written,
and resumes from its last checkpoint otherwise), so an interrupted run continues. The commands are printed, so each
stage can be rerun by hand. Offline products go to CHAIN.WORK_DIR (`text_embeddings/`, `proposals/<source>/`,
`region_embeddings/<source>/`, `pseudo_boxes/<source>/`); training runs to ``--output`` (default: OUTPUT_DIR), one
folder per stage, with `chain_results.json` (the manifest and final table, updated after each stage) and
`summary.txt`.

    python tools/run_chain.py --config-file configs/custom/example.yaml
    python tools/run_chain.py --config-file configs/shapes/chain.yaml --proposals rpn \\
        --stages base control rkd pis rkd_pis rkd_pis_wt --output output/ablation/rpn/seed1 SEED 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from ovd.config import Config, load_config
from ovd.data.build import load_dataset
from ovd.data.catalog import get_dataset, register_config_datasets
from ovd.data.proposals import load_proposals
from ovd.engine.chain import (
    INIT_FROM,
    PROPOSAL_SOURCES,
    STAGES,
    chain_sources,
    proposal_overrides,
    source_paths,
    stage_overrides,
    text_embeddings_path,
    with_inits,
    work_dir,
)
from ovd.evaluation import format_results_table
from ovd.evaluation.proposal_recall import proposal_recall
from ovd.utils.io import read_json, write_json, write_text

UPPER_BOUND = ("rkd", "rkd_pis_wt")  # the oracle rows of --upper-bound
PY = [sys.executable]
REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    """Run a tool of this repository (``cmd[1]`` is ``tools/<name>.py``) in the current folder, where the config's
    relative paths point; echo the command."""
    if Path.cwd().resolve() != REPO:
        cmd = [cmd[0], str(REPO / cmd[1]), *cmd[2:]]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


class Chain:
    """One chain config's stages; each method runs one step unless its output exists."""

    def __init__(self, config_file: str, cfg: Config, out: Path, opts: list[str]) -> None:
        self.config_file, self.cfg, self.out, self.opts = config_file, cfg, out, opts
        self.sources = chain_sources(cfg)
        self.text = text_embeddings_path(cfg)
        pretrained = cfg.CHAIN.CLIP_PRETRAINED
        self.teacher_args = ["--model", cfg.CHAIN.CLIP_MODEL, *(["--pretrained", pretrained] if pretrained else [])]

    def prepare_shapes(self, *, num_train: int, num_val: int, teacher_steps: int) -> None:
        """The shapes world and the toy CLIP teacher trained on it (CHAIN.PREPARE: shapes)."""
        root = work_dir(self.cfg)
        run(PY + ["tools/make_shapes_world.py", "--out", str(root), "--num-train", str(num_train), "--num-val",
                  str(num_val), "--workers", "2"])
        run(PY + ["tools/train_toy_clip.py", "--world", str(root), "--steps", str(teacher_steps)])

    def image_labels_from_captions(self) -> None:
        """The JSON of each custom image-labelled dataset that names CAPTIONS, when it does not exist yet."""
        for entry in self.cfg.DATASETS.CUSTOM:
            if entry.CAPTIONS and not Path(entry.JSON).is_file():
                vocabulary = get_dataset(self.sources.test).json_file
                run(PY + ["tools/captions_to_image_labels.py", "--captions", entry.CAPTIONS, "--categories",
                          str(vocabulary), "--out", entry.JSON])

    def text_embeddings(self) -> None:
        sidecar = self.text.with_suffix(".json")
        if self.text.is_file() and sidecar.is_file() and \
                json.loads(sidecar.read_text()).get("model") == self.cfg.CHAIN.CLIP_MODEL:
            return
        run(PY + ["tools/dump_text_embeddings.py", *self.teacher_args, "--coco-json",
                  str(get_dataset(self.sources.test).json_file), "--out", str(self.text)])

    def train(self, name: str, stage_opts: list[str], *, init: Path | None = None) -> Path:
        """Train the chain config with ``stage_opts`` into ``out/name`` unless finished there; its final weights."""
        run_dir = self.out / name
        if not ((run_dir / "final_metrics.json").is_file() and (run_dir / "model_final.pth").is_file()):
            run(PY + ["tools/train_net.py", "--config-file", self.config_file, "--resume", *stage_opts,
                      "OUTPUT_DIR", str(run_dir), *(["MODEL.WEIGHTS", str(init)] if init else []), *self.opts])
        return run_dir / "model_final.pth"

    def proposals(self, source: str) -> dict:
        """The class-agnostic proposals of the training and test images: from a proposal model trained here on the box
        source (in ``out/proposals_<source>``), or the noisy oracle. Returns the recall of the test proposals."""
        paths = self.paths(source)
        targets = [("train_proposals", self.sources.box), ("val_proposals", self.sources.test)]
        if "image_proposals" in paths:
            targets.append(("image_proposals", self.sources.image))
        if source == "oracle":
            if not self.cfg.CHAIN.ALL_BOXES_DATASET:
                raise ValueError("--proposals oracle needs CHAIN.ALL_BOXES_DATASET (every true box of the training "
                                 "images)")
            truth = {"train_proposals": self.cfg.CHAIN.ALL_BOXES_DATASET, "val_proposals": self.sources.test,
                     "image_proposals": self.cfg.CHAIN.ALL_BOXES_DATASET}
            for key, _ in targets:
                if not paths[key].is_file():
                    run(PY + ["tools/make_oracle_proposals.py", "--dataset-json",
                              str(get_dataset(truth[key]).json_file), "--out", str(paths[key])])
        elif not all(paths[key].is_file() for key, _ in targets):
            overrides = proposal_overrides(self.cfg, source.upper())
            weights = self.train(f"proposals_{source}", overrides)
            for key, dataset in targets:
                # generation reads the images only
                run(PY + ["tools/generate_proposals.py", "--config-file", self.config_file, "--weights", str(weights),
                          "--dataset", dataset, "--top-k", str(self.cfg.CHAIN.PROPOSALS_PER_IMAGE), "--batch-size",
                          "8", "--out", str(paths[key]), "--no-progress", *overrides, *self.opts])
        proposals, _ = load_proposals(paths["val_proposals"])
        return proposal_recall(load_dataset(self.sources.test), proposals)

    def regions_and_pseudo_boxes(self, source: str, *, pseudo_threshold: float | None) -> dict:
        """Region embeddings of the source's proposals, and the pseudo boxes mined from them; the miner's report."""
        paths = self.paths(source)
        stores = [("train", self.sources.box, self.cfg.CHAIN.TRAIN_REGIONS),
                  ("val", self.sources.test, self.cfg.CHAIN.TEST_REGIONS)]
        if "image_regions" in paths:
            stores.append(("image", self.sources.image, self.cfg.CHAIN.TRAIN_REGIONS))
        for split, dataset, top_k in stores:
            run(PY + ["tools/extract_region_embeddings.py", "--config-file", self.config_file, "--dataset", dataset,
                      "--proposals", str(paths[f"{split}_proposals"]), *self.teacher_args, "--top-k", str(top_k),
                      "--out", str(paths[f"{split}_regions"]), "--no-progress"])
        if self.sources.image is None:
            return {}
        labels = get_dataset(self.sources.image)
        mined_from = read_json(paths["pseudo"]).get("info", {}).get("image_labels") if paths["pseudo"].is_file() else None
        if mined_from != str(labels.json_file):  # missing, or mined from other labels (tags before, captions now)
            novel = get_dataset(self.sources.test).novel_category_ids
            gt = self.cfg.CHAIN.ALL_BOXES_DATASET
            run(PY + ["tools/mine_pseudo_labels.py", "--image-labels", str(labels.json_file), "--image-root",
                      str(labels.image_root), "--region-store", str(paths.get("image_regions", paths["train_regions"])),
                      "--text-embeddings", str(self.text), *self.teacher_args, "--out", str(paths["pseudo"]),
                      "--no-progress", *(["--novel-ids", ",".join(map(str, novel))] if novel else []),
                      *(["--gt", str(get_dataset(gt).json_file)] if gt else []),
                      *(["--threshold", str(pseudo_threshold)] if pseudo_threshold is not None else [])])
        return read_json(paths["pseudo"]).get("info", {})

    def paths(self, source: str) -> dict[str, Path]:
        return source_paths(self.cfg, source, separate_image_store=self._separate_image_store)

    @functools.cached_property
    def _separate_image_store(self) -> bool:
        """Whether the image-labelled images need proposals and regions of their own (not all among the box
        source's images, in the same folder). Read once: a COCO-size file takes seconds to parse."""
        if self.sources.image is None:
            return False
        box, image = get_dataset(self.sources.box), get_dataset(self.sources.image)
        if box.image_root.resolve() != image.image_root.resolve():
            return True
        ids = lambda spec: {img["id"] for img in read_json(spec.json_file)["images"]}  # noqa: E731
        return not ids(image) <= ids(box)


def summary(results: dict[str, dict], pseudo_info: dict, recall: dict[str, dict], dataset: str) -> str:
    lines = [f"{'stage':<18} {'AP50 novel':>10} {'AP50 base':>10} {'AP50 all':>9} {'cos novel':>10} {'agree novel':>12}"]
    for stage, r in results.items():
        lines.append(f"{stage:<18} {100 * r['AP50_novel']:>10.1f} {100 * r['AP50_base']:>10.1f} {100 * r['AP50']:>9.1f} "
                     f"{r.get('fidelity/cosine_novel', float('nan')):>10.3f} {r.get('fidelity/agreement_novel', float('nan')):>12.3f}")
    for source, rec in recall.items():
        lines.append(f"proposals ({source}) on {dataset}: AR@20 novel {100 * rec['AR@20_novel']:.1f}, base "
                     f"{100 * rec['AR@20_base']:.1f}; recall@0.5 novel {100 * rec['recall@0.5_novel']:.1f}, base "
                     f"{100 * rec['recall@0.5_base']:.1f}")
    p, st = pseudo_info.get("precision"), pseudo_info.get("stats", {})
    if p:
        lines.append(f"pseudo boxes: precision {p['all']['precision']:.3f} (base {p['base']['precision']:.3f}, novel "
                     f"{p['novel']['precision']:.3f}); {st.get('labels_kept')} of {st.get('labels')} image labels kept")
    elif st:
        lines.append(f"pseudo boxes: {st.get('labels_kept')} of {st.get('labels')} image labels kept")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the chain config (e.g. configs/custom/example.yaml)")
    p.add_argument("--stages", nargs="*", choices=STAGES, default=["base", "rkd", "rkd_pis_wt"],
                   help="training stages (default: %(default)s); none: only the offline steps")
    p.add_argument("--proposals", choices=PROPOSAL_SOURCES,
                   help="where the class-agnostic proposals come from (default: CHAIN.PROPOSALS; oracle = upper bound)")
    p.add_argument("--upper-bound", action="store_true", help="also run RKD and RKD+PIS+WT on oracle proposals")
    p.add_argument("--num-train", type=int, default=2000, help="CHAIN.PREPARE shapes: training images")
    p.add_argument("--num-val", type=int, default=300, help="CHAIN.PREPARE shapes: val images")
    p.add_argument("--teacher-steps", type=int, default=600, help="CHAIN.PREPARE shapes: toy teacher steps")
    p.add_argument("--model", help="the teacher, as elsewhere: an open_clip name (ViT-B-32) or local-dir:/path "
                   "(default: CHAIN.CLIP_MODEL)")
    p.add_argument("--pretrained", help="its weights: an open_clip tag (openai) or a local file (default: "
                   "CHAIN.CLIP_PRETRAINED)")
    p.add_argument("--pseudo-threshold", type=float, help="miner's score threshold (default: the miner's)")
    p.add_argument("--output", help="folder of the training runs, one per stage (default: OUTPUT_DIR)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every training stage")
    return p.parse_args(argv)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The trailing overrides, with --model / --pretrained as the CHAIN keys they stand for."""
    teacher = (["CHAIN.CLIP_MODEL", args.model] if args.model else []) + \
        (["CHAIN.CLIP_PRETRAINED", args.pretrained] if args.pretrained is not None else [])
    return [*args.opts, *teacher]


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    opts = config_overrides(args)
    cfg = load_config(args.config_file, opts)
    register_config_datasets(cfg.DATASETS.CUSTOM)
    out = Path(args.output or cfg.OUTPUT_DIR)
    chain = Chain(args.config_file, cfg, out, opts)
    source = args.proposals or cfg.CHAIN.PROPOSALS.lower()
    if source not in PROPOSAL_SOURCES:
        raise ValueError(f"CHAIN.PROPOSALS {cfg.CHAIN.PROPOSALS!r}: expected OLN, RPN or oracle")
    test = chain.sources.test
    command = ["tools/run_chain.py", *(argv if argv is not None else sys.argv[1:])]
    manifest: dict = {"proposal_source": source, "dataset": test, "stages": {}, "threads": torch.get_num_threads(),
                      "machine": platform.processor() or platform.machine(), "command": " ".join(command)}

    def record(name: str, **entry) -> None:
        manifest["stages"][name] = {"run_dir": str(out / name), **entry}
        write_json(out / "chain_results.json", manifest, indent=2)

    if cfg.CHAIN.PREPARE == "shapes":
        chain.prepare_shapes(num_train=args.num_train, num_val=args.num_val, teacher_steps=args.teacher_steps)
    elif cfg.CHAIN.PREPARE:
        raise ValueError(f"CHAIN.PREPARE {cfg.CHAIN.PREPARE!r}: expected 'shapes' or empty")
    chain.image_labels_from_captions()
    chain.text_embeddings()
    sources = [source] + (["oracle"] if args.upper_bound and source != "oracle" else [])
    recall, pseudo = {}, {}
    for src in sources:
        if src != "oracle":
            record(f"proposals_{src}", init_from=None, kind="proposals")
        recall[src] = chain.proposals(src)
        pseudo[src] = chain.regions_and_pseudo_boxes(src, pseudo_threshold=args.pseudo_threshold)
    manifest.update(proposal_recall=recall, pseudo_boxes=pseudo[source])
    write_json(out / "chain_results.json", manifest, indent=2)
    if not args.stages:
        print(summary({}, pseudo[source], recall, test))
        return {}

    # (run name, stage, proposal source); a stage's starting point runs before it, even when not asked for
    plan = [(s, s, source) for s in with_inits(args.stages)]
    if len(sources) > 1:
        plan += [(f"oracle_{s}", s, "oracle") for s in UPPER_BOUND]
    results = {}
    for name, stage, src in plan:
        init_name = INIT_FROM.get(stage)
        if name.startswith("oracle_") and init_name in UPPER_BOUND:
            init_name = f"oracle_{init_name}"
        record(name, init_from=init_name, **({"upper_bound": True} if name.startswith("oracle_") else {}))
        init = out / init_name / "model_final.pth" if init_name else None
        chain.train(name, stage_overrides(cfg, stage, chain.paths(src), chain.text), init=init)
        results[name] = read_json(out / name / "final_metrics.json")[test]
    manifest["results"] = results
    table = summary(results, pseudo[source], recall, test)
    manifest["table"] = table
    write_json(out / "chain_results.json", manifest, indent=2)
    write_text(out / "summary.txt", table + "\n")

    run(PY + ["tools/plot_metrics.py", "--chain", str(out)])
    last = [name for name in results if not manifest["stages"][name].get("upper_bound")][-1]
    test_spec = get_dataset(test)
    images = [str(test_spec.image_root / r["file_name"]) for r in read_json(test_spec.json_file)["images"][:6]]
    run(PY + ["tools/demo.py", "--config-file", args.config_file, "--weights", str(out / last / "model_final.pth"),
              "--input", *images, "--confidence-threshold", "0.5", "--output", str(out / "demo_images"),
              *stage_overrides(cfg, last, chain.paths(source), chain.text), *opts])
    print()
    for stage, r in results.items():
        print(format_results_table(r, title=f"{stage} on {test} (AP in %)"), "\n")
    print(table)
    print(f"\nwall time {time.perf_counter() - t0:.0f} s ({torch.get_num_threads()} threads). Outputs:")
    print(f"  text embeddings, proposals, regions, pseudo boxes: {chain.text.parent.parent}")
    for stage in manifest["stages"]:
        print(f"  {stage + ':':<18} {out / stage}/ (model_final.pth, metrics.jsonl, tensorboard/, inference/)")
    print(f"  table:       {out / 'summary.txt'}, {out / 'chain_results.json'}")
    print(f"  figures:     {out / 'summary.png'}, {out / 'curves.png'}")
    print(f"  detections drawn on 6 images of {test} ({last}, the training vocabulary): {out / 'demo_images'}")
    return results


if __name__ == "__main__":
    main()
