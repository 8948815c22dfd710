import json

import numpy as np
import onnx
import pandas as pd
import pytest

from brainmri.deploy.onnxrt import metadata, probabilities, session
from brainmri.export.convert import ExportError
from brainmri.export.quantize import int8_calibration_sample
from brainmri.intake.parts import Part
from brainmri.intake.preprocess import load_batch
from brainmri.learn.models import load_model
from tasks.export import export


def test_exported_models_match_keras_and_carry_their_metadata(small_run):
    p, trained, evaluated, _ = small_run
    for name in p.models:
        e = json.loads(p.model_file("export", name, "export_metrics").read_text())
        assert e["parity"]["max_abs_diff"] <= 1e-4 and e["parity"]["labels_identical"] and e["parity"]["n_images"] > 0
        model = onnx.load(p.model_file("export", name, "onnx"))
        inp = model.graph.input[0]
        assert inp.name == "image" and inp.type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
        sess = session(p.model_file("export", name, "onnx"))
        meta = metadata(sess)
        assert float(meta["threshold"]) == trained[name]["threshold"] and meta["positive_class"] == "yes"
        preds = pd.read_csv(p.model_file("eval", name, "predictions"), keep_default_na=False)
        split = pd.read_csv(p.path("split_manifest"), keep_default_na=False).set_index("source_path")
        x = load_batch([p.path("ingest_images") / split.loc[s, "image"] for s in preds["source_path"]], int(meta["input_size"]))
        assert np.allclose(probabilities(sess, x), preds["probability"], atol=1e-6)  # evaluate scored this very file
        keras_prob = np.asarray(load_model(p.model_file("models", name, "model")).predict(x, verbose=0)).reshape(-1)
        assert np.allclose(keras_prob, preds["probability"], atol=1e-4)  # and it is the Keras model train saved
        assert {"accuracy_change_points", "auc_change"} <= set(e["int8"])
        calib = e["int8"]["calibration_classes"]
        assert sum(calib.values()) == e["int8"]["calibration_images"] == 8 and min(calib.values()) >= 3  # both classes calibrate
        assert p.model_file("export", name, "onnx_int8").stat().st_size < p.model_file("export", name, "onnx").stat().st_size


def test_broken_parity_fails_the_stage_and_keeps_the_old_export(small_run, monkeypatch):
    p, *_ = small_run
    name = "vgg16-noaug"
    folder = p.model_file("export", name, "onnx").parent
    before = {f.name: f.read_bytes() for f in folder.iterdir()}

    def broken(model_path, size, opset, x, cache=None):  # the conversion's own output is what small_run exported (it passed parity)
        fp32 = p.model_file("export", name, "onnx")
        proto, p_keras = onnx.load(fp32), probabilities(session(fp32), x)
        for init in proto.graph.initializer:  # nudge every bias: the graph no longer computes the Keras model
            if len(init.dims) == 1 and init.data_type == onnx.TensorProto.FLOAT:
                arr = onnx.numpy_helper.to_array(init) + 0.5
                init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        return proto, p_keras

    monkeypatch.setattr("tasks.export.convert", broken)
    with pytest.raises(ExportError, match="ONNX output differs from Keras .* nothing was written"):
        export(p, name)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert not [f for f in folder.parent.iterdir() if f.name.startswith(".")]


@pytest.mark.parametrize("reduce_range", [True, False])
def test_reduce_range_keeps_int8_weights_to_7_bits(small_run, tmp_path, reduce_range):
    """export.reduce_range: weights within [-64, 64], so u8 x s8 pair sums cannot saturate on CPUs without VNNI."""
    from onnx import numpy_helper

    from brainmri.export.quantize import quantize
    from brainmri.intake.parts import split_part

    p, *_ = small_run
    fp32 = p.model_file("export", "vgg16-noaug", "onnx")
    out = tmp_path / "q.onnx"
    quantize(fp32, out, split_part(p, "train").paths[:8], p.backbones["vgg16"].input_size, "minmax", reduce_range)
    weights = [numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims]
    peak = max(int(np.abs(w.astype(int)).max()) for w in weights)
    assert weights and (peak <= 64 if reduce_range else peak == 127)
    x = load_batch(split_part(p, "test").paths, p.backbones["vgg16"].input_size)
    prob = probabilities(session(out), x)
    assert prob.shape == (len(x),) and np.all((prob >= 0) & (prob <= 1))


def test_int8_candidates_share_one_calibration_and_get_the_file_their_own_would_give(small_run, tmp_path, monkeypatch):
    """The reduce_range candidates of one calibration method read the activation ranges the first one wrote (ONNX
    Runtime's calibration cache): no image is fed a second time, and the file is byte for byte the one its own
    calibration gives."""
    from brainmri.export import quantize as module
    from brainmri.intake.parts import split_part

    p, *_ = small_run
    fp32 = p.model_file("export", "vgg16-noaug", "onnx")
    images, size, ranges = split_part(p, "train").paths[:8], p.backbones["vgg16"].input_size, tmp_path / "percentile.json"
    fed = []
    real_next = module.Int8CalibrationReader.get_next
    monkeypatch.setattr(module.Int8CalibrationReader, "get_next", lambda self: fed.append(1) or real_next(self))
    module.quantize(fp32, tmp_path / "a.onnx", images, size, "percentile", True, ranges)
    calibrated = len(fed)
    assert calibrated > 0 and ranges.is_file()
    module.quantize(fp32, tmp_path / "shared.onnx", images, size, "percentile", False, ranges)
    assert len(fed) == calibrated  # the ranges came from the file
    module.quantize(fp32, tmp_path / "own.onnx", images, size, "percentile", False)
    assert len(fed) > calibrated
    assert (tmp_path / "shared.onnx").read_bytes() == (tmp_path / "own.onnx").read_bytes()


def test_a_sibling_quantizes_from_its_bases_cached_ranges_and_gets_the_file_its_own_calibration_gives(small_run, tmp_path, monkeypatch):
    """vgg16-noaug and vgg16-aug share a frozen base and calibration images: the base's int8 activation ranges are
    calibrated once and cached (smallcnn's base gets an entry of its own), a sibling's export feeds no image, and its int8
    graph is byte for byte the one its own calibration gives. Another sample or method is another entry; the head's
    tensors are never cached."""
    from brainmri.export import quantize as module
    from brainmri.export import ranges_cache
    from brainmri.export.int8_choice import quantize_best
    from brainmri.intake.parts import split_part

    p, *_ = small_run
    name, size = "vgg16-aug", p.backbones["vgg16"].input_size
    cached = {f.name.split("-")[0]: f for f in p.path("onnx_cache").glob("*" + ranges_cache.SUFFIX)}
    assert len(cached) == 2  # the stage ran for three models: one entry for vgg16's base, one for smallcnn's
    train, val = split_part(p, "train"), split_part(p, "val")
    images = [train.paths[i] for i in int8_calibration_sample(train, p.export.int8_calibration_images, p.seed)]
    fp32 = p.model_file("export", name, "onnx")
    x = load_batch(val.paths, size)
    p32 = probabilities(session(fp32), x)
    threshold = json.loads(p.model_file("models", name, "train_metrics").read_text())["threshold"]
    fed = []
    real_next = module.Int8CalibrationReader.get_next
    monkeypatch.setattr(module.Int8CalibrationReader, "get_next", lambda self: fed.append(1) or real_next(self))

    record, p8 = quantize_best(p, name, fp32, tmp_path / "cached.onnx", images, size, threshold, x, p32)
    assert not fed  # every candidate's ranges came from the cache
    np.testing.assert_array_equal(p8, probabilities(session(tmp_path / "cached.onnx"), x))  # the chosen file's, returned
    chosen = record["chosen"]
    module.quantize(fp32, tmp_path / "own.onnx", images, size, chosen["calibration_method"], chosen["reduce_range"])
    assert fed  # calibrated itself
    own = onnx.load(tmp_path / "own.onnx").graph.SerializeToString()
    assert onnx.load(tmp_path / "cached.onnx").graph.SerializeToString() == own
    assert onnx.load(p.model_file("export", name, "onnx_int8")).graph.SerializeToString() == own  # the stage's file too

    graph = onnx.load(module.prepare(fp32, tmp_path / "prep.onnx")).graph
    key = ranges_cache.ranges_key(graph, images, size, chosen["calibration_method"], module.CALIBRATION_BATCH)
    assert key in cached
    assert ranges_cache.ranges_key(graph, images[:-1], size, chosen["calibration_method"], module.CALIBRATION_BATCH) != key
    assert ranges_cache.ranges_key(graph, images, size, "minmax", module.CALIBRATION_BATCH) != key
    head = {t for n in graph.node if n.name in set(module.head_nodes(graph)) for t in n.output}
    stored = set(json.loads(cached[key].read_text())["data"])
    assert stored and stored <= ranges_cache.base_tensors(graph) and not stored & head


def test_int8_keeps_the_head_float_and_the_base_int8(small_run, tmp_path):
    """Only the base is quantized: no quantize/dequantize node after the global pooling, every convolution fed int8."""
    from brainmri.export.quantize import GLOBAL_POOLING, quantize
    from brainmri.intake.parts import split_part

    p, *_ = small_run
    out = tmp_path / "q.onnx"
    quantize(
        p.model_file("export", "vgg16-noaug", "onnx"),
        out,
        split_part(p, "train").paths[:8],
        p.backbones["vgg16"].input_size,
        "minmax",
        True,
    )
    graph = onnx.load(out).graph
    made_by = {o: n for n in graph.node for o in n.output}
    pooling = next(n for n in graph.node if n.op_type in GLOBAL_POOLING)
    after, reached = [], set(pooling.output)
    for n in graph.node:
        if any(i in reached for i in n.input):
            reached.update(n.output)
            after.append(n.op_type)
    assert "MatMul" in after or "Gemm" in after  # the head's dense layers are there...
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(after)  # ...and float
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(made_by[n.input[0]].op_type == "DequantizeLinear" for n in convs)


def train_like(n_no: int, n_yes: int) -> Part:
    """A training split as split_part returns it: sorted by source path, so every 'no/' image comes first."""
    frame = pd.DataFrame({"source_path": [f"no/{i:03d}.jpg" for i in range(n_no)] + [f"yes/{i:03d}.jpg" for i in range(n_yes)]})
    frame["label"] = frame["source_path"].str.split("/").str[0]
    return Part(frame, [], (frame["label"] == "yes").to_numpy(int))


def test_int8_calibration_sample_is_seeded_and_class_stratified():
    part = train_like(68, 108)  # the real training split's classes
    a = int8_calibration_sample(part, 32, seed=42)
    labels = part.frame["label"].iloc[a]
    assert len(a) == len(set(a)) == 32 and a == sorted(a)
    assert abs(int((labels == "yes").sum()) - 32 * 108 / 176) <= 1  # 19.6 expected: 19 or 20 'yes', not 0
    assert int8_calibration_sample(part, 32, seed=42) == a and int8_calibration_sample(part, 32, seed=7) != a
    assert int8_calibration_sample(part, 500, seed=42) == list(range(176))  # more asked than there are: all of them
    small = int8_calibration_sample(train_like(3, 40), 8, seed=0)
    assert (train_like(3, 40).y[small] == 0).sum() >= 1  # a rare class still gets its share, rounded


def test_the_export_process_never_imports_tensorflow(small_run, tmp_path):
    """Keras runs in the conversion worker only: the stage process stays small and starts fast."""
    import subprocess
    import sys

    p, *_ = small_run
    paths = {"paths": {"export": str(tmp_path / "export"), "data_root": str(tmp_path)}}  # a data root of the test's own
    code = (
        "import sys; from brainmri.config import load_params; from tasks.export import export; "
        f"export(load_params({str(p.root / 'params.yaml')!r}, {paths!r}), 'smallcnn-aug'); "
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["False", "False"]
    assert (tmp_path / "export" / "smallcnn-aug" / "model.onnx").read_bytes() == p.model_file("export", "smallcnn-aug", "onnx").read_bytes()


def test_int8_settings_are_chosen_on_val_and_test_images_play_no_part(small_run, tmp_path, monkeypatch):
    """Lists under export are candidates: each is quantized and scored against fp32 on the validation images, the
    closest kept. With every test image replaced by noise and its label flipped, the choice and its scores stay put."""
    import shutil

    from PIL import Image

    from brainmri.config import load_params

    p, *_ = small_run
    grid = {"export": {"int8_calibration_method": ["minmax", "percentile"], "reduce_range": [True, False]}}  # 4 candidates
    q = load_params(p.root / "params.yaml", {**grid, "paths": {"export": str(tmp_path / "out" / "e"), "data_root": str(tmp_path / "out")}})
    sel = export(q, "vgg16-noaug")["int8"]["selection"]
    assert [(c["calibration_method"], c["reduce_range"]) for c in sel["candidates"]] == [
        ("minmax", True), ("minmax", False), ("percentile", True), ("percentile", False)
    ]  # fmt: skip
    change = [c["val_mean_abs_prob_change"] for c in sel["candidates"]]
    best = sel["candidates"][change.index(min(change))]
    assert sel["chosen"] == {"calibration_method": best["calibration_method"], "reduce_range": best["reduce_range"]}
    folder = q.model_file("export", "vgg16-noaug", "onnx").parent
    assert sorted(f.name for f in folder.iterdir()) == sorted(["model.onnx", "model.int8.onnx", "export.json", "scores.json"])

    root = tmp_path / "copy"
    shutil.copytree(p.root, root, ignore=shutil.ignore_patterns("export", "eval", "benchmark", "reports", "cache"))
    noised = load_params(
        root / "params.yaml", {**grid, "paths": {"export": str(tmp_path / "out2" / "e2"), "data_root": str(tmp_path / "out2")}}
    )
    split = pd.read_csv(noised.path("split_manifest"), keep_default_na=False)
    test = split["split"] == "test"
    rng = np.random.default_rng(0)
    for name in split.loc[test, "image"]:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noised.path("ingest_images") / name)
    split.loc[test, "label"] = split.loc[test, "label"].map({"yes": "no", "no": "yes"})
    split.to_csv(noised.path("split_manifest"), index=False)
    fp32 = folder / "model.onnx"  # the conversion is not under test: the copy reuses the first export's graph

    def converted(model_path, size, opset, x, cache=None):
        return onnx.load(fp32), probabilities(session(fp32), x)

    monkeypatch.setattr("tasks.export.convert", converted)
    assert export(noised, "vgg16-noaug")["int8"]["selection"] == sel


def test_the_int8_calibration_reader_gives_each_image_once_in_strided_ranges(tmp_path):
    """ONNX Runtime's CalibStridedMinMax asks for range(i, i + 1) for i < len(reader): every image once, the last
    partial batch included."""
    from PIL import Image

    from brainmri.export.quantize import Int8CalibrationReader

    paths = []
    for i in range(9):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(paths[-1])
    reader = Int8CalibrationReader(paths, 32, batch=4)
    assert len(reader) == 3
    seen = []
    for _ in range(2):  # set_range resets the position: the same reader reads the same images again
        for i in range(len(reader)):
            reader.set_range(start_index=i, end_index=i + 1)
            while (batch := reader.get_next()) is not None:
                seen.append(batch["image"][:, 0, 0, 0])
    got = np.concatenate(seen)
    assert len(got) == 18 and [len(s) for s in seen] == [4, 4, 1, 4, 4, 1]
    np.testing.assert_array_equal(got[:9], got[9:])
    assert len(set(got[:9].tolist())) == 9  # nine different images, none twice


def test_each_frozen_base_is_converted_once_and_composed_with_each_head(small_run, tmp_path, monkeypatch):
    """Export converts a model's frozen extractor once into the ONNX base cache and joins each model's head to it: the
    composed graph computes what the whole network's conversion computes, and a damaged cache entry is converted
    again, never used."""
    from brainmri.export import base_onnx, convert

    p, *_ = small_run
    size, opset = p.backbones["vgg16"].input_size, p.export.opset
    keys = {}
    for name in p.models:  # the stage ran with the cache: one entry per distinct extractor (weights and cut), no more
        model = load_model(p.model_file("models", name, "model"))
        keys[name] = base_onnx.base_key(base_onnx.split_network(model)[0], opset)
    assert sorted(f.name.split("-")[0] for f in p.path("onnx_cache").glob("*.onnx")) == sorted(set(keys.values()))

    model = load_model(p.model_file("models", "vgg16-noaug", "model"))
    converted = []
    whole_conversion = convert.to_onnx

    def counting(m, *args):
        converted.append(m.name)
        return whole_conversion(m, *args)

    monkeypatch.setattr(convert, "to_onnx", counting)
    cache = tmp_path / "cache"
    first = convert.network_to_onnx(model, size, opset, str(cache))
    again = convert.network_to_onnx(model, size, opset, str(cache))
    assert converted == ["vgg16_features"] and again.SerializeToString() == first.SerializeToString()
    whole = whole_conversion(model, size, opset)
    assert [v.name for v in first.graph.input] == ["image"] and [v.name for v in first.graph.output] == [v.name for v in whole.graph.output]
    x = np.random.default_rng(3).uniform(0, 255, (5, size, size, 3)).astype(np.float32)
    for proto, file in ((first, "composed.onnx"), (whole, "whole.onnx")):
        onnx.save(proto, tmp_path / file)
    p_composed, p_whole = probabilities(session(tmp_path / "composed.onnx"), x), probabilities(session(tmp_path / "whole.onnx"), x)
    assert np.allclose(p_composed, p_whole, atol=1e-6)
    assert np.allclose(p_composed, np.asarray(model.predict(x, verbose=0)).reshape(-1), atol=1e-5)

    (entry,) = cache.glob("*.onnx")
    good = entry.read_bytes()
    entry.write_bytes(good[:1000])  # truncated: its name's hash no longer matches
    assert convert.network_to_onnx(model, size, opset, str(cache)).SerializeToString() == first.SerializeToString()
    assert converted == ["vgg16_features"] * 2 and [f.read_bytes() for f in cache.glob("*.onnx")] == [good]
