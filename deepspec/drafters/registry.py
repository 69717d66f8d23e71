"""The drafter registry: every trained drafter kind, by the `kind` its config names.

Each package under `deepspec/drafters/` that holds a trained kind exports `KINDS` (its `DrafterKind`
entries); adding a kind is one package and one name in `PACKAGES`. The experiment config reads its config
classes from here, and the trainer, feature cache, evaluate, export and report ask the entries for the rest.
"""

from __future__ import annotations

from importlib import import_module

from deepspec.drafters.kind import DrafterKind

PACKAGES = ("eagle3", "block", "medusa")

KINDS: dict[str, DrafterKind] = {kind.name: kind for package in PACKAGES
                                 for kind in import_module(f"deepspec.drafters.{package}").KINDS}
DRAFTER_CONFIGS = tuple(kind.config for kind in KINDS.values())
TRAINED_METHODS = tuple(dict.fromkeys(kind.method for kind in KINDS.values()))
