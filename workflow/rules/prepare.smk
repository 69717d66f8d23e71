rule prepare:
    output:
        str(layout.task_file(CFG, "{task}")),
    params:
        task=lambda wc: section("tasks", wc.task),
        seed=section("eval", "seed"),
    resources:
        **resources_of("prepare"),
    log:
        str(layout.log_file(CFG, "prepare", "{task}")),
    shell:
        "deepspec prepare --config {EFFECTIVE} --task {wildcards.task} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"
