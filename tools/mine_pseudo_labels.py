"""Pseudo boxes for pseudo image-level supervision (DESIGN §2 PIS): one box per image label, COCO JSON with scores.

Mine from a region store (regions already encoded by the teacher; objectness read back from its proposals file):

    python tools/extract_region_embeddings.py --dataset-json datasets/shapes/annotations/train_image_labels.json \\
        --image-root datasets/shapes/images/train --proposals datasets/shapes/proposals/train_oracle.json \\
        --model local-dir:datasets/shapes/toy_clip --top-k 20 --out datasets/shapes/region_embeddings/train_mining
    python tools/mine_pseudo_labels.py --image-labels datasets/shapes/annotations/train_image_labels.json \\
        --region-store datasets/shapes/region_embeddings/train_mining \\
        --text-embeddings datasets/shapes/text_embeddings/toy_clip.npy \\
        --gt datasets/shapes/annotations/train_all.json --out datasets/shapes/pseudo_boxes/train.json

Mine encoding regions on the fly (no store): ``--proposals F --model M [--pretrained W] [--top-k K]``; the text
embeddings are computed with ``--model`` when ``--text-embeddings`` is not given. Import pseudo boxes made elsewhere:
``--import F`` (validated against the image labels, re-written in our format).

The score is ``p(label | region)^(1 - alpha) * objectness^alpha`` with ``p`` the softmax over the vocabulary of
``logit_scale * cos(region, text)``; see ovd/pseudo_labels/miner.py. With ``--gt`` (all true boxes of the same images)
the precision of the pseudo boxes (IoU >= 0.5 with a true box of the same class) is reported and recorded in the
output's ``info``.

Killed, run it again with the same arguments: the output is written once, atomically, at the end, so a killed run
leaves any earlier output file untouched and the rerun writes the bytes an uninterrupted run writes (mining from a
region store is the fast, model-free pass; the store's extraction is the resumable step).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

from ovd.clip import encode_text, load_clip, load_text_embeddings
from ovd.clip.arguments import add_clip_arguments, check_clip_arguments
from ovd.clip.models import LOCAL_DIR_PREFIX
from ovd.data.catalog import DatasetSpec
from ovd.data.datasets import load_coco_json, load_image_labels
from ovd.data.proposals import load_proposals
from ovd.pseudo_labels.miner import (
    DEFAULT_ALPHA,
    DEFAULT_LOGIT_SCALE,
    DEFAULT_THRESHOLD,
    EncodedRegions,
    import_pseudo_boxes,
    mine_pseudo_boxes,
    open_store_regions,
    pseudo_box_precision,
    save_pseudo_boxes,
)
from ovd.utils.io import read_json


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-labels", required=True, help="image-label JSON (images[] with pos_category_ids)")
    parser.add_argument("--image-root", help="its image folder (needed to encode regions on the fly)")
    parser.add_argument("--out", required=True, help="pseudo-box JSON to write")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--region-store", help="region store of the image-labelled images")
    source.add_argument("--import", dest="import_file",
                        help="pseudo boxes made elsewhere (COCO JSON) to validate and convert")
    parser.add_argument("--proposals", help="proposals file: with --region-store, where its objectness is read "
                                            "(default: the file named in the store); without, the regions to encode")
    parser.add_argument("--text-embeddings", help="teacher text embeddings of the vocabulary (.npy with sidecar)")
    add_clip_arguments(parser, default_model=None, model_help="the teacher, open_clip architecture or "
                       "local-dir:<folder>: encodes regions on the fly (without --region-store), the vocabulary "
                       "(without --text-embeddings), and gives the default --logit-scale")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top-k", type=int, default=20,
                        help="regions per image encoded on the fly (default: %(default)s)")
    parser.add_argument("--nms", type=float, default=0.5, help="NMS IoU of on-the-fly regions (default: %(default)s)")
    parser.add_argument("--threshold", type=float, help=f"minimum score of a kept label (default: {DEFAULT_THRESHOLD} "
                                                        "when mining, none when importing)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="objectness weight (default: %(default)s)")
    parser.add_argument("--logit-scale", type=float,
                        help="scale of region-text cosines in the softmax (default: the learned scale of --model "
                             f"when given, else {DEFAULT_LOGIT_SCALE}, CLIP's)")
    parser.add_argument("--novel-ids", help="comma-separated novel category ids for the report "
                                            "(default: categories whose 'split' is 'novel')")
    parser.add_argument("--gt", help="COCO JSON with all true boxes of the same images, to measure precision")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.import_file is None:
        if args.region_store is None and (args.proposals is None or args.model is None):
            parser.error("give --region-store, or --proposals and --model to encode regions on the fly")
        if args.text_embeddings is None and args.model is None:
            parser.error("give --text-embeddings, or --model to compute them")
        if args.region_store is None and args.image_root is None:
            parser.error("encoding regions on the fly (--proposals) needs --image-root")
    check_clip_arguments(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the tool; returns what it records in the output's ``info`` (parameters, stats, precision)."""
    args = parse_args(argv)
    labels_path = Path(args.image_labels)
    image_labels = read_json(labels_path, what="image-label file")
    categories = image_labels.get("categories", []) if isinstance(image_labels, dict) else []
    novel = (tuple(int(i) for i in args.novel_ids.split(",")) if args.novel_ids
             else tuple(c["id"] for c in categories if c.get("split") == "novel"))
    image_root = Path(args.image_root) if args.image_root else labels_path.parent
    dataset = load_image_labels(DatasetSpec(labels_path.stem, labels_path, image_root, novel))
    info: dict[str, Any] = {"image_labels": str(labels_path)}

    if args.import_file is not None:
        annotations, stats = import_pseudo_boxes(args.import_file, dataset.records, threshold=args.threshold)
        info.update(mode="import", source=args.import_file, threshold=args.threshold)
    else:
        bundle = None
        logit_scale = DEFAULT_LOGIT_SCALE if args.logit_scale is None else args.logit_scale
        if args.model is not None:
            bundle = load_clip(args.model, args.pretrained, device=args.device,
                               seed=args.seed if args.random_init else None)
            if args.logit_scale is None:
                logit_scale = float(bundle.model.logit_scale.detach().exp())
        image_sizes = {r.image_id: (r.height, r.width) for r in dataset.records}
        if args.region_store is not None:
            regions = open_store_regions(args.region_store, image_sizes=image_sizes, proposals_file=args.proposals,
                                         with_objectness=args.alpha > 0)
            teacher = _teacher(regions.store.meta.get("model_name"), regions.store.meta.get("pretrained"))
            region_info = {"region_store": args.region_store, "proposals": args.proposals
                           or regions.store.meta.get("proposals_file"), "top_k": regions.store.meta.get("top_k")}
        else:
            proposals, _ = load_proposals(args.proposals, image_sizes=image_sizes, unknown="skip")
            regions = EncodedRegions(bundle, proposals, top_k=args.top_k, nms_thresh=args.nms)
            teacher = _teacher(args.model, args.pretrained)
            region_info = {"proposals": args.proposals, "top_k": args.top_k, "nms": args.nms}
        if args.text_embeddings is not None:
            text = load_text_embeddings(args.text_embeddings, expected_names=dataset.class_names)
            text_embeds, text_teacher = text.embeds, _teacher(text.meta.get("model"), text.meta.get("pretrained"))
        else:
            text_embeds, text_teacher = encode_text(bundle, dataset.class_names).numpy(), teacher
        for name, other in (("text embeddings", text_teacher), ("--model", _teacher(args.model, args.pretrained))):
            if teacher is not None and other is not None and other != teacher:
                raise SystemExit(f"error: the regions come from teacher {teacher} but the {name} from {other}; "
                                 "embeddings of different teachers are not comparable")
        threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
        annotations, stats = mine_pseudo_boxes(
            dataset.records, category_ids=dataset.category_ids, text_embeds=text_embeds, regions=regions,
            threshold=threshold, alpha=args.alpha, logit_scale=logit_scale, progress=not args.no_progress,
        )
        info.update(mode="mine", teacher=list(teacher) if teacher else None, text_embeddings=args.text_embeddings,
                    threshold=threshold, alpha=args.alpha, logit_scale=logit_scale, **region_info)
    info["stats"] = stats.as_dict()
    if args.gt is not None:
        gt_path = Path(args.gt)
        gt = load_coco_json(DatasetSpec(gt_path.stem, gt_path, image_root))
        info["precision"] = pseudo_box_precision(annotations, gt, novel_category_ids=novel)
    save_pseudo_boxes(args.out, image_labels=image_labels, annotations=annotations, info=info)

    print(f"{info['mode']}: {len(annotations)} pseudo boxes for {stats.images_kept} images -> {args.out}")
    for key, value in stats.as_dict().items():
        print(f"  {key:24s} {value}")
    if "precision" in info:
        print(format_precision(info["precision"]))
    return info


def _teacher(model: str | None, pretrained: str | None) -> tuple[str, str | None] | None:
    """``(model, weights)`` naming a teacher, local paths resolved, so that two spellings of one teacher compare
    equal; None where the model is not known."""
    if model is None:
        return None
    if model.startswith(LOCAL_DIR_PREFIX):
        return LOCAL_DIR_PREFIX + str(Path(model[len(LOCAL_DIR_PREFIX):]).resolve()), None
    if pretrained is not None and Path(pretrained).is_file():
        pretrained = str(Path(pretrained).resolve())
    return model, pretrained


def format_precision(precision: dict[str, Any]) -> str:
    """A table of :func:`ovd.pseudo_labels.miner.pseudo_box_precision`'s result."""

    def row(name: str, split: str, r: dict[str, Any]) -> str:
        p = "   -" if math.isnan(r["precision"]) else f"{r['precision']:.3f}"
        return f"  {name:20s} {split:6s} {r['boxes']:6d} {r['correct']:8d} {p:>9s}"

    lines = [f"  {'class':20s} {'split':6s} {'boxes':>6s} {'correct':>8s} {'precision':>9s}"]
    lines += [row(name, r["split"], r) for name, r in precision["per_class"].items()]
    lines += [row(split, "", precision[split]) for split in ("base", "novel", "all")]
    return "pseudo-box precision (IoU >= 0.5 with a true box of the class):\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
