"""Shared test setup: where the DeepScaleR data lives.

The data sits beside the repository (../shared/data) and is never copied into it; a clone
elsewhere can point DSR_FAST_SHARED_DATA at it. Tests that need it skip when it is absent.
"""

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("DSR_FAST_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
