# Methods run again in the serving engines users deploy (`engines:` in the config): the engine's pinned
# environment (made once under the cache, reused), each trained drafter exported to the engine's layout, then
# one job per engine x method x task beside that engine's own autoregressive run. None of it exists without
# an `engines` section.
ENGINE_RUNS = [(e, m, t) for e, run in CFG.engines.items() for m in run.methods for t in TASKS]


def deployed_metrics():
    return [str(layout.deployed_dir(CFG, e, m, t) / "metrics.json") for e, m, t in ENGINE_RUNS]


def deploy_inputs(wc):
    """Task data, the engine's environment record, and the method's drafters in the engine's layout."""
    return {"data": str(layout.task_file(CFG, wc.task)), "engine": str(layout.engine_record(CFG, wc.engine)),
            "exports": [str(layout.export_dir(CFG, d, wc.engine) / "config.json")
                        for d in CFG.engine_exports(wc.engine, wc.method)]}


rule engine_env:
    output:
        str(layout.engine_record(CFG, "{engine}")),
    resources:
        **resources_of("engine_env"),
    log:
        str(layout.log_file(CFG, "engine_env", "{engine}")),
    shell:
        "deepspec engine setup {wildcards.engine} --record {output} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"


rule export:
    input:
        drafter_model("{drafter}"),
    output:
        str(layout.export_dir(CFG, "{drafter}", "{fmt}") / "config.json"),
    resources:
        **resources_of("export"),
    log:
        str(layout.log_file(CFG, "export", "{drafter}-{fmt}")),
    shell:
        "deepspec export --config {EFFECTIVE} --drafter {wildcards.drafter}"
        " --to {wildcards.fmt} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"


# Each job takes every core, as evaluate does: it times two engines.
rule deploy:
    input:
        unpack(deploy_inputs),
    output:
        str(layout.deployed_dir(CFG, "{engine}", "{method}", "{task}") / "metrics.json"),
    params:
        method=lambda wc: section("methods", wc.method),
        target=section("target"),
        eval=repr(CFG.eval_section()),  # rivals are ours alone
        engine=lambda wc: section("engines", wc.engine),
    threads: workflow.cores
    resources:
        **resources_of("deploy"),
    log:
        str(layout.log_file(CFG, "deploy", "{engine}-{method}-{task}")),
    shell:
        "deepspec deploy --config {EFFECTIVE} --engine {wildcards.engine} --method {wildcards.method}"
        " --task {wildcards.task} --threads {threads} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"
