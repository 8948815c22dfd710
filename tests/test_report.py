import re


def test_report_has_every_model_table_plots_and_self_contained_html(small_run):
    p, trained, evaluated, result = small_run
    folder = p.path("report")
    md = (folder / "report.md").read_text()
    for name in p.models:
        assert f"| {name} |" in md
    assert "Test acc % [95% CI]" in md and "AUC [95% CI]" in md and "Sensitivity" in md and "Specificity" in md
    assert f"test split of {evaluated['vgg16-aug']['n_test']} images" in md
    assert "random initialisation" in md  # the weights used are stated
    for png in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (folder / png).stat().st_size > 2000
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and 'src="http' not in html and html.count("<table") == 2
    assert "CPU latency" in md and "ORT fp32 / compiled Keras" in md and "int8 / fp32" in md
    assert [r["Model"] for r in result["table"]] == list(p.models)
