"""The {{name}} use case's own tests run as the platform would run it: this folder is the active
use case (``LOOPLINE_USECASE``), unless the command line chose one already."""

import os
from pathlib import Path

os.environ.setdefault("LOOPLINE_USECASE", str(Path(__file__).resolve().parents[1]))
