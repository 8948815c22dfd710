import subprocess

from factory import make_project


def brainmri(cwd, *args):
    return subprocess.run(["brainmri", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_missing_dataset_is_one_clear_sentence(tmp_path):
    make_project(tmp_path)
    res = brainmri(tmp_path, "ingest")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "dataset not found at" in res.stderr and "ingest.source" in res.stderr


def test_bad_params_and_bad_option(tmp_path):
    make_project(tmp_path, {"split": {"tset": 0.1}})
    res = brainmri(tmp_path, "split")
    assert res.returncode == 2 and "unknown key 'split.tset' (did you mean 'test'?)" in res.stderr
    assert "Traceback" not in res.stderr
    res = brainmri(tmp_path, "ingest", "--frobnicate")
    assert res.returncode == 2 and "unrecognized arguments: --frobnicate" in res.stderr


def test_every_subcommand_has_help(tmp_path):
    for cmd in (
        "ingest",
        "split",
        "augment",
        "train",
        "evaluate",
        "export",
        "benchmark",
        "saliency",
        "report",
        "synthesize",
        "predict",
        "run",
        "serve",
        "lineage",
        "params",
    ):
        res = brainmri(tmp_path, cmd, "--help")
        assert res.returncode == 0 and "usage: brainmri" in res.stdout, cmd


def test_the_stage_subcommands_are_dvc_yamls_stages_with_their_desc(tmp_path, capsys):
    """dvc.yaml is the one list of stages: each is a subcommand, its help the stage's desc, and a foreach stage takes
    its item (a model or a backbone); the code's own dvc.yaml, wherever --params points."""
    import pytest
    from factory import REPO

    from brainmri.config import read_yaml
    from flows.cli import build_parser

    stages = read_yaml(REPO / "dvc.yaml")["stages"]
    assert len(stages) >= 14
    for name, spec in stages.items():
        item = {"${models}": "model", "${backbones}": "backbone"}.get(spec.get("foreach"))
        args = build_parser().parse_args(["--params", str(tmp_path / "params.yaml"), name, *(["x"] if item else [])])
        assert args.command == name and args.item == item and (item is None or getattr(args, item) == "x")
        with pytest.raises(SystemExit):
            build_parser().parse_args([name, "--help"])
        assert " ".join(spec.get("do", spec)["desc"].split()) in " ".join(capsys.readouterr().out.split())
