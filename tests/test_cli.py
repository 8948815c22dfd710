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
