"""Frozen-base feature extraction in Keras against ONNX Runtime and OpenVINO (fp32), in one run, on real images; and
on a CPU with bf16 instructions, Keras in bf16 (what `train.feature_precision: bf16` computes) and OpenVINO in bf16.

Issue 17 asks that features be extracted with the faster of the runtimes. For each model this takes the saved
network's extractor (preprocessing, frozen base cut at the chosen layer, pooling), converts it to ONNX once with
tf2onnx (the export stage's converter), and times the three runtimes in interleaved rounds, the order rotated each
round, at `train.feature_batch_size` images per call. Printed per model: median and IQR ms per image, the
conversion's one-off cost and the images it must save to pay for itself, the largest feature difference, and the
largest change of the trained model's probability when its head reads the other runtime's features (the feature
cache must stay within 1e-4 of what the saved model computes). The CPU and its int8/bf16 flags are printed.

Needs ingest, split and train done in the project of --params (the trained heads give the probabilities):

    python benchmarks/feature_runtime.py --params /tmp/ws/params.yaml --models vgg16-aug resnet50v2-aug
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from feature_cache import overrides  # noqa: E402  (same folder)

from brainmri.config import load_params
from brainmri.core.machine import bf16_capable, cpu_flags, cpu_model
from brainmri.export.convert import to_onnx
from brainmri.intake.parts import split_part
from brainmri.intake.preprocess import load_batch
from brainmri.learn.models import in_bf16, load_model


def interleaved(fns: dict, batches: list[np.ndarray], rounds: int) -> dict[str, list[float]]:
    """Seconds per image of each runtime over all `batches`, one pass each per round, the order rotated."""
    names, out = list(fns), {k: [] for k in fns}
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for x in batches:
                fns[k](x)
            out[k].append((time.perf_counter() - start) / sum(len(x) for x in batches))
    return out


def run(p, name: str, images: int, rounds: int, opset: int) -> None:
    import onnxruntime as ort
    import openvino as ov

    backbone = p.models[name].backbone
    size, batch = p.backbones[backbone].input_size, p.train.feature_batch_size
    model = load_model(p.model_file("models", name, "model"))
    _, extractor, head = model.layers  # the saved network: image input, extractor (preprocessing, base, pooling), head
    paths = (split_part(p, "train").paths + split_part(p, "val").paths)[:images]
    x = load_batch(paths, size)
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    start = time.perf_counter()
    proto = to_onnx(extractor, size, opset)
    convert_s = time.perf_counter() - start
    so = ort.SessionOptions()
    so.intra_op_num_threads = p.benchmark.threads
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "extractor.onnx"
        f.write_bytes(proto.SerializeToString())
        start = time.perf_counter()
        # f32 explicitly: on a CPU with AMX or AVX-512 BF16 OpenVINO's default is bf16, which is not the same features
        compiled = ov.Core().compile_model(str(f), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": p.benchmark.threads})
        ov_compile_s = time.perf_counter() - start
        hint = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": p.benchmark.threads}
        ov_bf16 = ov.Core().compile_model(str(f), "CPU", hint) if bf16_capable() else None
    fns = {
        "keras": lambda b: np.asarray(extractor.predict_on_batch(b)),  # what features.extract calls
        "onnxruntime": lambda b: sess.run(None, {sess.get_inputs()[0].name: b})[0],
        "openvino_f32": lambda b: compiled(b)[0],
    }
    if bf16_capable():  # issue 33: the feature cache's bf16 arithmetic (brainmri.learn.models.in_bf16), and OpenVINO's
        bf16 = in_bf16(extractor)
        fns["keras_bf16"] = lambda b: np.asarray(bf16.predict_on_batch(b))
        fns["openvino_bf16"] = lambda b: ov_bf16(b)[0]
    feats = {k: np.concatenate([fn(b) for b in batches]) for k, fn in fns.items()}  # also the warm-up pass
    times = interleaved(fns, batches, rounds)
    probs = {k: np.asarray(head(v, training=False)).reshape(-1) for k, v in feats.items()}
    print(f"\n{name} ({backbone}, {size} px, {len(x)} real images, batch {batch}, {rounds} rounds)")
    print(f"  tf2onnx conversion of the extractor: {convert_s:.1f} s; OpenVINO compile {ov_compile_s:.1f} s")
    med = {k: float(np.median(v)) * 1000 for k, v in times.items()}
    for k, v in times.items():
        q1, q3 = np.percentile(np.asarray(v) * 1000, [25, 75])
        diff = np.abs(feats[k] - feats["keras"]).max()
        pdiff = np.abs(probs[k] - probs["keras"]).max()
        print(
            f"  {k:13s} {med[k]:7.1f} ms/image (IQR {q3 - q1:.1f}), {med['keras'] / med[k]:.2f}x Keras; "
            f"max |feature diff| {diff:.1e}, max |probability diff| {pdiff:.1e}"
        )
    best = min((k for k in med if k != "keras_bf16"), key=med.get)  # keras_bf16 needs no conversion to pay for
    if best != "keras":
        saved = (med["keras"] - med[best]) / 1000
        print(f"  {best} pays for its conversion after {convert_s / saved:.0f} images" if saved > 0 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models", nargs="+", default=["vgg16-aug"], help="trained models.* entries; one per backbone is enough")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    ap.add_argument("--images", type=int, default=64, help="real train+val images timed per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians over them")
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()
    p = load_params(args.params, overrides(args.set))
    flags = cpu_flags()
    print(f"CPU: {cpu_model()}; int8/bf16 flags: {', '.join(flags) or 'none'}; threads {p.benchmark.threads}")
    for m in args.models:
        run(p, m, args.images, args.rounds, args.opset)


if __name__ == "__main__":
    main()
