"""Root conftest: keep test runs away from the developer's var/ unless told otherwise."""

import os
from pathlib import Path

os.environ.setdefault("VAR_DIR", str(Path(__file__).resolve().parent / "var" / "test"))
