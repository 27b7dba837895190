"""Evaluators with open-vocabulary base/novel splits, on the reference toolkits (pycocotools)."""

from ovd.evaluation.coco_eval import (
    RESULTS_FILENAME,
    COCOEvaluator,
    evaluate_detections,
    format_results_table,
    load_coco_gt,
)
from ovd.evaluation.distillation import distillation_fidelity

__all__ = [
    "RESULTS_FILENAME",
    "COCOEvaluator",
    "distillation_fidelity",
    "evaluate_detections",
    "format_results_table",
    "load_coco_gt",
]
