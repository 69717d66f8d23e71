"""`deepspec export`: a drafter trained here, written in the layout a serving engine loads.

Each drafter kind owns its layouts (`formats`) and how it writes them (`deepspec/drafters/<kind>/`);
this stage only finds the trained folder and the target, and records the export as an MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepspec.config import Config
from deepspec.drafters.registry import KINDS
from deepspec.layout import drafter_model, export_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = tuple(dict.fromkeys(fmt for kind in KINDS.values() for fmt in kind.formats))


def export_drafter(cfg: Config, name: str, fmt: str, out: str | None = None, dtype: str | None = None) -> Path:
    """Write trained drafter `name` of this experiment in layout `fmt`."""
    from deepspec import tracking
    from deepspec.models import load_model

    if name not in cfg.drafters:
        raise ValueError(f"--drafter: no drafter named {name!r} (drafters: {', '.join(cfg.drafters) or 'none'})")
    kind = KINDS[cfg.drafters[name].kind]
    if fmt not in kind.formats:
        raise ValueError(f"--to {fmt}: drafter {name!r} is {kind.name}, which exports to {', '.join(kind.formats)}")
    folder = drafter_model(cfg, name)
    target = load_model(cfg.target.model, cfg.target.dtype)
    dest = Path(out) if out else export_dir(cfg, name, fmt)
    drafter = kind.load(folder, target.model, target.fingerprint)
    with tracking.stage_run(cfg, "export", f"export {name} {fmt}", drafter=name, format=fmt) as run:
        run.tags(tracking.lineage({"drafter": folder}))
        kind.export(drafter, fmt, dest, target.model, DTYPES[dtype] if dtype else None)
        run.params({"format": fmt, "dtype": dtype or "as trained", "out": str(dest)})
        run.artifact(dest, "export")
    written = json.loads((dest / "config.json").read_text())
    print(f"[export] {name} -> {dest} ({fmt}, {(written.get('architectures') or [kind.name])[0]})")
    return dest
