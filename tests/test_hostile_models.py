"""Hostile model files given to predict (issue 32): memory and time bombs, lying or loose metadata, runtime errors,
signals mid-run, inputs that all fail, and CSV cells a spreadsheet would run. Each test failed before the change."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pandas as pd
import pytest
from factory import REPO, brain, encode, tiny_onnx, write_dataset
from fuzzing import BOMB_OPS, LOOP_BODIES, bomb, brainmri_graph, loop, lying_size, resident_bomb

from brainmri.core.errors import BrainMRIError
from brainmri.deploy.predict import predict
from flows.cli import main

SHORT = {"run_seconds": 3.0, "load_seconds": 8.0}  # a Loop's time limit in these tests


@pytest.fixture
def images(tmp_path):
    return write_dataset(tmp_path / "in", n=2)


def save(proto, path):
    onnx.save(proto, path)
    return path


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def cli(capsys, *args) -> tuple[int, str]:
    code = main(["predict", *map(str, args)])
    return code, capsys.readouterr().err


# --- memory and time bounds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", BOMB_OPS)
def test_a_model_that_asks_for_3_gb_fails_by_name_and_writes_nothing(tmp_path, images, op, capsys):
    """447 bytes of ONNX allocated 3 GB and predict exited 0; now the worker's cap stops it, in one line, exit 2."""
    model = save(bomb(op), tmp_path / "bomb.onnx")
    start = time.monotonic()
    code, err = cli(capsys, "--model", model, "--out", tmp_path / "out.csv", images)
    assert code == 2 and "past the memory cap of 1 GiB" in err and str(model) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.csv").exists() and leftovers(tmp_path) == []
    assert time.monotonic() - start < 30


def test_a_model_that_keeps_440_mb_between_batches_is_refused(tmp_path, images):
    """It would sit beside the next batch's decoding (a 40-megapixel scan takes 1.1 GB) and pass 1.5 GiB together."""
    with pytest.raises(BrainMRIError, match=r"keeps \d+ MB once loaded, past the cap of 384 MB"):
        predict(save(resident_bomb(), tmp_path / "fat.onnx"), [str(images)], tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("body", LOOP_BODIES)
def test_a_loop_of_2_to_the_62_fails_at_the_time_limit(tmp_path, images, body, runtime):
    model = save(loop(body), tmp_path / "loop.onnx")
    start = time.monotonic()
    with pytest.raises(
        BrainMRIError, match=r"loop.onnx: (still (running|compiling).* after \d s, the time limit; stopped|OpenVINO cannot)"
    ):
        predict(model, [str(images)], tmp_path / "out.csv", runtime=runtime, bounds=SHORT)
    assert time.monotonic() - start < 25
    assert not (tmp_path / "out.csv").exists() and leftovers(tmp_path) == []


def test_openvino_is_bounded_too(tmp_path, images):
    """OpenVINO constant-folds a ConstantOfShape bomb while compiling: 3 GB before a single image."""
    from brainmri.deploy import sandbox

    model = save(bomb("ConstantOfShape"), tmp_path / "bomb.onnx")
    with pytest.raises(sandbox.ModelLimitError, match="past the memory cap"):
        predict(model, [str(images)], tmp_path / "out.csv", runtime="openvino")
    model = save(bomb("ExpandFromInput"), tmp_path / "late.onnx")
    with pytest.raises(sandbox.ModelLimitError, match="past the memory cap"):
        predict(model, [str(images)], tmp_path / "out.csv", runtime="openvino")


def test_the_cli_time_limit_is_exit_2_in_one_line(tmp_path, images, monkeypatch, capsys):
    from brainmri.deploy import sandbox

    monkeypatch.setattr(sandbox, "RUN_SECONDS", 2.0)
    code, err = cli(capsys, "--model", save(loop("empty"), tmp_path / "m.onnx"), "--out", tmp_path / "o.csv", images)
    assert code == 2 and "after 2 s, the time limit; stopped" in err and len(err.strip().splitlines()) == 1, err


def test_stages_vet_a_model_before_running_it_in_process(tmp_path):
    """Stages run models in process (benchmark timings carry no worker); the file is vetted in a bounded worker first,
    and a call that outlives its deadline is stopped by name."""
    from brainmri.deploy import sandbox, watchdog
    from brainmri.deploy.onnxrt import probabilities, session
    from brainmri.deploy.runtimes import runner

    for op in ("ConstantOfShape", "Range"):
        with pytest.raises(sandbox.ModelLimitError, match="past the memory cap"):
            session(save(bomb(op), tmp_path / f"{op}.onnx"))
    with pytest.raises(sandbox.ModelLimitError, match="past the memory cap"):
        runner(tmp_path / "ConstantOfShape.onnx", "openvino")
    x = np.zeros((2, 32, 32, 3), np.float32)
    sess = session(save(loop("add", trips=2000), tmp_path / "short.onnx"))  # passes the vetting: bounded in process
    assert probabilities(sess, x).shape == (2,)
    stop = []
    with pytest.raises(sandbox.ModelLimitError, match="still running after 0.5 s"):
        with watchdog.deadline(0.5, lambda: stop.append(1), "a slow call"):
            time.sleep(1.5)
    assert stop == [1]


# --- Ctrl-C and SIGTERM ----------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(int(entry))
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_predict_inside_the_runtime_within_5_s(tmp_path, images, signum):
    """A Loop of 2^62 ignored Ctrl-C, and a kill left a 0-byte temporary file beside --out. This one passes the probe
    (no trips on a black image) and loops for ever on the first batch of scans, whose output file is then open."""
    model = save(loop("empty", trips=2**50, from_input=True), tmp_path / "loop.onnx")
    out = tmp_path / "res" / "out.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BRAINMRI_QUIET": "1"}
    cmd = [sys.executable, "-m", "flows.cli", "predict", "--model", str(model), "--out", str(out), str(images)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (out.parent.exists() and leftovers(out.parent)) and time.monotonic() < deadline:  # scoring has begun
            time.sleep(0.1)
        assert leftovers(out.parent), "predict never started scoring"
        workers = children(proc.pid)
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=5)
        assert time.monotonic() - sent < 5
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and len(err.strip().splitlines()) == 1, err
    assert leftovers(out.parent) == [] and not out.exists()
    time.sleep(0.5)
    assert workers and not any(alive(w) for w in workers)


# --- strict metadata -------------------------------------------------------------------------------------------

LOOSE = {
    "lower-case boolean": ({"crop_to_content": "true"}, "crop_to_content='true' is neither True nor False"),
    "numeric boolean": ({"crop_to_content": "1"}, "crop_to_content='1' is neither True nor False"),
    "int8 boolean": ({"int8_reduce_range": "yes"}, "int8_reduce_range='yes' is neither True nor False"),
    "ensemble boolean": ({"tta_flip": "false"}, "tta_flip='false' is neither True nor False"),
    "underscored integer": ({"input_size": "3_2"}, "input_size='3_2' is not written as export writes an integer"),
    "spaced integer": ({"max_side": " 512"}, "max_side=' 512' is not written as export writes"),
    "max_side too large": ({"max_side": "70000"}, "max_side='70000' is outside 1..65535"),
    "input_size too large": ({"input_size": "2048"}, "input_size='2048' is outside 32..1024"),
    "max_pixels too large": ({"max_pixels": "1000000000"}, "max_pixels='1000000000' is outside"),
    "file bytes too large": ({"max_file_bytes": str(10**12)}, "max_file_bytes='1000000000000' is outside"),
    "infinite threshold": ({"threshold": "inf"}, "threshold='inf' is outside"),
    "huge class name": ({"positive_class": "t" * 5_000_000}, "(5000000 characters) is longer than 4096 characters"),
    "long class name": ({"positive_class": "t" * 101}, "(101 characters) is longer than 100 characters"),
    "class name with a newline": ({"negative_class": "no\nyes"}, "unprintable character"),
    "huge other value": ({"weights": "w" * 5000}, "(5000 characters) is longer than 4096 characters"),
    "many keys": ({f"k{i}": "v" for i in range(100)}, "at most 64"),
}


@pytest.mark.parametrize("case", sorted(LOOSE))
def test_metadata_is_exactly_what_export_writes_or_one_sentence_naming_the_key(tmp_path, images, case, capsys):
    meta, message = LOOSE[case]
    model = tiny_onnx(tmp_path / "m.onnx", meta=meta)
    code, err = cli(capsys, "--model", model, "--out", tmp_path / "o.csv", images)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and len(err) < 500, err
    assert not (tmp_path / "o.csv").exists()


def test_what_export_writes_is_accepted_and_the_limits_are_importable_constants(tmp_path, images):
    from brainmri.deploy import metadata
    from brainmri.export.record import onnx_metadata

    class P:  # the params onnx_metadata reads
        class ingest:
            max_side, max_pixels, crop_to_content, positive_class, negative_class = 512, 40_000_000, True, "yes", "no"

    written = {k: str(v) for k, v in onnx_metadata(P, "m", 32, {"threshold": 1e-05, "weights": {"description": "random"}}).items()}
    read = metadata.read(written)
    assert read.limits["crop_to_content"] is True and read.threshold == 1e-05 and read.size == 32
    assert (metadata.MAX_SIDE, metadata.MAX_INPUT_SIZE, metadata.MIN_INPUT_SIZE) == (65_535, 1024, 32)
    assert metadata.MAX_PIXELS >= 40_000_000 and metadata.MAX_FILE_BYTES >= 250_000_000  # ingest's defaults
    frame = predict(tiny_onnx(tmp_path / "c.onnx", meta={"crop_to_content": "True"}), [str(images)], tmp_path / "o.csv")
    assert (frame["error"] == "").all()


def test_metadata_that_lies_about_the_input_size_is_refused_before_any_image(tmp_path, images):
    model = save(lying_size(64), tmp_path / "liar.onnx")
    with pytest.raises(BrainMRIError, match=r"liar.onnx: the runtime failed running a batch of 1: .*Reshape"):
        predict(model, [str(images)], tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists() and leftovers(tmp_path) == []


def test_runtime_errors_are_one_line_in_both_runtimes(tmp_path, images, capsys):
    from onnx import helper as h
    from onnx import numpy_helper as nh

    bad = brainmri_graph([h.make_node("Reshape", ["image", "to"], ["r"])], [nh.from_array(np.array([7, -1, 5], np.int64), "to")], "r")
    model = save(bad, tmp_path / "reshape.onnx")
    for runtime in ("onnxruntime", "openvino"):
        code, err = cli(capsys, "--model", model, "--out", tmp_path / "o.csv", "--runtime", runtime, images)
        assert code == 2 and "reshape.onnx" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "Exception from src" not in err and ".cpp:" not in err and ".cc:" not in err, err
    fixed = tiny_onnx(tmp_path / "fixed.onnx", shape=[1, 32, 32, 3])
    code, err = cli(capsys, "--model", fixed, "--out", tmp_path / "o.csv", images)
    assert code == 2 and "fixes the batch at 1" in err, err


# --- nothing scored, and formula cells -------------------------------------------------------------------------


def test_predict_exits_2_when_nothing_could_be_scored_and_0_with_the_count_otherwise(tmp_path, capsys):
    model = tiny_onnx(tmp_path / "m.onnx")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"not an image")
    code, err = cli(capsys, "--model", model, "--out", tmp_path / "bad.csv", bad)
    assert code == 2 and "none of the 3 inputs could be scored (3 failed" in err and len(err.strip().splitlines()) == 1, err
    assert len(pd.read_csv(tmp_path / "bad.csv")) == 3  # each one's reason is there
    (bad / "good.png").write_bytes(encode(brain(1), "PNG"))
    code, err = cli(capsys, "--model", model, "--out", tmp_path / "some.csv", bad)
    assert code == 0 and "predict: 4 images" in err and "(3 could not be read)" in err, err


def test_csv_cells_cannot_run_as_spreadsheet_formulas_and_json_is_exact(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["=HYPERLINK(x).png", "+1.png", "-2.png", "@SUM(A1).png", "\tx.png", "\rx.png", "plain.png"]
    for n in names:
        (folder / n).write_bytes(encode(brain(2), "PNG"))
    model = tiny_onnx(tmp_path / "m.onnx", meta={"positive_class": "=1+1", "negative_class": "-no"})
    monkeypatch.chdir(folder)  # relative paths: the cell starts with the file's name
    predict(model, names, tmp_path / "o.csv")
    predict(model, names, tmp_path / "o.json")
    saved = pd.read_csv(tmp_path / "o.csv", keep_default_na=False)
    text_cells = [*saved["path"], *saved["label"]]
    assert all(not c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in text_cells), text_cells
    assert "'=HYPERLINK(x).png" in set(saved["path"]) and "plain.png" in set(saved["path"])
    assert saved["probability"].dtype == float  # numbers untouched
    rows = json.loads((tmp_path / "o.json").read_text())["predictions"]
    assert rows[0]["path"] == "=HYPERLINK(x).png" and {r["label"] for r in rows} <= {"=1+1", "-no"}


def test_formula_safe_leaves_numbers_and_other_text_exactly_as_they_were():
    from brainmri.core.files import formula_safe

    frame = pd.DataFrame({"n": [-1.5, 2.0], "i": [-3, 4], "s": ["-x", "yes/Y1.jpg"], "m": [None, "@a"]})
    safe = formula_safe(frame)
    assert safe["n"].tolist() == [-1.5, 2.0] and safe["i"].tolist() == [-3, 4] and safe["n"].dtype == frame["n"].dtype
    assert safe["s"].tolist() == ["'-x", "yes/Y1.jpg"] and safe["m"].isna().tolist() == [True, False] and safe["m"][1] == "'@a"
    assert frame["s"].tolist() == ["-x", "yes/Y1.jpg"]  # a copy


# --- fuzzing: random metadata and random small graphs through predict -------------------------------------------


def test_fuzzed_metadata_is_accepted_in_range_or_refused_in_one_sentence(tmp_path):
    import fuzzing

    result = fuzzing.run_batch(32, 0, 2000, "metadata", tmp_path, timeout=120)
    assert result["failures"] == [] and result["accepted"] > 50 and result["refused"] > 500


def test_fuzzed_graphs_through_predict_never_crash_hang_or_blow_up(tmp_path):
    import fuzzing

    result = fuzzing.run_batch(32, 0, 12, "graph", tmp_path, timeout=300)
    assert result["failures"] == [], result["failures"]
    assert result["scored"] > 0 and result["refused"] + result["limit"] > 0 and result["worker_peak_rss_mb"] < 1024


def test_message_cleaning_keeps_the_reason_and_drops_source_locations():
    from brainmri.deploy import sandbox

    text = (
        "Exception from src/inference/src/cpp/core.cpp:132:\nException from src/core/src/runtime/allocator.cpp:79:\n"
        "[CPU] Broadcast node with name 'B' Check 'ptr' failed at src/plugins/intel_cpu/src/cpu_memory.cpp:257:\n"
        "Failed to allocate 6000000000 bytes of memory\n\n"
    )
    assert sandbox.one_line(text) == "[CPU] Broadcast node with name 'B' Failed to allocate 6000000000 bytes of memory"
    ort = (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Tile node. Name:'' Status Message: "
        "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* onnxruntime::BFCArena::AllocateRawInternal(size_t, "
        "bool, onnxruntime::Stream*) Failed to allocate memory for requested buffer of size 3000000000\n"
    )
    assert re.fullmatch(
        r"Non-zero status code .* Tile node\. Name:'' Status Message: Failed to allocate memory .* 3000000000", sandbox.one_line(ort)
    )
