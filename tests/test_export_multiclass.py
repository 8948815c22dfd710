"""N classes through export, benchmark's checks and predict (issue 31): an N-class model exports to one (batch, K)
probability output with its class names in the metadata, parity holds for every class, the int8 and runtime checks
compare arg-max labels, and predict writes one probability column per class plus the arg-max label, refusing hostile
N-class metadata and outputs by name. Binary behaviour is pinned by the other export, predict and benchmark tests."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest
from factory import encode, make_project, materialise_weights, tiny_training

from brainmri.config import load_params
from brainmri.core.errors import BrainMRIError
from brainmri.deploy import metadata
from brainmri.deploy.onnxrt import probabilities, session
from brainmri.deploy.predict import predict
from flows.cli import main

CLASSES3 = ["glioma", "meningioma", "notumor"]  # in ingest.classes order: the label indices 0, 1, 2
CLASSES4 = ["glioma", "meningioma", "notumor", "pituitary"]
TUMOUR = {"glioma": True, "meningioma": True, "notumor": False, "pituitary": True}  # which phantoms carry a mass


def nclass_project(root, classes: list[str]):
    """A phantom project with N classes and one small CNN model (random weights, tiny input), ingested and split."""
    from brainmri.intake.phantoms import generate
    from tasks.ingest import ingest
    from tasks.split import split

    over = {**tiny_training(), "ingest": {"source": "data/raw/synthetic", "max_side": 96, "classes": classes, "positive_class": ""}}
    make_project(root, over, replace={"models": {"cnn": {"backbone": "smallcnn", "augment": False}}})
    p = load_params(root / "params.yaml")
    generate(p.resolve("data/raw/synthetic"), {c: TUMOUR[c] for c in classes}, 12, 3, 64, 96, 0.0)
    ingest(p)
    split(p)
    return p


def save_untrained(p, name: str = "cnn", seed: int = 5) -> None:
    """What train leaves for export: the N-class model (a softmax head over the classes) and train.json."""
    import keras

    from brainmri.core.files import write_json
    from brainmri.learn.models import build_network, save_model

    keras.utils.set_random_seed(seed)
    net = build_network(p, p.models[name].backbone, seed)
    p.model_file("models", name, "model").parent.mkdir(parents=True, exist_ok=True)
    save_model(net.full, p.model_file("models", name, "model"))
    trained = {"threshold": None, "threshold_rule": "argmax", "classes": list(p.ingest.label_names), "weights": {"description": "random"}}
    write_json(p.model_file("models", name, "train_metrics"), trained)


@pytest.fixture(scope="module")
def exported3(tmp_path_factory):
    """Three classes: the export stage run on an untrained N-class model."""
    from tasks.export import export

    p = nclass_project(tmp_path_factory.mktemp("n3"), CLASSES3)
    materialise_weights(p)
    save_untrained(p)
    return p, export(p, "cnn")


def onnx_output_dims(path) -> list:
    dims = onnx.load(path).graph.output[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


# --- export ----------------------------------------------------------------------------------------------------


def test_an_n_class_model_exports_k_probabilities_with_its_class_names(exported3):
    from brainmri.intake.parts import split_part
    from brainmri.intake.preprocess import load_batch
    from brainmri.learn.models import load_model

    p, record = exported3
    fp32 = p.model_file("export", "cnn", "onnx")
    assert onnx_output_dims(fp32) == ["batch", 3]
    props = {x.key: x.value for x in onnx.load(fp32).metadata_props}
    assert props["classes"] == json.dumps(CLASSES3) and not {"threshold", "positive_class", "negative_class"} & set(props)
    assert metadata.read(props).classes == tuple(CLASSES3)
    assert record["metadata"]["classes"] == CLASSES3

    x = load_batch(split_part(p, "val").paths, 32)
    p_onnx = probabilities(session(fp32), x)
    p_keras = np.asarray(load_model(p.model_file("models", "cnn", "model")).predict(x, verbose=0))
    assert p_onnx.shape == p_keras.shape == (len(x), 3) and len(x) >= 3
    assert np.allclose(p_onnx, p_keras, atol=1e-5) and np.allclose(p_onnx.sum(axis=1), 1, atol=1e-5)
    parity = record["parity"]
    assert set(parity["max_abs_diff_per_class"]) == set(CLASSES3) and parity["labels_identical"]
    assert parity["max_abs_diff"] == max(parity["max_abs_diff_per_class"].values()) <= p.export.parity_tolerance

    i8 = record["int8"]
    p_int8 = probabilities(session(p.model_file("export", "cnn", "onnx_int8")), x)
    assert p_int8.shape == (len(x), 3)
    assert i8["labels_changed"] == int(np.sum(np.argmax(p_int8, 1) != np.argmax(p_onnx, 1)))  # arg-max labels compared
    assert i8["max_abs_prob_change"] == round(float(np.max(np.abs(p_int8 - p_onnx))), 4)  # over every class
    assert sum(i8["calibration_classes"].values()) == 8 and set(i8["calibration_classes"]) == set(CLASSES3)
    scores = json.loads(p.model_file("export", "cnn", "scores").read_text())
    assert scores["parity_max_abs_diff"] == parity["max_abs_diff"]


def test_n_class_parity_fails_on_any_class_and_on_a_changed_label():
    from brainmri.export.convert import ExportError
    from brainmri.export.record import check_parity_classes

    keras = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    ok = check_parity_classes("m", keras, keras + [[0, 0, 1e-6], [0, 0, 0]], CLASSES3, 1e-4)
    assert ok["max_abs_diff_per_class"] == {"glioma": 0.0, "meningioma": 0.0, "notumor": pytest.approx(1e-6)}
    with pytest.raises(ExportError, match="over 3 classes = 1.00e-03"):
        check_parity_classes("m", keras, keras + [[0, 1e-3, 0], [0, 0, 0]], CLASSES3, 1e-4)  # the second class only
    tied = np.array([[0.4, 0.4, 0.2], [0.1, 0.2, 0.7]])
    with pytest.raises(ExportError, match="arg-max labels identical: False"):
        check_parity_classes("m", tied + [[-1e-6, 1e-6, 0], [0, 0, 0]], tied + [[1e-6, -1e-6, 0], [0, 0, 0]], CLASSES3, 1e-4)


def test_n_class_int8_record_compares_arg_max_labels():
    from brainmri.export.record import int8_record, label_metrics

    y = np.array([0, 1, 2, 2])
    fp32 = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    int8 = fp32 + [[0, 0, 0], [0, 0, 0], [0, 0, 0], [0.06, 0, -0.06]]  # the last image's label goes from 2 to 0
    assert label_metrics(y, fp32, None) == {"accuracy": 1.0, "auc": 1.0}
    rec = int8_record(y, fp32, int8, None, {"chosen": {}}, 8, {})
    assert rec["accuracy_fp32"] == 1.0 and rec["accuracy_int8"] == 0.75 and rec["accuracy_change_points"] == -25.0
    assert rec["labels_changed"] == 1 and rec["max_abs_prob_change"] == 0.06
    assert np.isnan(label_metrics(np.array([0, 0, 1, 1]), fp32, None)["auc"])  # a class missing from y: no macro AUC


def test_the_int8_calibration_sample_is_stratified_over_n_classes():
    from brainmri.export.quantize import int8_calibration_sample
    from brainmri.intake.parts import Part

    y = np.repeat([0, 1, 2], [10, 30, 20])
    chosen = int8_calibration_sample(Part(pd.DataFrame({"source_path": [f"{i:03d}" for i in range(60)]}), [], y), 12, seed=1)
    assert np.bincount(y[chosen], minlength=3).tolist() == [2, 6, 4]


def test_four_classes_convert_to_a_four_column_output_matching_keras(tmp_path):
    """The conversion alone, at four classes: the ONNX model's (n, 4) probabilities are Keras's."""
    from brainmri.export.convert import convert
    from brainmri.export.record import metadata_props, onnx_metadata_classes

    over = {**tiny_training(), "ingest": {"classes": CLASSES4, "positive_class": ""}}
    make_project(tmp_path, over, replace={"models": {"cnn": {"backbone": "smallcnn", "augment": False}}})
    p = load_params(tmp_path / "params.yaml")
    materialise_weights(p)
    save_untrained(p, seed=9)
    x = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    proto, p_keras = convert(p.model_file("models", "cnn", "model"), 32, p.export.opset, x)
    props = metadata_props(onnx_metadata_classes(p, "cnn", 32, {"weights": {"description": "random"}}))
    assert props["classes"] == json.dumps(CLASSES4) and "threshold" not in props
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, tmp_path / "m.onnx")
    assert onnx_output_dims(tmp_path / "m.onnx") == ["batch", 4] and p_keras.shape == (5, 4)
    assert np.allclose(probabilities(session(tmp_path / "m.onnx"), x), p_keras, atol=1e-5)
    assert metadata.read(props).classes == tuple(CLASSES4)


# --- benchmark's checks ------------------------------------------------------------------------------------------


def test_benchmark_checks_n_class_runtimes_by_arg_max_and_every_class(exported3):
    from brainmri.bench.fidelity import check_on_val
    from brainmri.deploy.onnxrt import INPUT
    from brainmri.intake.parts import split_part

    p, _ = exported3
    sess = session(p.model_file("export", "cnn", "onnx"))
    n_val = len(split_part(p, "val").y)

    def fp32(x):
        return sess.run(None, {INPUT: x})[0]

    def moved(x):  # every probability 0.01 off, no label changed
        out = fp32(x)
        return out + np.where(np.arange(3) == np.argmax(out, 1)[:, None], 0.01, -0.005)

    calls = []

    def relabelled(x):  # the first val image given another class
        out = fp32(x).copy()
        if not calls:
            out[0] = np.roll(np.eye(3)[np.argmax(out[0])], 1)
        calls.append(len(x))
        return out

    out = check_on_val(p, "cnn", {"onnxruntime_fp32": fp32, "onnxruntime_int8": moved, "openvino_int8": relabelled}, 32)
    assert out["onnxruntime_fp32"]["max_abs_prob_diff"] == 0 and out["onnxruntime_fp32"]["admissible"]
    assert out["onnxruntime_int8"]["max_abs_prob_diff"] == pytest.approx(0.01) and out["onnxruntime_int8"]["labels_changed"] == 0
    assert out["onnxruntime_int8"]["admissible"] and out["onnxruntime_int8"]["accuracy_change_points"] == 0
    relabel = out["openvino_int8"]
    assert relabel["labels_changed"] == 1 and relabel["n_val"] == n_val == sum(calls)
    assert abs(relabel["accuracy_change_points"]) == round(100 / n_val, 2) and not relabel["admissible"]  # one label of under 100


def test_the_benchmark_stage_runs_on_an_n_class_model(exported3):
    from tasks.benchmark import benchmark

    p, _ = exported3
    out = benchmark(p, "cnn")
    fidelity = out["fidelity_on_val"]
    assert fidelity["onnxruntime_fp32"]["admissible"] and fidelity["onnxruntime_fp32"]["max_abs_prob_diff"] == 0
    assert set(fidelity) >= {"onnxruntime_int8", "openvino_fp32", "openvino_int8"}
    assert {r["runtime"] for r in out["rows"]} >= {"keras_compiled", "onnxruntime_fp32"}


# --- predict -----------------------------------------------------------------------------------------------------


def test_predict_writes_a_column_per_class_and_the_arg_max_label(exported3, tmp_path):
    from brainmri.intake.parts import split_part
    from brainmri.intake.preprocess import load_batch

    p, _ = exported3
    val = split_part(p, "val")
    sources = [str(p.resolve(p.ingest.source) / s) for s in val.frame["source_path"]]
    model = p.model_file("export", "cnn", "onnx")
    frame = predict(model, sources, tmp_path / "o.csv")
    expected = probabilities(session(model), load_batch(val.paths, 32))  # evaluate's way: the ingested images
    columns = ["path", "prob_glioma", "prob_meningioma", "prob_notumor", "label", "error"]
    saved = pd.read_csv(tmp_path / "o.csv", keep_default_na=False)
    assert list(frame.columns) == list(saved.columns) == columns and (saved["error"] == "").all()
    probs = saved[columns[1:4]].to_numpy(float)
    assert np.allclose(probs, expected, atol=1e-4) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert list(saved["label"]) == [CLASSES3[i] for i in np.argmax(expected, axis=1)]

    predict(model, sources, tmp_path / "o.json")
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["classes"] == CLASSES3 and "threshold" not in doc
    rows = doc["predictions"]
    assert [list(r) for r in rows] == [["path", "probabilities", "label", "error"]] * len(rows)
    assert [list(r["probabilities"]) for r in rows] == [CLASSES3] * len(rows)
    assert np.allclose([list(r["probabilities"].values()) for r in rows], probs, atol=1e-6)
    assert [r["label"] for r in rows] == list(saved["label"])


def classes_onnx(path, k: int = 3, meta: dict | None = None, out_dims=None, head: str = "Softmax", size: int = 32):
    """A brainmri-style N-class ONNX model in a few bytes: the image's mean brightness m (0..1) scored against K
    evenly spaced centres c_k = k / (K - 1), logits -8 (m - c_k)^2 written as the linear 16 c_k m - 8 c_k^2 (the m^2
    term is every class's), then `head` (Softmax: the nearest centre's class wins; Sigmoid: rows no longer sum to 1;
    Identity: not probabilities)."""
    from onnx import TensorProto, helper, numpy_helper

    centres = np.arange(k) / (k - 1)
    inits = [
        numpy_helper.from_array((16 * centres / 255)[None, :].astype(np.float32), "w"),
        numpy_helper.from_array((-8 * centres**2).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["logits"]),
        helper.make_node(head, ["logits"], ["probability"], **({"axis": 1} if head == "Softmax" else {})),
    ]
    graph = helper.make_graph(
        nodes,
        "classes",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, out_dims or ["batch", k])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    names = [f"c{i}" for i in range(k)]
    props = {"input_size": str(size), "max_side": "512", "max_pixels": "40000000", "classes": json.dumps(names), **(meta or {})}
    helper.set_model_props(proto, {key: v for key, v in props.items() if v is not None})
    onnx.save(proto, path)
    return path


def grey_images(folder, k: int):
    """One flat grey PNG per class centre (brightness c_k), named by the class the model above must give it."""
    folder.mkdir()
    for i in range(k):
        value = round(255 * i / (k - 1))
        (folder / f"{i}.png").write_bytes(encode(np.full((48, 48), value, np.uint8), "PNG"))  # square: no padding
    return folder


@pytest.mark.parametrize("k", [3, 4])
def test_predict_labels_each_image_with_its_arg_max_class_in_csv_and_json(tmp_path, k):
    folder = grey_images(tmp_path / "in", k)
    (folder / "x_broken.png").write_bytes(b"not an image")
    model = classes_onnx(tmp_path / "m.onnx", k)
    frame = predict(model, [str(folder)], tmp_path / "o.csv")
    names = [f"c{i}" for i in range(k)]
    saved = pd.read_csv(tmp_path / "o.csv", keep_default_na=False)
    assert list(saved.columns) == ["path", *[f"prob_{c}" for c in names], "label", "error"] == list(frame.columns)
    assert list(saved["label"]) == [*names, ""]  # the image at centre c_i is class i; the broken file has none
    probs = saved.iloc[:k, 1 : k + 1].to_numpy(float)
    assert np.all(np.argmax(probs, axis=1) == np.arange(k)) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert "not a recognised image" in saved["error"].iloc[k] and (saved.iloc[k, 1 : k + 1] == "").all()
    predict(model, [str(folder)], tmp_path / "o.json")
    rows = json.loads((tmp_path / "o.json").read_text())["predictions"]
    assert [r["label"] for r in rows] == [*names, None] and rows[k]["probabilities"] is None
    assert np.allclose([[r["probabilities"][c] for c in names] for r in rows[:k]], probs, atol=1e-6)


def test_predict_on_openvino_gives_the_same_n_class_rows(tmp_path):
    folder = grey_images(tmp_path / "in", 4)
    model = classes_onnx(tmp_path / "m.onnx", 4)
    ort = predict(model, [str(folder)], tmp_path / "ort.csv")
    ov = predict(model, [str(folder)], tmp_path / "ov.csv", runtime="openvino")
    assert list(ov["label"]) == list(ort["label"]) == ["c0", "c1", "c2", "c3"]
    cols = [f"prob_c{i}" for i in range(4)]
    assert np.allclose(ov[cols].to_numpy(float), ort[cols].to_numpy(float), atol=1e-5)


def test_n_class_labels_in_csv_cannot_run_as_formulas(tmp_path):
    folder = grey_images(tmp_path / "in", 3)
    model = classes_onnx(tmp_path / "m.onnx", meta={"classes": json.dumps(["=1+1", "-b", "c"])})
    predict(model, [str(folder)], tmp_path / "o.csv")
    saved = pd.read_csv(tmp_path / "o.csv", keep_default_na=False)
    assert list(saved["label"]) == ["'=1+1", "'-b", "c"] and "prob_=1+1" in saved.columns


# --- hostile N-class metadata and outputs ------------------------------------------------------------------------

HOSTILE = {
    "a million names": ({"classes": json.dumps([f"c{i}" for i in range(10**6)])}, "characters) is longer than 4096 characters"),
    "not JSON": ({"classes": "a,b,c"}, "classes='a,b,c' is not a JSON list of class names"),
    "nested a thousand deep": ({"classes": "[" * 1500 + "]" * 1500}, "is not a JSON list of class names"),
    "an object": ({"classes": '{"a": 1, "b": 2, "c": 3}'}, "is a JSON dict; an N-class model has 3 to 50"),
    "two names": ({"classes": '["a", "b"]'}, "is a list of 2 names; an N-class model has 3 to 50"),
    "51 names": ({"classes": json.dumps([f"c{i}" for i in range(51)])}, "is a list of 51 names"),
    "numbers": ({"classes": "[1, 2, 3]"}, "holds 1, which is not a class name"),
    "null name": ({"classes": '["a", null, "c"]'}, "holds null, which is not a class name"),
    "empty name": ({"classes": '["a", "", "c"]'}, "holds '', which is not a class name"),
    "long name": ({"classes": json.dumps(["a", "b" * 101, "c"])}, "which is not a class name (1-100 printable characters)"),
    "newline in a name": ({"classes": json.dumps(["a", "b\nc", "d"])}, "which is not a class name"),
    "duplicate names": ({"classes": '["a", "b", "a"]'}, "names a class twice"),
    "loose JSON": ({"classes": '["a","b","c"]'}, "is not written as export writes it"),
    "classes and a threshold": ({"threshold": "0.5"}, "metadata has classes and threshold: an N-class model has none of"),
    "classes and two names": ({"positive_class": "yes", "negative_class": "no"}, "has classes and positive_class, negative_class"),
    "no input size": ({"input_size": None}, "metadata lacks input_size"),
}
NAMED = "classes"  # every message names the key (the missing input_size its own)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_n_class_metadata_is_refused_in_one_sentence_naming_the_key(tmp_path, case, capsys):
    meta, message = HOSTILE[case]
    folder = grey_images(tmp_path / "in", 3)
    model = classes_onnx(tmp_path / "m.onnx", meta=meta)
    code = main(["predict", "--model", str(model), "--out", str(tmp_path / "o.csv"), str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and len(err) < 600, err
    assert NAMED in err or case == "no input size", err
    assert not (tmp_path / "o.csv").exists()


OUTPUTS = {
    "fixed width against more classes": (
        {"meta": {"classes": json.dumps(["a", "b", "c", "d"])}},
        "output shape ['batch', '3'] does not match the 4 classes of its metadata",
    ),
    "fewer columns than classes": (
        {"k": 2, "meta": {"classes": json.dumps(["a", "b", "c"])}},
        "output shape ['batch', '2'] does not match the 3 classes",
    ),
    "rows not summing to 1": ({"head": "Sigmoid"}, "class probabilities sum to"),
    "not probabilities": ({"head": "Identity"}, "model output is not a probability in 0..1"),
}


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_an_n_class_output_that_does_not_fit_its_classes_is_refused_by_name(tmp_path, case):
    kw, message = OUTPUTS[case]
    folder = grey_images(tmp_path / "in", 3)
    model = classes_onnx(tmp_path / "m.onnx", **kw)
    with pytest.raises(BrainMRIError) as info:
        predict(model, [str(folder)], tmp_path / "o.csv")
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1, str(info.value)
    assert not (tmp_path / "o.csv").exists()


def test_stages_vet_n_class_models_by_their_class_count(tmp_path):
    """A stage's session() probes the file in a bounded worker: an N-class model passes, one whose output does not
    hold a value per class of its metadata is refused there."""
    from brainmri.deploy.sandbox import ModelRunError

    ok = classes_onnx(tmp_path / "ok.onnx", 4)
    assert probabilities(session(ok), np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 4)
    assert probabilities(session(ok), np.zeros((0, 32, 32, 3), np.float32)).shape == (0, 4)
    liar = classes_onnx(tmp_path / "liar.onnx", 3, meta={"classes": json.dumps(["a", "b", "c", "d"])}, out_dims=["batch", "k"])
    with pytest.raises(ModelRunError, match="expected 4 class probabilities per image"):
        session(liar)


# --- the ensemble's composition ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tta", [False, True])
def test_n_class_members_compose_into_the_weighted_mean_of_their_probabilities(tmp_path, tta):
    from brainmri.export.compose import compose, load_member

    a = load_member(classes_onnx(tmp_path / "a.onnx", 4))
    b = load_member(classes_onnx(tmp_path / "b.onnx", 4, head="Sigmoid"))  # another member's probabilities
    composed = compose([a, b], [0.25, 0.75], tta)
    onnx.helper.set_model_props(composed, {x.key: x.value for x in a.metadata_props})  # as composed_ensemble does
    onnx.save(composed, tmp_path / "e.onnx")
    assert onnx_output_dims(tmp_path / "e.onnx") == ["batch", 4]
    x = np.random.default_rng(1).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)

    def members(images):
        return 0.25 * probabilities(session(tmp_path / "a.onnx"), images) + 0.75 * probabilities(session(tmp_path / "b.onnx"), images)

    want = (members(x) + members(x[:, :, ::-1].copy())) / 2 if tta else members(x)
    assert np.allclose(probabilities(session(tmp_path / "e.onnx"), x), np.clip(want, 0, 1), atol=1e-6)


def test_members_of_different_class_counts_are_refused(tmp_path):
    from brainmri.export.compose import compose, load_member
    from brainmri.stats.ensemble_selection import EnsembleError

    protos = [load_member(classes_onnx(tmp_path / "a.onnx", 3)), load_member(classes_onnx(tmp_path / "b.onnx", 4))]
    with pytest.raises(EnsembleError, match=r"different numbers of probabilities per image \(\[3, 4\]\)"):
        compose(protos, [0.5, 0.5], False)
