# Validation, the effective config every stage reads, and the MLflow parent run of this invocation.
import os
import sys

import yaml
from snakemake.utils import validate

from deepspec import layout, tracking
from deepspec.config import ConfigError
from deepspec.config import validate as validate_config
from deepspec.io import write_text

try:
    CFG = validate_config(config)  # pydantic: one line naming the key and the problem
except ConfigError as err:
    sys.stderr.write(f"{err}\n")
    raise SystemExit(2)
validate(config, "../schemas/config.schema.json", set_default=False)  # the same shape; pydantic fills defaults

OUT = str(CFG.out_dir)
METHODS = list(CFG.methods)
TASKS = list(CFG.tasks)
EFFECTIVE = str(layout.effective_config(CFG))

_text = yaml.safe_dump(CFG.model_dump(mode="json"), sort_keys=False)
if not os.path.exists(EFFECTIVE) or open(EFFECTIVE).read() != _text:
    write_text(EFFECTIVE, _text)  # rewritten only on change: its mtime must not retrigger jobs


def resources_of(stage, gpus=0):
    """A job's memory (MB), run time (minutes) and GPUs, from the config's `resources` section."""
    return CFG.resources.of(stage, gpus)


def section(*keys):
    """A config section as a string: used as a rule param, so changing it reruns exactly the affected jobs
    (and changing only where they run, launcher or servers, reruns nothing)."""
    return repr(CFG.section(*keys))


onstart:
    os.environ[tracking.PIPELINE_ENV] = tracking.start_pipeline(CFG)


onsuccess:
    if os.environ.get(tracking.PIPELINE_ENV):
        tracking.end_pipeline(CFG, os.environ[tracking.PIPELINE_ENV], ok=True)


onerror:
    if os.environ.get(tracking.PIPELINE_ENV):
        tracking.end_pipeline(CFG, os.environ[tracking.PIPELINE_ENV], ok=False)
