# DeepSpec workflow: prepare -> [regenerate -> extract (per shard) -> train (per drafter)] -> evaluate (method x task)
#   [-> engine env, export -> deploy (engine x method x task)] -> report.
#   snakemake --cores all                                  # the CPU default (config/default.yaml)
#   snakemake --cores all --configfile config/smoke.yaml   # the whole DAG in about a minute
#   snakemake --cores all --config experiment=mine eval='{max_new_tokens: 64}'
#   snakemake --report results/default/report.html          # HTML report of a finished run
from snakemake.utils import min_version

min_version("9.0")


# --configfile replaces the default instead of being merged into it (a smaller config must not inherit
# the default's methods and tasks); --config key=value merges into whichever file is in effect.
if not workflow.overwrite_configfiles:

    configfile: "config/default.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/deploy.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
