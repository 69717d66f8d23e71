rule prepare:
    output:
        f"{OUT}/data/tasks/{{task}}.jsonl",
    params:
        task=lambda wc: section("tasks", wc.task),
        seed=section("eval", "seed"),
    resources:
        **resources_of("prepare"),
    log:
        f"{OUT}/logs/prepare/{{task}}.log",
    shell:
        "deepspec prepare --config {EFFECTIVE} --task {wildcards.task} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"
