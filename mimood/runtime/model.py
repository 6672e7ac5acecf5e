"""Which model a command runs: what `-m/--model` names, or the bundled model when it names nothing.

    choice = resolve_model("runs/default")     # ModelChoice(export=runs/default/export, run=runs/default, ...)
    choice = resolve_model(None, say=print)    # the bundled model; says so in one line
    run = require_run("runs/default", "mimood-eval")   # commands that need the training run itself

-m/--model takes
- an export folder: it holds manifest.json (mimood-export writes one; the bundled model is one);
- a training run folder: it holds config.json (mimood-train writes one); inference uses <run>/export, which the
  CLI exports first when it is missing (mimood.export is not part of the runtime);
- nothing: the bundled model, an export folder shipped inside the package at BUNDLED (mimood/assets/model), or
  the folder in the environment variable MIMOOD_BUNDLED_MODEL (an override, e.g. for tests or a site's own model).
Anything else is one `InputError` line, before anything is exported or written.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mimood.contract import MANIFEST_NAME
from mimood.errors import InputError

BUNDLED = Path(__file__).resolve().parents[1] / "assets" / "model"     # the one place the bundled path is named
BUNDLED_ENV = "MIMOOD_BUNDLED_MODEL"
RUN_CONFIG = "config.json"


def bundled_folder() -> Path:
    """The bundled model's export folder: $MIMOOD_BUNDLED_MODEL when set, else BUNDLED."""
    return Path(os.environ.get(BUNDLED_ENV) or BUNDLED)


@dataclass
class ModelChoice:
    export: Path              # the export folder inference reads (for a run without an export: where it goes)
    run: Path | None = None   # the training run, when -m named one
    bundled: bool = False

    @property
    def needs_export(self) -> bool:
        return self.run is not None and not (self.export / MANIFEST_NAME).is_file()


def resolve_model(model: str | Path | None, say: Callable[[str], None] | None = None) -> ModelChoice:
    """The model -m/--model names (module docstring); `say` gets the one line naming the bundled model."""
    if model is None:
        folder = bundled_folder()
        if not (folder / MANIFEST_NAME).is_file():
            raise InputError(folder, "no bundled model here (no manifest.json): give -m/--model with an export "
                                     "folder or a training run folder")
        if say is not None:
            say(f"no --model given: using the bundled model {bundled_name(folder)} ({_shown(folder)})")
        return ModelChoice(folder, bundled=True)
    p = Path(model)
    if not p.exists():
        raise InputError(p, "model folder not found (-m/--model takes an export folder or a training run folder)")
    if not p.is_dir():
        raise InputError(p, "not a folder: -m/--model takes an export folder or a training run folder")
    if (p / MANIFEST_NAME).is_file():
        return ModelChoice(p)
    if (p / RUN_CONFIG).is_file():
        return ModelChoice(p / "export", run=p)
    raise InputError(p, f"neither an export folder ({MANIFEST_NAME}) nor a training run folder ({RUN_CONFIG})")


def require_run(model: str | Path, command: str) -> Path:
    """The training run folder a command needs (evaluation, export, timing from checkpoints)."""
    p = Path(model)
    if not p.is_dir():
        raise InputError(p, "run folder not found (-m/--model takes the training run folder here)")
    if (p / RUN_CONFIG).is_file():
        return p
    if (p / MANIFEST_NAME).is_file():
        raise InputError(p, f"is an export folder; {command} needs the training run folder it came from "
                            f"({RUN_CONFIG}, checkpoints)")
    raise InputError(p, f"not a training run folder (no {RUN_CONFIG})")


def bundled_name(folder: Path) -> str:
    """A short name of an export: `<preset> preset, mimood <version>, <date>` from its manifest."""
    try:
        m = json.loads((folder / MANIFEST_NAME).read_text())
        return f"{m.get('preset', '?')} preset, mimood {m.get('versions', {}).get('mimood', '?')}, " \
               f"{str(m.get('created', '?'))[:10]}"
    except (OSError, ValueError, AttributeError):
        return "(unreadable manifest)"


def _shown(folder: Path) -> str:
    """The bundled folder as the user should read it: relative to the package's parent when inside it."""
    try:
        return str(folder.resolve().relative_to(BUNDLED.parents[2]))
    except ValueError:
        return str(folder)
