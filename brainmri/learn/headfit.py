"""Train small heads on cached features in one compiled TensorFlow loop, several heads at once.

Keras `model.fit` costs about 0.1 s of framework work per epoch (callbacks, metric objects, a fresh data iterator),
more than the epoch's arithmetic. Here every epoch of every head runs inside a single `tf.function`: the same
mini-batch Adam, batch size, per-epoch shuffle, dropout, class weights and binary cross-entropy as `model.fit`, with
early stopping on validation loss done in the loop. What remains is arithmetic, and it is not small: a 512 -> 256
Dense layer over ~1,000 rows for 100 epochs is ~55 GFLOP of matrix products per head plus an Adam pass over its
131k weights at every step; 2048-d features (ResNet50V2) cost four times that.

Hand-written rather than a library loop because the heads are trained side by side (the cross-validation folds and
the final head, or later the points of a grid): their weights are stacked on a leading head axis, each head steps
through its own training rows, and a head whose epoch has no rows left, or which has stopped, skips the Adam update.
Keras's Adam updates whole variables and cannot skip one slice, so its update rule is written out below (the same
formula and constants as keras.optimizers.Adam), and so are the two-layer head's gradients. The heads are
independent: each one's shuffle and dropout draw from its own seed, so a head trains the same alone or in a group, up
to float rounding.

Where the time goes (benchmarks/head_speed.py): at 2048-d features a step's two matrix products take about a third
of it, and Adam's update another half: a pass that reads the weights, both moments and the gradient and writes three
of them back, 28 bytes per weight, memory-bound. XLA fuses that update into one kernel; TensorFlow's own kernels
took 15 passes (about 2x the time).

Which heads train together, and which need not train at all (a shorter epoch twin of another head is that head's
snapshot), is planned by brainmri.learn.head_runs.

The heads are built by `build_head` (adapted Normalization, initial weights from Keras's initialisers) and trained in
place: the trained weights are assigned back into the same Keras model, which is what gets saved.

N classes (issue 31): a head with a K-unit softmax output trains in the same loop, its output kernel [H, units, K] and
bias [H, K], on the class-weighted softmax cross-entropy (`softmax_loss_and_grads`), accuracy by arg-max. A two-class
head (one sigmoid unit) runs exactly the ops it ran before: its loss, gradients and graph are unchanged.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from brainmri.core.progress import log
from brainmri.learn import head_runs

# keras.optimizers.Adam's defaults, which the old `model.fit` path used
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "selected"]
MAX_GROUP = 32  # heads per compiled run: memory grows with the heads trained together (each epoch's dropout masks and
# batches are stacked on the head axis); a 38-point grid of the augmented VGG16 model's folds, in one run, took 6.8 GB.
# Heads grouped otherwise can train in another floating-point order (a matrix product over 8 or more stacked heads
# takes another kernel than over fewer, measured on the EPYC): a head's low bits depend on its run, as on the thread count


class Rows:
    """Rows of shared feature matrices, gathered only when read (`np.asarray`): the (n, d) array a job trains on.

    A grid's jobs (every point's folds) are made before any trains, and each held its own copy of its training
    rows: about 10 MB a job for ResNet50V2 with augmented copies, 1 GB for the grid. The gathered rows are the same
    values, so nothing trained changes."""

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray]]):
        self.parts = parts  # (matrix, row indices into it), stacked in this order

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self.parts)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError("Rows are gathered on every read: an array of them is always a copy")
        out = np.concatenate([matrix[rows] for matrix, rows in self.parts])
        return out if dtype is None else out.astype(dtype)


@dataclass
class HeadJob:
    """One head to train: the Keras head (trained in place), its training and validation data, its random stream."""

    head: object  # keras.Model from build_head: [feature_scale,] head_dense, head_dropout, its output layer
    x_fit: np.ndarray | Rows  # (n, d) training features
    y_fit: np.ndarray  # (n,) labels: 0/1 for a sigmoid head, 0..K-1 (label_names order) for a K-class softmax head
    x_val: np.ndarray  # (m, d) validation features, read each epoch (early stopping reads their loss)
    y_val: np.ndarray  # (m,)
    class_weight: dict[int, float] | None  # as for model.fit: per-class weights of the training loss
    seed: int  # its shuffle and dropout stream


@dataclass
class HeadResult:
    history: pd.DataFrame  # one row per epoch run, HISTORY_COLUMNS
    best: int  # the 1-based epoch whose weights the head now holds


def n_softmax(head) -> int:
    """K for a head with a K-class softmax output; 0 for a two-class head's single sigmoid unit."""
    from brainmri.learn.models import output_layer

    units = int(output_layer(head).units)
    return 0 if units == 1 else units


def _head_arrays(head) -> tuple[np.ndarray, ...]:
    """(W1, b1, w2, b2, mean, 1/std, dropout rate) of a build_head model; a head without Normalization gets 0 and 1.
    A sigmoid head's w2 is [units] and b2 a scalar; a K-class softmax head's w2 is [units, K] and b2 [K]."""
    from brainmri.learn.models import output_layer

    dense, out = head.get_layer("head_dense"), output_layer(head)
    (w1, b1), (w2, b2) = dense.get_weights(), out.get_weights()
    mean, scale = _scaling(head, w1.shape[0])
    if not n_softmax(head):
        w2, b2 = w2.reshape(-1), b2.reshape(())
    return w1, b1, w2, b2, mean, scale, float(head.get_layer("head_dropout").rate)


def _scaling(head, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1/std) of the head's Normalization layer, float32; 0 and 1 without one."""
    import keras

    if "feature_scale" not in [layer.name for layer in head.layers]:
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    norm = head.get_layer("feature_scale")
    mean = np.asarray(norm.mean, np.float32).reshape(d)
    # keras.layers.Normalization divides by max(sqrt(variance), epsilon)
    scale = 1.0 / np.maximum(np.sqrt(np.asarray(norm.variance, np.float32).reshape(d)), keras.backend.epsilon())
    return mean, scale.astype(np.float32)


def _pad(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def fit_heads(jobs: list[HeadJob], lr, epochs, patience: int, batch: int, l2=0.0, linear_c=1.0) -> list[HeadResult]:
    """Train every job's head on its own data for its `epochs` epochs in compiled runs, keeping the last epoch;
    with `patience` > 0, stop a head after `patience` epochs without a lower validation loss and keep its best epoch
    (keras.callbacks.EarlyStopping(monitor='val_loss', restore_best_weights=True)). A linear head (no hidden layer)
    is a logistic regression at scikit-learn's C `linear_c`, fitted to convergence (`fit_linear`).

    `lr`, `epochs`, `l2` and `linear_c` are one value for every head or one per job (the points of a settings grid); each head's
    dropout rate is its own Dropout layer's. Heads of one width (features x units x classes) train side by side, in the
    compiled runs head_runs.plan_runs cuts; with `patience` 0 a head that is another's first epochs is not trained but
    given that head's weights after its own epochs (head_runs.epoch_twins).

    A two-class head (one sigmoid unit) minimises the class-weighted binary cross-entropy; a K-class head (softmax
    over K units, labels 0..K-1) the class-weighted softmax cross-entropy, with the same batches, dropout, Adam and
    early stopping, and accuracy by arg-max."""
    if not jobs:
        return []
    lrs = np.broadcast_to(np.asarray(lr, np.float32), (len(jobs),))
    eps = np.broadcast_to(np.asarray(epochs, np.int32), (len(jobs),))
    l2s = np.broadcast_to(np.asarray(l2, np.float32), (len(jobs),))
    cs = np.broadcast_to(np.asarray(linear_c, np.float64), (len(jobs),))
    shapes: dict[tuple, list[int]] = {}
    results: list[HeadResult | None] = [None] * len(jobs)
    for i, j in enumerate(jobs):
        if is_linear(j.head):
            results[i] = fit_linear(j, float(cs[i]))
        else:
            shapes.setdefault((*j.head.get_layer("head_dense").kernel.shape, n_softmax(j.head)), []).append(i)
    twins: dict[int, int] = {}  # a head that is another's first epochs (head_runs.epoch_twins) -> that head
    if patience == 0:  # with early stopping the epoch a head keeps depends on its epoch count: no twins
        memo: dict[int, tuple] = {}
        for same in shapes.values():
            keys = [_twin_key(jobs[i], lrs[i], l2s[i], memo) for i in same]
            found = head_runs.epoch_twins(keys, [int(eps[i]) for i in same])
            twins.update({same[a]: same[b] for a, b in found.items()})
    runs = []
    for same in shapes.values():  # heads of one width (features x units x classes) train together
        train = [i for i in same if i not in twins]
        plan = head_runs.plan_runs([len(jobs[i].x_fit) for i in train], [int(eps[i]) for i in train], batch, MAX_GROUP)
        runs += [[train[k] for k in run] for run in plan]
    snapshots: dict[int, dict[int, tuple]] = {}
    for k, idx in enumerate(runs):
        snaps = [sorted({int(eps[t]) for t, j in twins.items() if j == i and eps[t] < eps[i]}) for i in idx]
        if len(jobs) > 1:  # progress on long work: a grid's compiled runs take minutes each on 2 cores
            log.info("heads: compiled run %d of %d: %d heads (and %d twins they stand for), up to %d epochs", k + 1, len(runs),
                     len(idx), sum(j in idx for j in twins.values()), int(eps[idx].max()))  # fmt: skip
        out = _fit_group([jobs[i] for i in idx], lrs[idx], eps[idx], patience, batch, l2s[idx], snaps)
        for i, (r, taken) in zip(idx, out, strict=True):
            results[i], snapshots[i] = r, taken
    for t, j in twins.items():
        results[t] = _twin_result(jobs[t], jobs[j], results[j], snapshots[j], int(eps[t]))
    return results


def _twin_key(job: HeadJob, lr: float, l2: float, memo: dict[int, tuple]) -> bytes:
    """Everything a head's first epochs depend on but their count (head_runs.epoch_twins): its initial weights,
    scaling and dropout rate, its rows, labels, class weights, validation rows, random stream, learning rate and
    penalty. Equal keys, equal first epochs: the loop draws each epoch's shuffle and dropout from the head's stream
    by epoch number."""
    h = hashlib.blake2b(digest_size=16)
    for a in _head_arrays(job.head):
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    parts = job.x_fit.parts if isinstance(job.x_fit, Rows) else [(np.asarray(job.x_fit), None)]
    for matrix, rows in parts:  # a Rows is hashed by its matrices and row indices: the rows themselves are not gathered
        h.update(_digest(matrix, memo))
        h.update(b"all" if rows is None else repr(np.shape(rows)).encode() + np.asarray(rows, np.int64).tobytes())
    for a in (job.y_fit, job.x_val, job.y_val):
        h.update(repr(np.shape(a)).encode() + np.ascontiguousarray(a, np.float32).tobytes())
    h.update(repr((sorted((job.class_weight or {}).items()), job.seed, float(lr), float(l2))).encode())
    return h.digest()


def _digest(matrix: np.ndarray, memo: dict[int, tuple]) -> bytes:
    """A feature matrix's content digest, shape and dtype included; each matrix hashed once per `memo` (by identity,
    the matrix kept alive beside its digest, so its address cannot be reused meanwhile)."""
    if id(matrix) not in memo:
        m = np.ascontiguousarray(matrix)
        memo[id(matrix)] = (matrix, hashlib.blake2b(repr((m.shape, m.dtype.str)).encode() + m.tobytes(), digest_size=16).digest())
    return memo[id(matrix)][1]


def _twin_result(job: HeadJob, longer: HeadJob, trained: HeadResult, taken: dict[int, tuple], epochs: int) -> HeadResult:
    """Head `job`, the first `epochs` epochs of `longer` (trained, with its weights `taken` after each shorter twin's
    epochs): those weights assigned into its own Keras head, and the first `epochs` rows of the history."""
    if epochs in taken:
        _assign(job.head, taken[epochs])
    else:  # as many epochs: the longer head's own weights
        _assign(job.head, _head_arrays(longer.head)[:4])
    frame = trained.history.iloc[:epochs].copy().reset_index(drop=True)
    frame["selected"] = frame["epoch"] == epochs
    return HeadResult(frame, epochs)


def is_linear(head) -> bool:
    """A head without a hidden layer (build_head with dense 0)."""
    return "head_dense" not in [layer.name for layer in head.layers]


def scaling(x_fit: np.ndarray | Rows) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance of `x_fit`, computed in float64 and kept in float32, as a linear head's
    Normalization layer holds them (keras's own adapt sums in float32: on nearly constant features, such as many of
    the real set's ResNet50V2 features, its variance and scikit-learn's differ, and so did the regressions fitted on
    them, pooled CV AUC 0.7283 against 0.7292)."""
    x = np.asarray(x_fit, np.float64)
    return x.mean(0).astype(np.float32), x.var(0).astype(np.float32)


def standardise(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """`x` standardised in float32 arithmetic as keras.layers.Normalization computes it, (x - mean) divided by
    max(sqrt(var), epsilon), returned as float64: the inputs a linear head's regression is fitted on, and the CV
    report's logistic-regression baseline too, so the two are the same model."""
    import keras

    x = np.asarray(x, np.float32)
    return ((x - mean) / np.maximum(np.sqrt(var), np.float32(keras.backend.epsilon()))).astype(np.float64)


def _set_scaling(head, x_fit: np.ndarray | Rows) -> tuple[np.ndarray, np.ndarray]:
    """`scaling` of `x_fit` written into the head's Normalization layer; returns it."""
    mean, var = scaling(x_fit)
    norm = head.get_layer("feature_scale")
    norm.set_weights([mean.reshape(np.shape(norm.adapt_mean)), var.reshape(np.shape(norm.adapt_variance)), *norm.get_weights()[2:]])
    norm.finalize_state()
    return mean, var


def fit_linear(job: HeadJob, c: float) -> HeadResult:
    """A linear head fitted as scikit-learn's logistic regression (L-BFGS, to convergence) on the features
    standardised as its Normalization layer computes them (`standardise`), at inverse penalty `c`: it minimises `c`
    times the class-weighted sum of log losses plus half the squared weights; the intercept is not penalised. Its
    coefficients go into the Keras head, so the saved model and its ONNX export compute the same probabilities. With
    class weights 'balanced' and c = 1 (scikit-learn's default) on a fold's training part, it is the CV report's
    logistic-regression baseline, exactly. A K-class head is the multinomial logistic regression
    (`_fit_softmax_linear`)."""
    from sklearn.linear_model import LogisticRegression

    if n_softmax(job.head):
        return _fit_softmax_linear(job, c)
    stats = _set_scaling(job.head, job.x_fit)
    xs, y = standardise(job.x_fit, *stats), np.asarray(job.y_fit).reshape(-1)
    cw = job.class_weight or {0: 1.0, 1: 1.0}
    sw = np.where(y > 0.5, cw[1], cw[0])
    model = LogisticRegression(C=c, max_iter=5000).fit(xs, y, sample_weight=sw)
    out = job.head.get_layer("tumour_probability")
    out.set_weights([model.coef_.reshape(-1, 1).astype(np.float32), model.intercept_.astype(np.float32)])
    row = {"epoch": 1, **_linear_scores(model, xs, y, sw, "")}
    row.update(_linear_scores(model, standardise(job.x_val, *stats), np.asarray(job.y_val).reshape(-1), None, "val_"))
    return HeadResult(pd.DataFrame([{**row, "selected": True}], columns=HISTORY_COLUMNS), 1)


def _fit_softmax_linear(job: HeadJob, c: float) -> HeadResult:
    """A K-class linear head: scikit-learn's multinomial logistic regression (L-BFGS, to convergence) on the
    standardised features at inverse penalty `c`, as the two-class head (`c` times the class-weighted sum of log
    losses plus half of every class's squared weights). Its coefficients go into the softmax
    Dense layer (kernel coef_.T, bias intercept_), so the Keras head's outputs are predict_proba's."""
    from sklearn.linear_model import LogisticRegression

    from brainmri.learn.models import output_layer

    k = n_softmax(job.head)
    stats = _set_scaling(job.head, job.x_fit)
    xs, y = standardise(job.x_fit, *stats), np.asarray(job.y_fit).astype(int).reshape(-1)
    sw = _row_weights(job.class_weight, y, k)
    model = LogisticRegression(C=c, max_iter=5000).fit(xs, y, sample_weight=sw)
    coef, intercept = _all_classes(model, k, xs.shape[1])
    output_layer(job.head).set_weights([coef.T.astype(np.float32), intercept.astype(np.float32)])
    y_val = np.asarray(job.y_val).astype(int).reshape(-1)
    row = {"epoch": 1, **_softmax_linear_scores(model, k, xs, y, sw, "")}
    row.update(_softmax_linear_scores(model, k, standardise(job.x_val, *stats), y_val, None, "val_"))
    return HeadResult(pd.DataFrame([{**row, "selected": True}], columns=HISTORY_COLUMNS), 1)


def _row_weights(cw: dict | None, y: np.ndarray, k: int) -> np.ndarray:
    """Each training row's class weight (1 without class weights), for labels 0..k-1."""
    table = np.array([(cw or {}).get(c, 1.0) for c in range(k)], np.float64)
    return table[np.asarray(y).astype(int)]


def _all_classes(model, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(coef [K, d], intercept [K]) with a row for every class 0..k-1. A class absent from the fitted rows (a small
    fold can lack one) gets weights 0 and a very low intercept: probability about 0, as no training image had it."""
    coef, intercept = np.zeros((k, d)), np.full(k, -30.0)  # exp(-30) ~ 1e-13: a class never seen is all but ruled out
    if len(model.classes_) == 2:  # scikit-learn fits two present classes as one binary logit (the second's)
        coef[model.classes_[1]], intercept[model.classes_[1]] = model.coef_[0], model.intercept_[0]
        coef[model.classes_[0]], intercept[model.classes_[0]] = 0.0, 0.0
        return coef, intercept
    coef[model.classes_], intercept[model.classes_] = model.coef_, model.intercept_
    return coef, intercept


def _softmax_linear_scores(model, k: int, xs, y, sw, prefix: str) -> dict:
    """Keras's history columns for a fitted multinomial logistic regression: (weighted) log loss and arg-max accuracy."""
    from brainmri.learn import multiclass

    prob = np.zeros((len(xs), k))
    prob[:, model.classes_] = model.predict_proba(xs)
    return {f"{prefix}loss": multiclass.log_loss(y, prob, sw), f"{prefix}accuracy": multiclass.accuracy(y, prob)}


def _linear_scores(model, xs, y, sw, prefix: str) -> dict:
    """Keras's history columns for a fitted logistic regression: (weighted) log loss and accuracy."""
    from sklearn.metrics import log_loss

    prob = model.predict_proba(xs)[:, 1]
    loss = float(log_loss(y, np.clip(prob, 1e-7, 1 - 1e-7), sample_weight=sw, labels=[0, 1]))
    return {f"{prefix}loss": loss, f"{prefix}accuracy": float(np.mean((prob >= 0.5) == (y > 0.5)))}


def _fit_group(
    jobs: list[HeadJob], lrs: np.ndarray, eps: np.ndarray, patience: int, batch: int, l2s: np.ndarray, snaps: list[list[int]]
) -> list[tuple[HeadResult, dict[int, tuple]]]:
    """One compiled run: each job's result, and its weights after each epoch count in `snaps` (its shorter twins')."""
    import tensorflow as tf

    arrays = [_head_arrays(j.head) for j in jobs]
    for j in jobs:
        if len(j.x_fit) == 0 or len(j.x_val) == 0:
            raise ValueError("fit_heads: every head needs at least one training and one validation row")
    x, y, fit_rows, n_fit, weights, val_rows, n_val = _row_layout(jobs, batch)
    stack = lambda k: tf.constant(np.stack([a[k] for a in arrays]).astype(np.float32))  # noqa: E731
    out = _loop(
        tf.constant(x),
        tf.constant(y),
        tf.constant(fit_rows),
        tf.constant(n_fit),
        tf.constant(weights),
        tf.constant(val_rows),
        tf.constant(n_val),
        tf.constant(np.array([j.seed for j in jobs], np.int64)),
        [stack(k) for k in range(6)],
        tf.constant(lrs),
        tf.constant(np.array([a[-1] for a in arrays], np.float32)),
        tf.constant(eps),
        tf.constant(np.asarray(l2s, np.float32)),
        tf.constant(_pad([np.asarray(s, np.int32) for s in snaps], max(map(len, snaps)))),  # [H, S]; 0: no snapshot
        epochs=int(eps.max()),
        patience=int(patience),
        batch=int(batch),
        penalised=bool(np.any(l2s > 0)),  # traced without the penalty's ops when no head has one: as before it existed
        classes=n_softmax(jobs[0].head),  # one per group: fit_heads groups heads by width, classes included
    )
    taken = [np.asarray(t) for snap in out[4] for t in snap]  # S snapshots x 4 parameters, each [H, ...]
    return [
        (r, {e: tuple(taken[4 * s + k][i].copy() for k in range(4)) for s, e in enumerate(snaps[i])})  # not views of the run
        for i, r in enumerate(_results(jobs, out[:4]))
    ]


def _row_layout(jobs: list[HeadJob], batch: int) -> tuple[np.ndarray, ...]:
    """The group's feature rows in one pool, and each head's view of it: (x, y, fit_rows, n_fit, weights, val_rows,
    n_val), its training rows padded to whole batches (`weights` 0 past its own count) and its validation rows."""
    blocks = [(a, b) for j in jobs for a, b in ((j.x_fit, j.y_fit), (j.x_val, j.y_val))]
    x, y, where = _shared_rows(blocks)
    n_fit = np.array([len(j.x_fit) for j in jobs], np.int32)
    n_val = np.array([len(j.x_val) for j in jobs], np.int32)
    width = int(-(-n_fit.max() // batch) * batch)  # whole batches; a head's rows past its own count are masked
    fit_rows = _pad(where[0::2], width)
    val_rows = _pad(where[1::2], int(n_val.max()))
    weights = np.zeros((len(jobs), width), np.float32)
    for i, j in enumerate(jobs):
        k = n_softmax(j.head)
        if k:
            weights[i, : n_fit[i]] = _row_weights(j.class_weight, j.y_fit, k)
            continue
        cw = j.class_weight or {0: 1.0, 1: 1.0}
        weights[i, : n_fit[i]] = np.where(np.asarray(j.y_fit) > 0.5, cw[1], cw[0])
    return x, y, fit_rows, n_fit, weights, val_rows, n_val


def _shared_rows(blocks: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """One pool of the distinct (feature row, label) pairs of every block, and each block's rows as pool indices.

    A grid's heads are folds and settings over the same images, so most rows recur in every head: pooled once, a
    group of 32 heads on ResNet50V2's 2048-d features with augmented copies holds about 10 MB of rows, not 340 MB
    (and TensorFlow's copy of them as much again). Gathering a row from the pool gives the same values as before, so
    the heads train exactly as they did. Rows are matched by their bytes, hashed by Python's dict: numpy has no
    row-hash, and np.unique(axis=0) sorts every row, which costs more than hashing them once."""
    index: dict[bytes, int] = {}
    where, d = [], 0
    for x, y in blocks:
        x32, y32 = np.ascontiguousarray(x, np.float32), np.asarray(y, np.float32).reshape(-1)
        where.append(np.array([index.setdefault(r.tobytes() + v.tobytes(), len(index)) for r, v in zip(x32, y32, strict=True)], np.int64))
        d = d or x32.shape[1] * 4
    keys = list(index)
    x = np.frombuffer(b"".join(k[:d] for k in keys), np.float32).reshape(len(keys), -1)
    y = np.frombuffer(b"".join(k[d:] for k in keys), np.float32)
    return x.copy(), y.copy(), where


def _results(jobs: list[HeadJob], out) -> list[HeadResult]:
    """The compiled loop's output: each head's weights assigned back into its Keras model, and its history."""
    params, hist, run, best = out
    params, hist, run, best = [np.asarray(p) for p in params], np.asarray(hist), np.asarray(run), np.asarray(best)
    results = []
    for i, j in enumerate(jobs):
        _assign(j.head, tuple(q[i] for q in params))
        e, b = int(run[i]), int(best[i]) + 1
        frame = pd.DataFrame(hist[:e, :, i], columns=HISTORY_COLUMNS[1:5]).astype(float)
        frame.insert(0, "epoch", np.arange(1, e + 1))
        frame["selected"] = frame["epoch"] == b
        results.append(HeadResult(frame, b))
    return results


def _assign(head, params: tuple) -> None:
    """A head's trained (W1, b1, w2, b2), as the loop holds them, assigned into its Keras layers."""
    from brainmri.learn.models import output_layer

    head.get_layer("head_dense").set_weights([params[0], params[1]])
    if n_softmax(head):
        output_layer(head).set_weights([params[2], params[3]])
    else:
        output_layer(head).set_weights([params[2].reshape(-1, 1), params[3].reshape(1)])


def loss_and_grads(p, xb, yb, kept, coef, l2=None):
    """Logits [H, b], per-head loss [H] and its gradients with respect to (W1, b1, w2, b2) for stacked heads:
    dense -> relu -> dropout (`kept`: 0 or 1/(1-rate)) -> dense -> sigmoid cross-entropy, each row weighted by `coef`,
    plus `l2` [H] times the squared weights of both layers (keras.regularizers.L2 on their kernels) when given.
    Written out rather than taken from a GradientTape, which took about 20% more CPU time a step
    (benchmarks/head_speed.py); tests/test_train.py checks it against the tape."""
    import tensorflow as tf

    z = tf.matmul(xb, p[0]) + p[1][:, None]  # [H, batch, units]
    h = tf.nn.relu(z) * kept
    logits = tf.matmul(h, p[2][:, :, None])[:, :, 0] + p[3][:, None]
    loss = tf.reduce_sum(coef * tf.nn.sigmoid_cross_entropy_with_logits(labels=yb, logits=logits), axis=1)
    d_logits = coef * (tf.sigmoid(logits) - yb)  # d bce / d logits = sigmoid(logits) - label
    d_z = d_logits[:, :, None] * p[2][:, None, :] * kept * tf.cast(z > 0, tf.float32)
    grads = (
        tf.matmul(xb, d_z, transpose_a=True),  # W1 [H, d, units]
        tf.reduce_sum(d_z, axis=1),  # b1
        tf.matmul(h, d_logits[:, :, None], transpose_a=True)[:, :, 0],  # w2
        tf.reduce_sum(d_logits, axis=1),  # b2
    )
    if l2 is not None:
        loss = loss + l2 * (tf.reduce_sum(tf.square(p[0]), axis=[1, 2]) + tf.reduce_sum(tf.square(p[2]), axis=1))
        grads = (grads[0] + 2.0 * l2[:, None, None] * p[0], grads[1], grads[2] + 2.0 * l2[:, None] * p[2], grads[3])
    return logits, loss, grads


def softmax_loss_and_grads(p, xb, yb, kept, coef, l2=None):
    """`loss_and_grads` for K-class softmax heads: logits [H, b, K], per-head loss [H] and its gradients with respect
    to (W1 [H, d, u], b1 [H, u], W2 [H, u, K], b2 [H, K]). `yb` [H, b, K] is one-hot; each row's softmax
    cross-entropy is weighted by `coef` [H, b], plus `l2` [H] times the squared weights of both kernels when given.
    tests/test_train_multiclass.py checks it against a GradientTape."""
    import tensorflow as tf

    z = tf.matmul(xb, p[0]) + p[1][:, None]  # [H, batch, units]
    h = tf.nn.relu(z) * kept
    logits = tf.matmul(h, p[2]) + p[3][:, None, :]  # [H, batch, K]
    loss = tf.reduce_sum(coef * tf.nn.softmax_cross_entropy_with_logits(labels=yb, logits=logits), axis=1)
    d_logits = coef[:, :, None] * (tf.nn.softmax(logits) - yb)  # d ce / d logits = softmax(logits) - one-hot label
    d_z = tf.matmul(d_logits, p[2], transpose_b=True) * kept * tf.cast(z > 0, tf.float32)
    grads = (
        tf.matmul(xb, d_z, transpose_a=True),  # W1 [H, d, units]
        tf.reduce_sum(d_z, axis=1),  # b1
        tf.matmul(h, d_logits, transpose_a=True),  # W2 [H, units, K]
        tf.reduce_sum(d_logits, axis=1),  # b2 [H, K]
    )
    if l2 is not None:
        loss = loss + l2 * (tf.reduce_sum(tf.square(p[0]), axis=[1, 2]) + tf.reduce_sum(tf.square(p[2]), axis=[1, 2]))
        grads = (grads[0] + 2.0 * l2[:, None, None] * p[0], grads[1], grads[2] + 2.0 * l2[:, None, None] * p[2], grads[3])
    return logits, loss, grads


_TRACED: dict = {}


@functools.cache
def _adam_update():
    """Adam's update of every parameter, as keras.optimizers.Adam, for the heads where `on` [H] is 1, each at its own
    step size `alpha` [H]; one XLA-fused kernel, built once per process (traced once per shape): element-wise only,
    so the result does not depend on how XLA splits the work between threads."""
    import tensorflow as tf

    def update(p, g, m, v, on, alpha):
        def per_head(value, q):  # [H] shaped to broadcast against a stacked parameter [H, ...]
            return tf.reshape(value, [-1] + [1] * (len(q.shape) - 1))

        m = tuple(mk + per_head(on, mk) * (gk - mk) * (1 - BETA_1) for mk, gk in zip(m, g, strict=True))
        v = tuple(vk + per_head(on, vk) * (tf.square(gk) - vk) * (1 - BETA_2) for vk, gk in zip(v, g, strict=True))
        p = tuple(pk - per_head(on, pk) * (mk * per_head(alpha, pk)) / (tf.sqrt(vk) + EPSILON) for pk, mk, vk in zip(p, m, v, strict=True))
        return p, m, v

    return tf.function(update, jit_compile=True, autograph=False)


def _loop(*args, epochs: int, patience: int, batch: int, penalised: bool, classes: int = 0):
    """The compiled loop: one tf.function per setting and array shapes, each traced once (the number of heads is
    static). `classes`: K for softmax heads, 0 for sigmoid heads (the two-class graph, traced as it always was)."""
    import tensorflow as tf

    shapes = (*(tuple(a.shape) for a in args[:8]), *(tuple(a.shape) for a in args[8]), tuple(args[13].shape))
    key = (epochs, patience, batch, penalised, *shapes)
    key = key if not classes else (*key, classes)  # a two-class key as before; softmax shapes differ anyway
    if key not in _TRACED:
        body = lambda *a: _epochs(*a, epochs=epochs, patience=patience, batch=batch, penalised=penalised, classes=classes)  # noqa: E731
        _TRACED[key] = tf.function(body, autograph=False)
    return _TRACED[key](*args)


def _epochs(x, y, fit_rows, n_fit, weights, val_rows, n_val, seeds, params, lr, rate, max_epochs, l2, snaps, **static):
    """The traced body: every epoch of every head (`_Loop`); returns (weights, history, epochs run, selected epoch,
    snapshots)."""
    epochs, patience, batch = static["epochs"], static["patience"], static["batch"]
    loop = _Loop(x, y, fit_rows, n_fit, weights, val_rows, n_val, seeds, params, lr, rate, max_epochs, epochs, patience, batch)
    loop.l2 = l2 if static["penalised"] else None
    loop.classes, loop.snaps = static["classes"], snaps
    return loop.run(params)


class _Loop:
    """The loop's fixed inputs and, as methods, the parts of an epoch: the shuffle and dropout draws, the mini-batch
    steps, the validation pass and early stopping. Stacked on a leading head axis H; built while tracing.

    `classes` is K for K-class softmax heads (labels 0..K-1 in `y`, as floats) and 0 for sigmoid heads, whose ops are
    those of the two-class loop as it was before softmax heads existed."""

    classes = 0  # set by _epochs
    snaps = None  # set by _epochs: [H, S] the epoch counts after which to keep each head's weights (0: none)

    def __init__(self, x, y, fit_rows, n_fit, weights, val_rows, n_val, seeds, params, lr, rate, max_epochs, epochs, patience, batch):
        import tensorflow as tf

        self.x, self.y, self.fit_rows, self.weights, self.n_val, self.seeds = x, y, fit_rows, weights, n_val, seeds
        self.lr, self.rate, self.max_epochs = lr, rate, max_epochs
        self.epochs, self.patience, self.batch = epochs, patience, batch
        self.heads, self.width = fit_rows.shape[0], fit_rows.shape[1]
        self.steps = self.width // batch
        self.units = params[0].shape[-1]
        self.mean, self.scale = params[4], params[5]
        self.fit_mask = tf.cast(tf.range(self.width)[None, :] < n_fit[:, None], tf.float32)
        self.val_mask = tf.cast(tf.range(val_rows.shape[1])[None, :] < n_val[:, None], tf.float32)
        self.x_val = (tf.gather(x, val_rows) - self.mean[:, None]) * self.scale[:, None]  # [H,V,d]: fixed, so standardised once
        self.y_val = tf.gather(y, val_rows)

    def per_head(self, param, value):
        """`value` [H] shaped to broadcast against a stacked parameter [H, ...]."""
        import tensorflow as tf

        return tf.reshape(value, [self.heads] + [1] * (len(param.shape) - 1))

    def forward(self, p, xs):
        """Validation logits (no dropout), with the same batched products as `loss_and_grads`."""
        import tensorflow as tf

        h = tf.nn.relu(tf.matmul(xs, p[0]) + p[1][:, None])
        if self.classes:
            return tf.matmul(h, p[2]) + p[3][:, None, :]
        return tf.matmul(h, p[2][:, :, None])[:, :, 0] + p[3][:, None]

    def one_hot(self, labels):
        """Float labels 0..K-1 [H, n] as one-hot rows [H, n, K]."""
        import tensorflow as tf

        return tf.one_hot(tf.cast(labels, tf.int32), self.classes)

    def step_loss(self, p, xb, yb, kept, coef):
        """`loss_and_grads` of the heads' kind: sigmoid cross-entropy, or softmax cross-entropy over K classes."""
        if self.classes:
            return softmax_loss_and_grads(p, xb, self.one_hot(yb), kept, coef, self.l2)
        return loss_and_grads(p, xb, yb, kept, coef, self.l2)

    def row_loss(self, labels, logits):
        """Each row's unweighted cross-entropy [H, n]."""
        import tensorflow as tf

        if self.classes:
            return tf.nn.softmax_cross_entropy_with_logits(labels=self.one_hot(labels), logits=logits)
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)

    def correct(self, logits, labels):
        """1 where a row's decision is its label: logit > 0 for sigmoid heads, the arg-max class for softmax heads."""
        import tensorflow as tf

        if self.classes:
            return tf.cast(tf.equal(tf.cast(tf.argmax(logits, axis=-1), tf.float32), labels), tf.float32)
        return tf.cast(tf.equal(tf.cast(logits > 0, tf.float32), labels), tf.float32)

    def draws(self, offset, shape):
        """Uniform draws from each head's own stream: independent of which other heads train beside it."""
        import tensorflow as tf

        seeds = self.seeds
        return tf.stack([tf.random.stateless_uniform(shape, tf.stack([seeds[h], offset]), alg="philox") for h in range(self.heads)])

    def shuffle_and_dropout(self, epoch):
        """The epoch's batch order [H, steps, batch] (a fresh permutation of each head's own rows) and dropout
        multipliers [H, steps, batch, units]."""
        import tensorflow as tf

        heads, rate = self.heads, self.rate
        e64 = tf.cast(epoch, tf.int64)
        keys = tf.where(self.fit_mask > 0, self.draws(2 * e64, [self.width]), 2.0)
        order = tf.reshape(tf.argsort(keys, axis=1, stable=True), [heads, self.steps, self.batch])
        keep = tf.cast(self.draws(2 * e64 + 1, [self.steps, self.batch, self.units]) >= rate[:, None, None, None], tf.float32)
        keep = keep / (1.0 - rate)[:, None, None, None]  # inverted dropout (keras.layers.Dropout), at each head's rate
        return order, keep

    def one_step(self, s, state, order, keep, live):
        """Mini-batch `s` of the epoch: each live head's loss on its batch, its gradients and Adam step."""
        import tensorflow as tf

        x, y, mean, scale = self.x, self.y, self.mean, self.scale
        p, m, v, t, sums = state
        pos = tf.gather(order, s, axis=1)  # [H, batch]: positions in each head's padded row list
        mask = tf.gather(self.fit_mask, pos, batch_dims=1)
        w = tf.gather(self.weights, pos, batch_dims=1)
        rows = tf.gather(self.fit_rows, pos, batch_dims=1)
        xb = (tf.gather(x, rows) - mean[:, None]) * scale[:, None]
        yb = tf.gather(y, rows)
        n = tf.reduce_sum(mask, axis=1)
        kept = tf.gather(keep, s, axis=1)
        coef = mask * w / tf.maximum(n, 1.0)[:, None]  # Keras: a weighted sum over the batch size
        logits, loss, grads = self.step_loss(p, xb, yb, kept, coef)
        on = live * tf.cast(n > 0, tf.float32)  # 1 where this head takes an Adam step now
        t = t + on
        alpha = self.lr * tf.sqrt(1.0 - tf.pow(BETA_2, tf.maximum(t, 1.0))) / (1.0 - tf.pow(BETA_1, tf.maximum(t, 1.0)))
        new_p, new_m, new_v = _adam_update()(p, grads, m, v, on, alpha)
        correct = self.correct(logits, yb)
        sums = sums + tf.stack([loss * n, n, tf.reduce_sum(mask * correct, axis=1)])  # Keras: class weights weigh the loss, not accuracy
        return s + 1, (tuple(new_p), tuple(new_m), tuple(new_v), t, sums)

    def steps_compiled(self, p, m, v, t, order, keep, live):
        """One epoch's mini-batch steps, in the same graph as the rest. Not compiled by XLA as a whole (only Adam's
        element-wise update is, see `_adam_update`): XLA's CPU runtime can give different results for the same inputs when
        it runs reductions or matrix products on several threads (jax-ml/jax#39741, on AMD CPUs), and a retrained
        model must equal the first (CI, on another CPU, once saw a retrain differ; the feature cache key was also at
        fault, see brainmri.learn.features). TensorFlow's own kernels are deterministic under
        tf.config.experimental.enable_op_determinism, which the train stage sets; that setting does not govern the
        XLA-compiled Adam update, whose determinism rests on its being element-wise (see `_adam_update`)."""
        import tensorflow as tf

        _, (p, m, v, t, sums) = tf.while_loop(
            lambda s, _: s < self.steps,
            lambda s, state: self.one_step(s, state, order, keep, live),
            (tf.constant(0), (p, m, v, t, tf.zeros([3, self.heads]))),
        )
        return p, m, v, t, sums

    def validation(self, p):
        """Each head's (val_loss, val_accuracy) [H] on its own validation rows."""
        import tensorflow as tf

        y_val, val_mask, n_val = self.y_val, self.val_mask, self.n_val
        v_logits = self.forward(p, self.x_val)
        v_bce = tf.reduce_sum(val_mask * self.row_loss(y_val, v_logits), axis=1)
        v_correct = self.correct(v_logits, y_val)
        val_loss = v_bce / tf.cast(n_val, tf.float32)
        val_acc = tf.reduce_sum(val_mask * v_correct, axis=1) / tf.cast(n_val, tf.float32)
        return val_loss, val_acc

    def early_stopping(self, epoch, p, val_loss, running, best_p, best_loss, best_epoch, wait, stopped):
        """keras EarlyStopping(monitor='val_loss', patience, restore_best_weights=True), per head: the weights and
        epoch to keep so far, the best loss, the epochs since it, and whether the head has stopped."""
        import tensorflow as tf

        better = tf.logical_and(running, val_loss < best_loss)
        take = tf.logical_and(running, tf.logical_or(better, tf.equal(epoch, 0)))  # Keras holds epoch 1's weights first
        best_p = tuple(tf.where(self.per_head(q, take), q, b) for q, b in zip(p, best_p, strict=True))
        best_loss = tf.where(better, val_loss, best_loss)
        best_epoch = tf.where(take, epoch, best_epoch)
        wait = tf.where(better, 0, tf.where(running, wait + 1, wait))
        stopped = tf.logical_or(stopped, tf.logical_and(wait >= self.patience, epoch > 0))
        return best_p, best_loss, best_epoch, wait, stopped

    def snapshot(self, epoch, p, kept):
        """Each head's weights after epoch `epoch` where that is one of its snapshot counts, else what `kept` held:
        what its shorter epoch twins would end with (head_runs.epoch_twins)."""
        import tensorflow as tf

        out = []
        for s, held in enumerate(kept):
            take = tf.equal(self.snaps[:, s], epoch + 1)
            out.append(tuple(tf.where(self.per_head(q, take), q, h) for q, h in zip(p, held, strict=True)))
        return tuple(out)

    def one_epoch(self, epoch, p, m, v, t, best_p, best_loss, best_epoch, wait, stopped, run, hist, *kept):
        import tensorflow as tf

        running = tf.logical_not(stopped)
        live = tf.cast(running, tf.float32)
        order, keep = self.shuffle_and_dropout(epoch)
        p, m, v, t, sums = self.steps_compiled(p, m, v, t, order, keep, live)
        val_loss, val_acc = self.validation(p)
        row = tf.stack([sums[0] / sums[1], sums[2] / sums[1], val_loss, val_acc])
        hist = tf.tensor_scatter_nd_update(hist, tf.reshape(epoch, [1, 1]), row[None])
        run = tf.where(running, epoch + 1, run)
        if self.patience > 0:
            best_p, best_loss, best_epoch, wait, stopped = self.early_stopping(
                epoch, p, val_loss, running, best_p, best_loss, best_epoch, wait, stopped
            )
        else:
            best_epoch = run - 1
        stopped = tf.logical_or(stopped, epoch + 1 >= self.max_epochs)  # a head's own epoch count: it takes no further step
        kept = (self.snapshot(epoch, p, kept[0]),) if kept else ()  # no snapshot ops in a run without twins
        return epoch + 1, p, m, v, t, best_p, best_loss, best_epoch, wait, stopped, run, hist, *kept

    def run(self, params):
        """Every epoch until each head has stopped: (the weights it keeps, history [epochs, 4, H], epochs run, selected
        epoch, and its weights after each snapshot count: S tuples of 4), per head."""
        import tensorflow as tf

        heads = self.heads
        start = tuple(params[:4])  # W1 [H,d,u], b1 [H,u], w2 [H,u], b2 [H]; softmax heads: w2 [H,u,K], b2 [H,K]
        zeros = tuple(tf.zeros_like(q) for q in start)
        init = (
            tf.constant(0),
            start,
            zeros,
            zeros,
            tf.zeros([heads]),  # Adam's step count, per head
            start,
            tf.fill([heads], np.float32(np.inf)),
            tf.zeros([heads], tf.int32),
            tf.zeros([heads], tf.int32),
            tf.zeros([heads], tf.bool),
            tf.zeros([heads], tf.int32),
            tf.zeros([self.epochs, 4, heads]),  # per epoch: loss, accuracy, val_loss, val_accuracy of each head
        )
        if self.snaps.shape[1]:
            init = (*init, tuple(start for _ in range(self.snaps.shape[1])))
        cond = lambda e, *rest: tf.logical_and(e < self.epochs, tf.logical_not(tf.reduce_all(rest[8])))  # noqa: E731
        out = tf.while_loop(cond, self.one_epoch, init)
        p, best_p, best_epoch, run, hist = out[1], out[5], out[7], out[10], out[11]
        return (best_p if self.patience > 0 else p), hist, run, best_epoch, (out[12] if len(out) > 12 else ())
