"""Data that ships inside the package: the default prices (`pricing.toml`) and the bundled prompts (`prompts/`).

They are package data, found through `importlib.resources`, so a wheel, `pip install .` and
`pip install -e .` all find them from any folder (a path relative to the source tree only works in a
checkout). A user's own files live outside: `--pricing FILE` (or `REID_PROMPT_PRICING`, or
`config/pricing.toml` in the current folder) and `--prompt-file PATH` / `--prompts DIR`.

Nothing here imports from the rest of the pipeline; `pipeline.providers.pricing` and `pipeline.data.prompts`
read these files.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["bundled_path", "PRICING", "PROMPTS"]

PRICING = "pricing.toml"
PROMPTS = "prompts"


def bundled_path(name: str) -> Path:
    """The file-system path of bundled data file or folder `name` (e.g. "pricing.toml", "prompts").

    pip unpacks wheels and maps editable installs onto the file system, so `resources.files` gives a real
    path there; callers want a `Path` because prompts record where they came from and find sibling
    template lists. (A zipped install would give a path that does not exist: the loaders then say
    "not found" in one line, naming it.)
    """
    target = resources.files(__name__).joinpath(name)
    return Path(os.fspath(target)) if isinstance(target, os.PathLike) else Path(str(target))
