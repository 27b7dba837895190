"""Where `ovd` finds data: `$OVD_DATASETS` (default ./datasets), read at call time so tests can point it elsewhere."""

from __future__ import annotations

import os
from pathlib import Path


def datasets_root() -> Path:
    return Path(os.environ.get("OVD_DATASETS", "datasets"))
