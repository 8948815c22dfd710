"""dvc.yaml's code deps are exactly the import graph's: no stage can miss a file it imports, or list one it does not."""

from factory import REPO

from brainmri.config import read_yaml
from brainmri.provenance import codedeps


def test_dvc_yaml_lists_exactly_the_files_each_stage_imports():
    dvc = read_yaml(REPO / "dvc.yaml")
    expected, declared = codedeps.expected_deps(REPO, dvc), codedeps.declared_deps(dvc)
    assert set(expected) == {name for name, stage in dvc["stages"].items() if codedeps.stage_module(codedeps._stage_body(stage)["cmd"])}
    for stage, deps in expected.items():
        assert declared[stage] == deps, f"{stage}: run `brainmri deps --write` (dvc.yaml differs from the import graph)"


def test_stage_code_imports_no_orchestration():
    for stage, deps in codedeps.expected_deps(REPO, read_yaml(REPO / "dvc.yaml")).items():
        assert not [d for d in deps if "flows/" in d or d.endswith("cli.py")], stage
        for dep in deps:
            source = (REPO / dep.removeprefix(codedeps.CODE_PREFIX)).read_text()
            assert "import prefect" not in source and "from prefect" not in source, dep


def test_the_closure_follows_imports_inside_functions_and_package_inits(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "brainmri").mkdir()
    (tmp_path / "tasks/__init__.py").write_text("")
    (tmp_path / "brainmri/__init__.py").write_text("")
    (tmp_path / "tasks/a.py").write_text("import numpy\nfrom brainmri import b\n\ndef f():\n    from brainmri.c import x\n")
    (tmp_path / "brainmri/b.py").write_text("from . import d\n")
    (tmp_path / "brainmri/c.py").write_text("x = 1\n")
    (tmp_path / "brainmri/d.py").write_text("")
    (tmp_path / "brainmri/unused.py").write_text("")
    assert codedeps.closure(tmp_path, "tasks.a") == [
        "brainmri/__init__.py",
        "brainmri/b.py",
        "brainmri/c.py",
        "brainmri/d.py",
        "tasks/__init__.py",
        "tasks/a.py",
    ]


def test_write_rewrites_only_code_deps_and_keeps_comments(tmp_path):
    import shutil

    for pkg in ("brainmri", "tasks"):
        shutil.copytree(REPO / pkg, tmp_path / pkg)
    for name in (codedeps.LOCK_FILE, codedeps.VERSIONS_FILE, "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    text = (REPO / "dvc.yaml").read_text()
    broken = text.replace("      - ${paths.code}brainmri/report/plots.py\n", "", 1)
    assert broken != text
    (tmp_path / "dvc.yaml").write_text(broken)
    assert codedeps.write(tmp_path, tmp_path / "dvc.yaml") == ["evaluate"]  # the one stage whose list lost a file
    assert (tmp_path / "dvc.yaml").read_text() == text
    assert (tmp_path / codedeps.VERSIONS_FILE).read_text() == (REPO / codedeps.VERSIONS_FILE).read_text()


def test_versions_yaml_holds_the_locked_versions_each_stage_imports_and_this_environment_has_them():
    from importlib import metadata

    dvc = read_yaml(REPO / "dvc.yaml")
    pins = codedeps.lock_pins(REPO / codedeps.LOCK_FILE)
    want = codedeps.stage_versions(REPO, dvc, pins)
    assert read_yaml(REPO / codedeps.VERSIONS_FILE) == want, "run `brainmri deps --write`"
    assert {"tensorflow-cpu", "keras"} <= set(want["train"]) and "tensorflow-cpu" not in want["ingest"]
    assert "onnxruntime" in want["export"] and "onnxruntime" not in want["train"]
    assert codedeps.declared_version_params(dvc) == {s: [[s]] for s in want}
    for dist, version in {d: v for stage in want.values() for d, v in stage.items()}.items():
        assert metadata.version(dist) == version, f"{dist}: installed {metadata.version(dist)}, locked {version}"


def test_top_level_plots_overlay_every_models_roc_and_name_only_figures():
    dvc = read_yaml(REPO / "dvc.yaml")
    assert codedeps.declared_plots(dvc) == codedeps.top_plots(REPO), "run `brainmri deps --write`"
    overlay = dvc["plots"][0]["test ROC, every model"]["y"]
    params = read_yaml(REPO / "params.yaml")
    assert len(overlay) == len(params["models"]) and all(path.endswith("roc.csv") for path in overlay)
    assert all(str(p).endswith(".png") for p in dvc["plots"][1:])
