# Drafter training: target-regenerated conversations -> feature cache (one job per shard) -> train.
# Only drafters some method decodes with are built; every job takes all cores (they are compute bound).
from deepspec import layout

FEATURES = layout.features_dir(CFG)
SHARDS = [f"{s:05d}" for s in range(CFG.features.shards)]
DRAFTERS = CFG.drafters_in_use()


def drafter_model(name):
    return str(layout.drafter_model(CFG, name) / "model.safetensors")


def method_drafter(method):
    """The drafters an evaluate job of `method` decodes with, its rival's included: trained here, or published
    checkpoints."""
    methods = [method] + ([CFG.eval.rivals[method]] if method in CFG.eval.rivals else [])
    return [drafter_model(d) for m in methods for d in CFG.method_drafters(m)] + \
        [f"{folder}/config.json" for m in methods for folder in CFG.method_checkpoints(m)]


wildcard_constraints:
    shard=r"\d{5}",


rule prepare_train:
    output:
        str(layout.train_data_file(CFG)),
    params:
        train_data=section("train_data"),
        target=section("target"),
    threads: workflow.cores
    resources:
        **resources_of("prepare_train"),
    log:
        str(layout.log_file(CFG, "prepare", "train_data")),
    shell:
        "deepspec prepare --train --config {EFFECTIVE} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"


rule extract:
    input:
        rules.prepare_train.output,
    output:
        shard=str(layout.shard_path(CFG, "{shard}")),
        meta=str(layout.shard_path(CFG, "{shard}").with_suffix(".json")),
    params:
        features=section("features"),
        target=section("target"),
    threads: workflow.cores
    resources:
        **resources_of("extract", CFG.resources.gpus),  # each job claims a free GPU of its node
    log:
        str(layout.log_file(CFG, "extract", "shard-{shard}")),
    shell:
        "deepspec extract --config {EFFECTIVE} --shard {wildcards.shard} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"


rule feature_manifest:
    input:
        expand(str(layout.shard_path(CFG, "{shard}").with_suffix(".json")), shard=SHARDS),
    output:
        str(FEATURES / "manifest.json"),
    resources:
        **resources_of("feature_manifest"),
    log:
        str(layout.log_file(CFG, "extract", "manifest")),
    shell:
        "deepspec extract --manifest --config {EFFECTIVE} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"


# The checkpoint folder and train_log.jsonl are not declared outputs: Snakemake would delete them before
# a rerun, and they are what a killed training resumes from.
# With `features.extract: online` a train job runs the target itself: it needs the training data, and the
# extract jobs leave the DAG.
rule train:
    input:
        rules.prepare_train.output if CFG.features.extract == "online" else rules.feature_manifest.output,
    output:
        model=drafter_model("{drafter}"),
        metrics=str(layout.drafter_dir(CFG, "{drafter}") / "metrics.json"),
    params:
        drafter=lambda wc: section("drafters", wc.drafter),
    threads: workflow.cores
    resources:
        mem_mb=resources_of("train")["mem_mb"],
        runtime=resources_of("train")["runtime"],
        gpu=lambda wc: CFG.drafters[wc.drafter].train.processes if CFG.resources.gpus else 0,
    log:
        str(layout.log_file(CFG, "train", "{drafter}")),
    shell:
        "deepspec train --config {EFFECTIVE} --drafter {wildcards.drafter} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"
