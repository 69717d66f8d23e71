# Tables, plots and report.md from every metrics file; the reproduction section compares them with the
# committed reference (results/reference/<experiment>). Items marked report() also make up Snakemake's
# HTML report: `snakemake --report results/<experiment>/report.html`.
rule report:
    input:
        expand(str(layout.eval_dir(CFG, "{method}", "{task}") / "metrics.json"), method=METHODS, task=TASKS),
        [str(layout.drafter_dir(CFG, name) / "metrics.json") for name in DRAFTERS],
    output:
        report=f"{OUT}/report.md",
        table_md=f"{OUT}/tables/summary.md",
        table_csv=report(f"{OUT}/tables/summary.csv", caption="../report/summary.rst", category="Results",
                         labels={"table": "τ and speedup per method × task"}),
        reproduction=report(f"{OUT}/tables/reproduction.md", caption="../report/reproduction.rst",
                            category="Reproduction", labels={"table": "this run vs the committed reference"}),
        speedup=report(f"{OUT}/plots/speedup.png", caption="../report/speedup.rst", category="Results",
                       labels={"plot": "speedup"}),
        tau=report(f"{OUT}/plots/tau.png", caption="../report/tau.rst", category="Results", labels={"plot": "τ"}),
    params:
        reproduce=section("reproduce"),
    resources:
        **resources_of("report"),
    log:
        f"{OUT}/logs/report.log",
    shell:
        "deepspec report --config {EFFECTIVE} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"
