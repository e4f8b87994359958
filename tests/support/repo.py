"""Where the tests find the repository's own files, whatever the working directory.

Every file a test reads from the checkout (the shipped models, their manifest, the README, CI's
script, the benchmarks) is named through this module, rooted at the repository: `python -m
pytest /path/to/tests` from any folder collects and runs the same tests as from the root. The
shipped models come from `models/MANIFEST.json`: a model it lists that is missing is an error
when the tests are collected, never an empty parametrisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Union

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"


def path(*parts: str) -> str:
    """A file of the checkout, by its path from the repository's root."""
    return str(ROOT.joinpath(*parts))


def manifest(folder: Union[str, Path] = MODELS) -> List[dict]:
    """The entries of `folder`/MANIFEST.json (one per shipped model)."""
    with open(Path(folder) / "MANIFEST.json") as f:
        return json.load(f)


def shipped_models(folder: Union[str, Path] = MODELS) -> List[str]:
    """The paths of the models the manifest of `folder` lists, sorted; a FileNotFoundError
    when one is missing or when it lists none, so that a test parametrised over them fails
    instead of silently testing nothing."""
    folder = Path(folder)
    files = sorted(entry["file"] for entry in manifest(folder))
    if not files:
        raise FileNotFoundError(f"{folder / 'MANIFEST.json'} lists no model")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"shipped model {folder / missing[0]} is missing ({len(missing)} of {len(files)}): "
                                f"run models/make_models.py")
    return [str(folder / name) for name in files]


def model(name: str) -> str:
    """The path of the shipped model `name` (a file of models/); FileNotFoundError if absent."""
    found = MODELS / name
    if not found.is_file():
        raise FileNotFoundError(f"shipped model {found} is missing")
    return str(found)
