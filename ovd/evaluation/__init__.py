"""Evaluators with open-vocabulary base/novel splits, on the reference toolkits (pycocotools, faster-coco-eval's LVIS
mode)."""

from ovd.evaluation.coco_eval import (
    RESULTS_FILENAME,
    COCOEvaluator,
    DetectionEvaluator,
    coco_results,
    evaluate_detections,
    format_results_table,
    load_coco_gt,
)
from ovd.evaluation.distillation import distillation_fidelity
from ovd.evaluation.lvis_eval import (
    LVIS_RESULTS_FILENAME,
    LVISEvaluator,
    evaluate_lvis,
    format_lvis_table,
    load_lvis_gt,
)
from ovd.evaluation.proposal_recall import format_recall_table, proposal_recall

__all__ = [
    "LVIS_RESULTS_FILENAME",
    "RESULTS_FILENAME",
    "COCOEvaluator",
    "DetectionEvaluator",
    "LVISEvaluator",
    "coco_results",
    "distillation_fidelity",
    "evaluate_detections",
    "evaluate_lvis",
    "format_lvis_table",
    "format_results_table",
    "load_coco_gt",
    "load_lvis_gt",
    "format_recall_table",
    "proposal_recall",
]
