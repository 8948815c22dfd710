"""report stage: one Markdown and one self-contained HTML report of every model, with its plots.

Each section is built in brainmri/report/ by a module named for it; a section reads the files only it needs, and draws
its own figures into the report folder."""

from __future__ import annotations

import json

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_text
from brainmri.core.progress import summary
from brainmri.report.calibration import calibration_section
from brainmri.report.data_summary import data_summary_section
from brainmri.report.dataset import dataset_section
from brainmri.report.ensemble import ensemble_section
from brainmri.report.external import external_section
from brainmri.report.html import html_page
from brainmri.report.latency import latency_section
from brainmri.report.lineage import lineage_section
from brainmri.report.markdown import markdown_page, md_table
from brainmri.report.model_plots import PLOTS_SECTION, draw_model_plots
from brainmri.report.results import intro, paired_table, results_section, results_table
from brainmri.report.saliency import saliency_section
from brainmri.report.samples import sample_grid, samples_section
from brainmri.report.tables import TABLES


def report(p: Params) -> dict:
    """Run the stage: write report.md, report.html and the plots; return the headline table as records."""
    table, trained, evaluated = results_table(p)
    paired, best_val = paired_table(p, trained)
    ingest = json.loads(p.path("ingest_report").read_text())
    split = json.loads(p.path("split_report").read_text())
    n_test = next(iter(evaluated.values()))["n_test"] if evaluated else 0
    samples = sample_grid(p, evaluated, trained)

    with atomic_dir(p.path("report")) as out:
        draw_model_plots(p, evaluated, out)
        md = [
            *intro(p, n_test, bool(ingest.get("synthetic"))),
            *data_summary_section(p),
            *results_section(p, table, trained, paired, best_val),
            *dataset_section(p, ingest, split, out),
            *samples_section(samples, out),
            *saliency_section(p, samples.model, trained[samples.model]["threshold"], out),
            *lineage_section(p),
            *PLOTS_SECTION,
            *external_section(p, evaluated),
            *ensemble_section(p),
            *calibration_section(p, trained, evaluated, out),
        ]
        latency, latency_md = latency_section(p, out)
        md += latency_md

        write_text(out / TABLES["results"], md_table(table))
        write_text(out / TABLES["paired"], md_table(paired))
        if latency is not None:
            write_text(out / TABLES["latency"], md_table(latency))
        write_text(out / "report.md", markdown_page(md))
        write_text(out / "report.html", html_page(md, out))
    summary("report", f"{len(table)} models -> {p.path('report') / 'report.md'}")
    return {"table": table.to_dict(orient="records"), "paired": paired.to_dict(orient="records")}
