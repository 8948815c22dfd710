import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from factory import REPO

from brainmri.core.errors import BrainMRIError
from brainmri.deploy.predict import predict


def test_predict_uses_the_training_preprocessing(small_run, tmp_path):
    """Original source files in, the same probabilities out as evaluation computed from the ingested images."""
    p, *_ = small_run
    name = "vgg16-aug"
    evaluated = pd.read_csv(p.model_file("eval", name, "predictions"), keep_default_na=False)
    sources = [str(p.resolve(p.ingest.source) / s) for s in evaluated["source_path"]]
    out = predict(p.model_file("export", name, "onnx"), sources, tmp_path / "pred.csv")
    assert (out["error"] == "").all()
    assert np.allclose(out["probability"].astype(float), evaluated["probability"], atol=1e-4)
    assert list(out["label"]) == list(evaluated["predicted"])
    saved = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert list(saved.columns) == ["path", "probability", "label", "error"] and len(saved) == len(evaluated)


def test_folders_bad_files_json_and_no_tensorflow(small_run, tmp_path):
    p, *_ = small_run
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    src = sorted((p.resolve(p.ingest.source) / "yes").iterdir())[:3]
    for f in src:
        (folder / "sub" / f.name).write_bytes(f.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")
    model = p.model_file("export", "vgg16-aug", "onnx")
    code = (
        "import sys; from brainmri.deploy.predict import predict; "
        f"f = predict({str(model)!r}, [{str(folder)!r}], {str(tmp_path / 'o.json')!r}); "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'; print(len(f))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "5"  # 3 images + 2 unreadable files; the hidden file is skipped
    import json

    rows = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads((tmp_path / "o.json").read_text())["predictions"]}
    assert "empty file" in rows["empty.jpg"]["error"] and "not a recognised image" in rows["notes.txt"]["error"]
    assert all(rows[f.name]["error"] == "" and 0 <= rows[f.name]["probability"] <= 1 for f in src)


def test_predict_refuses_anything_but_onnx(small_run, tmp_path):
    p, *_ = small_run
    with pytest.raises(BrainMRIError, match="must be an exported .onnx file"):
        predict(p.model_file("models", "vgg16-aug", "model"), [str(tmp_path)], tmp_path / "x.csv")
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"this is not a protobuf")
    with pytest.raises(BrainMRIError, match="not a loadable ONNX model"):
        predict(fake, [str(tmp_path)], tmp_path / "x.csv")


def test_predict_on_openvino_matches_onnx_runtime_and_bf16_needs_a_cpu_that_has_it(small_run, tmp_path, monkeypatch, caplog):
    """OpenVINO fp32 runs the same file to within 1e-4 of ONNX Runtime, with the same labels; bf16 on a CPU without
    bf16 instructions is one sentence, not a quiet fp32 run under a bf16 name."""
    from brainmri.deploy import runtimes
    from flows.cli import build_parser

    p, *_ = small_run
    images = sorted(p.path("ingest_images").iterdir())[:12]  # real decoded images, not random inputs
    model = p.model_file("export", "vgg16-aug", "onnx")
    ort = predict(model, [str(f) for f in images], tmp_path / "ort.csv")
    ov = predict(model, [str(f) for f in images], tmp_path / "ov.json", runtime="openvino")
    assert np.abs(ov["probability"].astype(float) - ort["probability"].astype(float)).max() <= 1e-4
    assert list(ov["label"]) == list(ort["label"])
    choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions if a.dest == "runtime").choices
    assert tuple(choices) == runtimes.RUNTIMES  # the CLI offers exactly what brainmri.deploy.runtimes runs
    monkeypatch.setattr(runtimes, "bf16_capable", lambda: False)  # a CPU without bf16 instructions
    import logging

    import onnx

    from brainmri.core import machine

    int8 = onnx.load(p.model_file("export", "vgg16-aug", "onnx_int8"))  # 8-bit weights chosen on a VNNI CPU...
    assert {q.key for q in int8.metadata_props} >= {"int8_reduce_range", "int8_chosen_on_cpu_flags"}
    props = {q.key: q.value for q in int8.metadata_props} | {"int8_reduce_range": "False"}
    onnx.helper.set_model_props(int8, props)
    onnx.save(int8, tmp_path / "eight_bit.onnx")
    monkeypatch.setattr(machine, "cpu_flags", lambda: ["avx2"])  # ...meet a CPU without VNNI: predict warns
    monkeypatch.setattr(logging.getLogger("brainmri"), "propagate", True)  # an in-process CLI run may have turned it off
    with caplog.at_level(logging.WARNING, logger="brainmri"):
        predict(tmp_path / "eight_bit.onnx", [str(images[0])], tmp_path / "eight.csv")
    assert "this CPU has no VNNI" in caplog.text
    with pytest.raises(BrainMRIError, match="openvino-bf16: this CPU has no bf16 instructions"):
        predict(model, [str(images[0])], tmp_path / "bf16.csv", runtime="openvino-bf16")
    assert not (tmp_path / "bf16.csv").exists()


def test_the_deploy_layer_never_imports_tensorflow_nor_the_learning_or_export_code():
    """brainmri.deploy is what users install to predict: none of its modules names TensorFlow, Keras, tf2onnx,
    brainmri.learn or brainmri.export in an import (inside functions too), and importing all of them in a fresh process
    loads none of those."""
    import ast

    banned = ("tensorflow", "keras", "tf2onnx", "brainmri.learn", "brainmri.export")

    def is_banned(module: str) -> bool:
        return any(module == b or module.startswith(b + ".") for b in banned)

    modules = sorted(f.stem for f in (REPO / "brainmri" / "deploy").glob("*.py") if f.stem != "__init__")
    for stem in ["__init__", *modules]:
        tree = ast.parse((REPO / "brainmri" / "deploy" / f"{stem}.py").read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if is_banned(n)], f"brainmri/deploy/{stem}.py imports {names}"
    code = (
        "import importlib, sys; "
        f"[importlib.import_module('brainmri.deploy.' + m) for m in {modules!r}]; "
        f"print(sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in {banned!r})))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert {"onnxrt", "predict", "runtimes", "scoring"} <= set(modules)
