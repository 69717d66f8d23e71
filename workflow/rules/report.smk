# Tables, plots and report.md from every metrics file; the reproduction section compares them with the
# committed reference (results/reference/<experiment>). Items marked report() also make up Snakemake's
# HTML report: `snakemake --report results/<experiment>/report.html`.
rule report:
    input:
        expand(str(layout.eval_dir(CFG, "{method}", "{task}") / "metrics.json"), method=METHODS, task=TASKS),
        [str(layout.drafter_dir(CFG, name) / "metrics.json") for name in DRAFTERS],
        deployed_metrics(),
    output:
        report=str(layout.report_file(CFG)),
        table_md=str(layout.tables_dir(CFG) / "summary.md"),
        table_csv=report(str(layout.tables_dir(CFG) / "summary.csv"), caption="../report/summary.rst", category="Results",
                         labels={"table": "τ and speedup per method × task"}),
        reproduction=report(str(layout.tables_dir(CFG) / "reproduction.md"), caption="../report/reproduction.rst",
                            category="Reproduction", labels={"table": "this run vs the committed reference"}),
        speedup=report(str(layout.plots_dir(CFG) / "speedup.png"), caption="../report/speedup.rst", category="Results",
                       labels={"plot": "speedup"}),
        tau=report(str(layout.plots_dir(CFG) / "tau.png"), caption="../report/tau.rst", category="Results", labels={"plot": "τ"}),
    params:
        reproduce=section("reproduce"),
    resources:
        **resources_of("report"),
    log:
        str(layout.log_file(CFG, "report")),
    shell:
        "deepspec report --config {EFFECTIVE} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"
