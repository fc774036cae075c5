"""TorchServe's entry point in every Loopline archive (archived as ``loopline_handler.py``).

One TorchServe serves the models of every use case of a platform, each version in worker
processes of its own. Before anything reads a use-case declaration, this points the worker at
the use case and the home its archive was built for (``serving.json``), then hands over to
``serving.handler``.
"""

import json
import os
from pathlib import Path

_ARCHIVED = json.loads(Path(__file__).with_name("serving.json").read_text())
for _variable, _key in (("LOOPLINE_USECASE", "usecase"), ("LOOPLINE_HOME", "home")):
    if _ARCHIVED.get(_key):
        os.environ[_variable] = str(_ARCHIVED[_key])

from serving.handler import LooplineHandler  # noqa: E402 (after the environment is set)


class Handler(LooplineHandler):
    """The worker's handler, for its archive's use case."""
