"""Training models: the images a model trains on, the global seed, class weights, Keras fit for networks trained on
images (the reference CNN end to end, fine-tuning), heads on cached features in the compiled loop
(brainmri.learn.headfit), and batched prediction."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from brainmri.config import Backbone, Params, candidates
from brainmri.core.files import read_manifest
from brainmri.core.progress import log
from brainmri.intake.parts import Part, make_part, split_part
from brainmri.intake.preprocess import load_batch
from brainmri.learn.headfit import HeadJob, HeadResult, fit_heads

ARGMAX = "argmax"  # the N-class decision rule (train.json's threshold_rule): the class of highest calibrated probability


def first_rule(p: Params):
    """The decision rule of a model with no cross-validation to choose by: train.threshold's first rule for two
    classes; the arg-max for N (notes/nclass_contract.md item 3)."""
    return candidates(p.train.threshold)[0] if p.ingest.binary else ARGMAX


@dataclass
class Trained:
    """What training one model gives: its history and selected epoch, the settings and threshold rule it was trained
    with (chosen by `selection` when params give a grid or several rules), its cross-validation when it has one, and
    `scores`, the current model's (train, val) probabilities."""

    history: pd.DataFrame
    best: int
    bb: Backbone
    rule: object  # a train.threshold rule: 'youden' or a fixed threshold; ARGMAX for N classes
    selection: dict | None = None  # the record of what was chosen by measurement; None when nothing was
    cv: dict | None = None  # cv_report's summary (train.json's "cv") with the seed spread
    oof: tuple[np.ndarray, np.ndarray] | None = None  # train+val labels and their out-of-fold probabilities
    per_image: pd.DataFrame | None = None  # image, group, label, fold: the rows of cv_predictions.csv
    scores: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
    copies: bool = True  # whether the final model fitted on the augmented copies it was given (False: CV chose without)


def decision_data(run: Trained, va: Part) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """(labels, raw probabilities) that calibration and the threshold are set on, and their description: the pooled
    out-of-fold predictions over train+val (5.5 times val's images on the real set), or val for a model without
    cross-validation."""
    if run.oof is not None:
        return run.oof, f"pooled out-of-fold predictions over train+val ({len(run.oof[0])} images)"
    return (va.y, run.scores()[1]), f"val ({len(va.y)} images; this model has no cross-validation)"


def data_parts(p: Params, augment: bool | list[bool]) -> tuple[Part, Part, Part]:
    """(train originals, their augmented copies or nothing, val) in a fixed order; the copies are read when `augment`
    is true or lists true (a grid candidate)."""
    augment = any(candidates(augment))
    aug = read_manifest(p.path("augment_manifest")) if augment else pd.DataFrame(columns=["image", "label"])
    aug_part = make_part(p, aug.sort_values("image", kind="stable"), p.path("augment_images"))
    return split_part(p, "train"), aug_part, split_part(p, "val")


def seed_everything(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def class_weights(y: np.ndarray, mode: str, n_classes: int = 2) -> dict[int, float] | None:
    """Per-class weights of the training loss: 'balanced' gives class c the weight n / (K * n_c) for K classes
    (scikit-learn's 'balanced'; for two classes n / (2 * n_c), as before N classes), 1 to a class with no image;
    'none' gives None (every row weighs 1)."""
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=n_classes)
    return {c: float(len(y) / (n_classes * counts[c])) if counts[c] else 1.0 for c in range(n_classes)}


def setting(p: Params, name: str) -> Backbone:
    """Model `name`'s backbone at its grid's first point: the settings themselves when params give single values."""
    return p.backbones[p.models[name].backbone].at(p.grid(name)[0])


def fit(model, x, y, val, lr: float, epochs: int, patience: int, batch: int, cw, label: str) -> tuple[pd.DataFrame, int]:
    """Keras fit for `epochs` epochs and keep the last; with `patience`, stop early on validation loss and keep its best epoch.

    For networks trained on images (the reference CNN, fine-tuning); heads on cached features train in brainmri.learn.headfit."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            log.log(
                logging.DEBUG if label.startswith("cv ") else logging.INFO,  # CV folds: their per-fold summary is enough
                "%s epoch %d/%d: loss %.4f, val_loss %.4f, val_accuracy %.3f",
                label,
                epoch + 1,
                epochs,
                logs["loss"],
                logs["val_loss"],
                logs["val_accuracy"],
            )

    # one sigmoid unit: binary cross-entropy; K softmax units: cross-entropy of the integer labels 0..K-1
    loss = "binary_crossentropy" if model.output_shape[-1] == 1 else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, metrics=["accuracy"])
    stop = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)] if patience else []
    h = model.fit(
        x, y, validation_data=val, epochs=epochs, batch_size=batch, class_weight=cw, shuffle=True, verbose=0, callbacks=[*stop, EpochLog()]
    )
    hist = pd.DataFrame(h.history)
    hist.insert(0, "epoch", np.arange(1, len(hist) + 1))
    best = stop[0].best_epoch + 1 if stop else len(hist)
    hist["selected"] = hist["epoch"] == best
    return hist, best


def predict(model, x, batch: int = 64) -> np.ndarray:
    """Probabilities in batches, called directly: model.predict traces a new function per model (a warning per CV fold).
    A two-class model gives (n,), P(positive); a K-class model (n, K), columns in label_names order."""
    units = model.output_shape[-1]
    if units != 1:
        out = [np.asarray(model(x[i : i + batch], training=False)) for i in range(0, len(x), batch)]
        return np.concatenate(out) if out else np.zeros((0, units), np.float32)
    out = [np.asarray(model(x[i : i + batch], training=False)).reshape(-1) for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train_heads(p: Params, name: str, jobs: list[HeadJob], settings: list[Backbone] | None = None) -> list[HeadResult]:
    """Train heads of model `name` in compiled runs, each at its own grid point's learning rate and epochs (by default
    the grid's first); log each one's end."""
    settings = settings or [setting(p, name)] * len(jobs)
    lrs, epochs, l2s = [s.learning_rate for s in settings], [s.epochs for s in settings], [s.l2 for s in settings]
    results = fit_heads(jobs, lrs, epochs, settings[0].patience, p.train.batch_size, l2s, [s.linear_c for s in settings])
    for r in results:
        last = r.history.iloc[-1]
        log.debug(
            "head of %s: %d epochs, loss %.4f, val_loss %.4f, selected epoch %d",
            name,
            len(r.history),
            last["loss"],
            last["val_loss"],
            r.best,
        )
    return results


def fine_tune(net, tr: Part, aug: Part, va: Part, bb, y_fit, fit_args, name: str, offset: int) -> pd.DataFrame:
    """Second phase: unfreeze the top `fine_tune_layers` layers of the base and train end to end at a low rate."""
    import keras

    net.base.trainable = True
    for layer in net.base.layers[: -bb.fine_tune_layers]:
        layer.trainable = False
    for layer in net.base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    x = load_batch(tr.paths + aug.paths, bb.input_size)
    val = (load_batch(va.paths, bb.input_size), va.y)
    hist, _ = fit(net.full, x, y_fit, val, bb.fine_tune_learning_rate, bb.fine_tune_epochs, label=f"fine-tune {name}", **fit_args)
    hist["epoch"] += offset
    hist["phase"] = "fine_tune"
    return hist


def train_end_to_end(p: Params, name: str, net, tr: Part, aug: Part, va: Part, y_fit, fit_args: dict) -> Trained:
    """The reference CNN trained whole on the images (train and augmented copies), early stopping on val."""
    bb = setting(p, name)
    x_val = load_batch(va.paths, bb.input_size)
    history, best = fit(
        net.full,
        load_batch(tr.paths + aug.paths, bb.input_size),
        y_fit,
        (x_val, va.y),
        bb.learning_rate,
        bb.epochs,
        label=f"train {name}",
        **fit_args,
    )
    x_tr = load_batch(tr.paths, bb.input_size)

    def scores():
        return predict(net.full, x_tr), predict(net.full, x_val)

    return Trained(history, best, bb, first_rule(p), scores=scores)  # no CV to choose a rule by: the first
