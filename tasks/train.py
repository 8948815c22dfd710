"""train stage: one model = one backbone, with or without the augmented copies, its settings, calibration and
threshold chosen on train+val by cross-validation; val is a held-out check. N classes: softmax heads, temperature
calibration and the arg-max decision (notes in brainmri.learn.record)."""

from __future__ import annotations

import time

import numpy as np

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_csv, write_json
from brainmri.core.progress import log, summary
from brainmri.learn import calibration
from brainmri.learn.calibrate import calibrate
from brainmri.learn.fitting import class_weights, data_parts, decision_data, seed_everything, setting, train_end_to_end
from brainmri.learn.live import log_live
from brainmri.learn.record import cv_predictions, train_record, train_summary
from brainmri.learn.selection import threshold
from brainmri.learn.transfer import train_transfer


def train(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write the model, its history and train.json; return train.json."""
    from brainmri.learn.models import build_network, save_model

    p.model(name)  # an unknown name stops here, before any work
    start = time.monotonic()
    spec = p.models[name]
    bb = setting(p, name)  # the grid's first point; the chosen one is run.bb
    seed_everything(p.seed)
    layers = list(dict.fromkeys(g["feature_layer"] for g in p.backbones[spec.backbone].grid()))  # every candidate, pooled in one pass
    net = build_network(p, spec.backbone, p.seed, layers=layers)  # fails here, before any work, if weights cannot be had
    log.info("train %s: %s, weights: %s", name, bb.application, net.weights.describe())
    tr, aug, va = data_parts(p, spec.augment)

    y_fit = np.concatenate([tr.y, aug.y])
    cw = class_weights(y_fit, p.train.class_weight, len(p.ingest.classes))
    fit_args = {"batch": p.train.batch_size, "cw": cw, "patience": bb.patience}
    run = (train_end_to_end if net.end_to_end else train_transfer)(p, name, net, tr, aug, va, y_fit, fit_args)
    held_out, where = decision_data(run, va)  # pooled out-of-fold predictions over train+val; val without CV
    cal = calibrate(p, net.full, held_out, where)
    t = None  # N classes: the decision is the arg-max of the calibrated probabilities, no threshold
    if p.ingest.binary:
        t = threshold(run.rule, held_out[0], calibration.apply(held_out[1], cal["a"], cal["c"]), cal)
    p_train, p_val = run.scores()  # the saved model's own outputs, calibration folded in
    out = train_record(p, name, net, run, (tr, aug, va), cw, cal, (t, where), (p_train, p_val))

    with atomic_dir(p.model_file("models", name, "model").parent) as tmp:
        save_model(net.full, tmp / p.paths.files.model)
        write_csv(tmp / p.paths.files.history, run.history)
        write_json(tmp / p.paths.files.train_metrics, out)
        write_csv(tmp / p.paths.files.cv_predictions, cv_predictions(run, cal, p.ingest.label_names))
        log_live(tmp / p.paths.files.live, run.history, out)
    summary(f"train {name}", train_summary(out, run.cv, t) + f"; {time.monotonic() - start:.0f} s")
    return out
