"""The report's Markdown tables by key: the report stage writes them, the flow publishes them as Prefect artifacts and
`brainmri run` prints the results table. A module of its own, so that neither the flow nor the CLI imports the report
stage (pandas, scikit-learn, matplotlib: about 2 s) just to find three file names."""

TABLES = {"results": "results_table.md", "paired": "paired_auc_table.md", "latency": "latency_table.md"}
