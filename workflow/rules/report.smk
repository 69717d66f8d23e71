rule report:
    input:
        expand(f"{OUT}/eval/{{method}}/{{task}}/metrics.json", method=METHODS, task=TASKS),
        [f"{OUT}/drafters/{name}/metrics.json" for name in DRAFTERS],
    output:
        report=f"{OUT}/report.md",
        table_md=f"{OUT}/tables/summary.md",
        table_csv=f"{OUT}/tables/summary.csv",
        speedup=f"{OUT}/plots/speedup.png",
        tau=f"{OUT}/plots/tau.png",
    log:
        f"{OUT}/logs/report.log",
    shell:
        "deepspec report --config {EFFECTIVE} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"
