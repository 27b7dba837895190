"""ovd: open-vocabulary object detection. ``ovd.Detector`` is the inference API (`ovd.inference`)."""

from __future__ import annotations

from typing import Any

__all__ = ["Detector"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import ovd` stays cheap for the tools that only need a submodule.
    if name == "Detector":
        from ovd.inference.detector_api import Detector

        return Detector
    raise AttributeError(f"module 'ovd' has no attribute {name!r}")
