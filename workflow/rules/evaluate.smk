# Each job pairs its method with the autoregressive baseline sample by sample; it takes every core so
# that no other job disturbs the timing.
rule evaluate:
    input:
        data=f"{OUT}/data/tasks/{{task}}.jsonl",
        drafter=lambda wc: method_drafter(wc.method),
    output:
        f"{OUT}/eval/{{method}}/{{task}}/metrics.json",
    params:
        method=lambda wc: section("methods", wc.method),
        target=section("target"),
        eval=section("eval"),
    threads: workflow.cores
    resources:
        **resources_of("evaluate"),
    log:
        f"{OUT}/logs/evaluate/{{method}}-{{task}}.log",
    shell:
        "deepspec evaluate --config {EFFECTIVE} --method {wildcards.method} --task {wildcards.task}"
        " --threads {threads} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"
