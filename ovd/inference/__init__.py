"""Inference with a vocabulary of your own: the `Detector` API, vocabularies and their cached text embeddings,
drawing, and ONNX export (`ovd.inference.export`, which needs the ``export`` extra)."""

from ovd.inference.detector_api import Detections, Detector
from ovd.inference.vocabulary import PRESETS, TextEncoder, Vocabulary, parse_vocabulary, preset_vocabulary

__all__ = ["PRESETS", "Detections", "Detector", "TextEncoder", "Vocabulary", "parse_vocabulary", "preset_vocabulary"]
