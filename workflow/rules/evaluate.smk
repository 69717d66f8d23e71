# Each job pairs its method with the autoregressive baseline sample by sample; it takes every core so
# that no other job disturbs the timing.
rule evaluate:
    input:
        data=str(layout.task_file(CFG, "{task}")),
        drafter=lambda wc: method_drafter(wc.method),
    output:
        str(layout.eval_dir(CFG, "{method}", "{task}") / "metrics.json"),
    params:
        method=lambda wc: repr(CFG.method_section(wc.method)),  # a hybrid's parts included
        target=section("target"),
        eval=lambda wc: repr(CFG.eval_section(wc.method)),  # its rival too, when it has one
    threads: workflow.cores
    resources:
        **resources_of("evaluate", 1 if CFG.resources.gpus else 0),  # one GPU each, claimed as extract claims
    log:
        str(layout.log_file(CFG, "evaluate", "{method}-{task}")),
    shell:
        "deepspec evaluate --config {EFFECTIVE} --method {wildcards.method} --task {wildcards.task}"
        " --threads {threads} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"
