import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from factory import REPO, make_project, tiny_training
from PIL import Image
from sklearn.metrics import log_loss, roc_auc_score

from brainmri.config import GRID as SETTINGS
from brainmri.config import load_params
from brainmri.core.errors import ConfigError
from brainmri.intake.parts import split_part
from brainmri.intake.preprocess import load_batch
from brainmri.learn import calibration, features
from brainmri.learn.fitting import class_weights, fit
from brainmri.learn.headfit import HeadJob, fit_heads
from brainmri.learn.models import build_head, build_network, load_model
from tasks.train import train

HED = REPO.parent / "shared" / "weights" / "vgg16_hed_notop.weights.h5"


def test_feature_cache_gives_the_stacked_models_result(small_run, tmp_path):
    """Training the head on cached features == training the stacked model (frozen base) on the images."""
    import keras

    p, *_ = small_run
    net = build_network(p, "vgg16", seed=3)
    paths = sorted(p.path("ingest_images").iterdir())[:24]
    x = load_batch(paths, 32)
    y = np.arange(len(paths)) % 2
    feats = features.extract(p, "vgg16", net.extractor, paths, "test")
    assert np.allclose(feats, np.asarray(net.extractor(x, training=False)), atol=1e-5)

    head_a = build_head(feats.shape[1], p.backbones["vgg16"], seed=3, adapt_on=feats)
    head_b = build_head(feats.shape[1], p.backbones["vgg16"], seed=3, adapt_on=feats)
    head_b.set_weights(head_a.get_weights())
    initial = [w.copy() for w in head_a.get_weights()]
    net.attach(head_b)
    for model, data in ((head_a, feats), (net.full, x)):
        keras.utils.set_random_seed(5)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        model.fit(data, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
    moved = max(float(np.abs(w1 - w0).max()) for w1, w0 in zip(head_a.get_weights(), initial, strict=True))
    differ = max(float(np.abs(wa - wb).max()) for wa, wb in zip(head_a.get_weights(), head_b.get_weights(), strict=True))
    assert moved > 1e-3 and differ < moved / 100  # same training up to float32 rounding, far below what training changed
    assert np.allclose(np.asarray(head_a(feats)), np.asarray(net.full(x)), atol=1e-4)


def test_features_from_the_worker_process_are_the_bytes_computed_in_this_one(small_run, monkeypatch):
    """The train stage computes features in a spawned worker (its activations' memory then goes back to the OS):
    the cache entries it writes are those the same extractor writes in this process, byte for byte."""
    p, *_ = small_run
    net = build_network(p, "vgg16", seed=2)
    folder = features.cache_folder(p, "vgg16", net.extractor)
    paths = sorted(p.path("ingest_images").iterdir())
    parts = {"a": paths[:20], "b": paths[10:27]}  # overlapping lists: the shared images are computed once
    entries = {}
    for where in ("worker", "here"):
        shutil.rmtree(folder, ignore_errors=True)
        if where == "here":
            monkeypatch.setattr(features, "compute", lambda ext, fol, todo, sizes, bf16: features.fill(ext, fol, todo, sizes))
        got = features.extract_parts(p, "vgg16", net.extractor, parts)
        entries[where] = {e.name: e.read_bytes() for e in folder.glob("*.npy")}
        assert [len(v) for v in got.values()] == [20, 17] and np.isfinite(got["b"]).all()
    assert len(entries["worker"]) == len({f.read_bytes() for f in paths[:27]}) and entries["worker"] == entries["here"]


def test_cache_is_reused_and_a_tampered_entry_is_recomputed(small_run):
    p, *_ = small_run
    net = build_network(p, "vgg16", seed=1)
    paths = sorted(p.path("ingest_images").iterdir())[:6]
    folder = features.cache_folder(p, "vgg16", net.extractor)
    shutil.rmtree(folder, ignore_errors=True)
    first = features.extract(p, "vgg16", net.extractor, paths, "test")
    entries = sorted(folder.glob("*.npy"))
    assert len(entries) == 6
    data = bytearray(entries[0].read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes +inf
    entries[0].write_bytes(bytes(data))
    entries[1].unlink()  # as if killed before writing it
    again = features.extract(p, "vgg16", net.extractor, paths, "test")
    assert np.allclose(first, again, atol=1e-5) and np.isfinite(again).all()  # recomputed, not the tampered value
    assert len(list(folder.glob("*.npy"))) == 6


@pytest.fixture(scope="module")
def vgg16_spec(tmp_path_factory):
    """The repository's vgg16 backbone entry: a head's dense size, dropout and the rest."""
    spec = load_params(make_project(tmp_path_factory.mktemp("spec")) / "params.yaml").backbones["vgg16"]
    return spec.at({"dense": 256, "l2": 0.0})  # the hidden-layer head, unpenalised: what these tests train


def noise_heads(spec, n_heads=1, dropout=0.0, seed=0, dense=64):
    """Heads over pure-noise features: with no signal, val loss soon rises while train loss keeps falling."""
    import keras

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 16)).astype("float32"), rng.integers(0, 2, 64)
    xv, yv = rng.normal(size=(32, 16)).astype("float32"), rng.integers(0, 2, 32)
    keras.utils.set_random_seed(0)
    bb = spec.model_copy(update={"dense": dense, "dropout": dropout})
    heads = [build_head(16, bb, seed=0, adapt_on=x) for _ in range(n_heads)]
    for h in heads[1:]:
        h.set_weights(heads[0].get_weights())  # the same start
    return [HeadJob(h, x, y, xv, yv, None, seed + i) for i, h in enumerate(heads)]


def val_bce(job) -> float:
    prob = np.asarray(job.head(job.x_val)).reshape(-1)
    return float(log_loss(job.y_val, prob, labels=[0, 1]))


def test_early_stopping_keeps_the_best_validation_epoch(vgg16_spec):
    (job,) = noise_heads(vgg16_spec)
    (res,) = fit_heads([job], lr=0.01, epochs=30, patience=5, batch=16)
    hist, best = res.history, res.best
    assert list(hist.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "selected"]
    assert best == int(hist["val_loss"].idxmin()) + 1 and best < len(hist) < 30  # stopped early...
    assert len(hist) == best + 5  # ...exactly `patience` epochs after the best, as keras EarlyStopping
    assert hist["selected"].tolist() == [e == best for e in hist["epoch"]]
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[best - 1]  # training kept improving: not selected on train loss
    assert val_bce(job) == pytest.approx(hist["val_loss"].min(), abs=1e-4)  # the head holds the best epoch's weights


def test_patience_zero_trains_every_epoch_and_keeps_the_last(vgg16_spec):
    (job,) = noise_heads(vgg16_spec)  # the same noise: with patience it stops early
    (res,) = fit_heads([job], lr=0.01, epochs=30, patience=0, batch=16)
    hist = res.history
    assert len(hist) == 30 and res.best == 30 and hist["selected"].tolist() == [False] * 29 + [True]
    assert hist["val_loss"].iloc[-1] > hist["val_loss"].min()  # the last epoch is kept although val loss was lower before
    assert val_bce(job) == pytest.approx(hist["val_loss"].iloc[-1], abs=1e-4)


def test_same_seed_same_weights_and_heads_train_alone_as_in_a_group(vgg16_spec):
    """Seeded shuffle and dropout: a rerun is bit-identical; a head trained beside others equals it trained alone."""
    runs = []
    for group in (1, 1, 3):
        jobs = noise_heads(vgg16_spec, n_heads=group, dropout=0.5, seed=7)
        results = fit_heads(jobs, lr=0.01, epochs=12, patience=3, batch=16)
        runs.append((jobs[0].head.get_weights(), results[0].history, [j.head.get_weights() for j in jobs]))
    (w1, h1, _), (w2, h2, _), (w3, h3, group) = runs
    assert all(np.array_equal(a, b) for a, b in zip(w1, w2, strict=True)) and h1.equals(h2)
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(w1, w3, strict=True))
    assert np.allclose(h1.to_numpy(float), h3.to_numpy(float), atol=1e-5)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(group[0], group[1], strict=True))
    assert moved > 1e-2  # seeds 7 and 8 in one group: different shuffles and dropout, different heads


def test_the_written_out_head_gradients_equal_automatic_differentiation():
    """brainmri.learn.headfit.loss_and_grads against a GradientTape over the same loss: stacked heads with dropout, class
    weights, a padded (zero-weight) row, and pre-activations on both sides of relu's kink."""
    import tensorflow as tf

    from brainmri.learn.headfit import loss_and_grads

    rng = np.random.default_rng(3)
    heads, b, d, u = 3, 8, 12, 5
    p = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in [(heads, d, u), (heads, u), (heads, u), (heads,)]]
    xb = tf.constant(rng.normal(size=(heads, b, d)).astype(np.float32))
    yb = tf.constant((rng.random((heads, b)) < 0.5).astype(np.float32))
    kept = tf.constant(((rng.random((heads, b, u)) >= 0.4) / 0.6).astype(np.float32))
    coef = rng.uniform(0.5, 1.5, (heads, b)).astype(np.float32)
    coef[:, -1] = 0.0  # a padding row: no weight, no gradient
    coef = tf.constant(coef / b)
    logits, loss, grads = loss_and_grads(p, xb, yb, kept, coef)
    with tf.GradientTape() as tape:
        tape.watch(p)
        h = tf.nn.relu(tf.einsum("hbd,hdu->hbu", xb, p[0]) + p[1][:, None]) * kept
        want_logits = tf.einsum("hbu,hu->hb", h, p[2]) + p[3][:, None]
        want_loss = tf.reduce_sum(coef * tf.nn.sigmoid_cross_entropy_with_logits(labels=yb, logits=want_logits), axis=1)
        total = tf.reduce_sum(want_loss)
    want = tape.gradient(total, p)
    assert np.allclose(logits, want_logits, atol=1e-5) and np.allclose(loss, want_loss, atol=1e-6)
    for got, ref in zip(grads, want, strict=True):
        assert got.shape == ref.shape and np.allclose(got, ref, rtol=1e-5, atol=1e-6), float(np.abs(got - ref).max())
    assert float(np.abs(np.asarray(want[0])).max()) > 1e-2  # the check has something to compare


def test_the_fused_adam_update_is_keras_adams_formula_and_skips_heads_that_take_no_step():
    """brainmri.learn.headfit._adam_update (XLA-fused) against keras.optimizers.Adam's update written with TensorFlow's own
    kernels, one parameter at a time, for all four stacked parameters, with per-head step sizes and one head off."""
    import tensorflow as tf

    from brainmri.learn.headfit import BETA_1, BETA_2, EPSILON, _adam_update

    rng = np.random.default_rng(5)
    heads = 3
    shapes = [(heads, 6, 4), (heads, 4), (heads, 4), (heads,)]
    small = lambda s: 10.0 ** rng.uniform(-8, 0, s)  # noqa: E731  (gradients and moments near 0 too, where epsilon's place matters)
    p, m = ([tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes] for _ in range(2))
    g = [tf.constant((rng.normal(size=s) * small(s)).astype(np.float32)) for s in shapes]
    v = [tf.constant((rng.random(size=s) * small(s) ** 2).astype(np.float32)) for s in shapes]
    on_h, alpha_h = np.array([1.0, 0.0, 1.0], np.float32), np.array([1e-3, 5e-2, 2e-2], np.float32)
    per = lambda a, q: tf.constant(a.reshape([heads] + [1] * (len(q.shape) - 1)))  # noqa: E731
    got = _adam_update()(tuple(p), tuple(g), tuple(m), tuple(v), tf.constant(on_h), tf.constant(alpha_h))
    for k in range(4):
        m_k = BETA_1 * m[k] + (1 - BETA_1) * g[k]
        v_k = BETA_2 * v[k] + (1 - BETA_2) * tf.square(g[k])
        p_k = p[k] - per(alpha_h, p[k]) * m_k / (tf.sqrt(v_k) + EPSILON)
        for out, want, before in zip((got[0][k], got[1][k], got[2][k]), (p_k, m_k, v_k), (p[k], m[k], v[k]), strict=True):
            out, want, before = np.asarray(out), np.asarray(want), np.asarray(before)
            assert np.allclose(out[on_h == 1], want[on_h == 1], rtol=1e-5, atol=1e-6)
            assert np.array_equal(out[1], before[1])  # the head that takes no step keeps its weights and moments
    assert not np.allclose(np.asarray(got[0][0][0]), np.asarray(p[0][0]))  # and the others moved: the check can fail


def test_heads_with_their_own_rate_dropout_and_epochs_train_in_one_run_as_they_would_alone(vgg16_spec):
    """A grid's points train side by side: each head keeps its own learning rate, dropout rate and epoch count."""
    settings = [(0.2, 7, 0.01, 3), (0.5, 8, 0.001, 6)]  # dropout, seed, lr, epochs
    group = [noise_heads(vgg16_spec, dropout=d, seed=s)[0] for d, s, _, _ in settings]
    results = fit_heads(group, lr=[lr for *_, lr, _ in settings], epochs=[e for *_, e in settings], patience=0, batch=16)
    assert [len(r.history) for r in results] == [3, 6] and [r.best for r in results] == [3, 6]
    for job, (d, s, lr, e) in zip(group, settings, strict=True):
        (alone,) = noise_heads(vgg16_spec, dropout=d, seed=s)
        fit_heads([alone], lr=lr, epochs=e, patience=0, batch=16)
        assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(job.head.get_weights(), alone.head.get_weights(), strict=True))


def test_a_shorter_epoch_twin_is_the_longer_heads_snapshot_and_trains_no_step_of_its_own(vgg16_spec, monkeypatch):
    """A grid's epochs candidates: a head that differs from another only in its (fewer) epochs is not trained; it gets
    the other's weights after its own epoch count and the first rows of its history, what it reaches alone. Two
    shorter twins are two snapshots of one head, and a twin of as many epochs its weights. A head with another
    learning rate is no twin, and with early stopping nothing is shared."""
    from brainmri.learn import headfit

    def jobs(n=5):
        return [noise_heads(vgg16_spec, dropout=0.3, seed=5)[0] for _ in range(n)]  # the same start, rows and stream

    trained, real = [], headfit._fit_group
    monkeypatch.setattr(headfit, "_fit_group", lambda group, *a: trained.append(len(group)) or real(group, *a))
    short, mid, long, same, other = jobs()
    results = fit_heads([short, mid, long, same, other], lr=[0.01] * 4 + [0.02], epochs=[3, 5, 7, 7, 3], patience=0, batch=16)
    assert sum(trained) == 2  # the long head and the other rate's: its twins took no step of their own
    assert all(np.array_equal(a, b) for a, b in zip(same.head.get_weights(), long.head.get_weights(), strict=True))
    for twin, result, e in ((short, results[0], 3), (mid, results[1], 5)):
        (alone,) = jobs(1)
        (want,) = fit_heads([alone], lr=0.01, epochs=e, patience=0, batch=16)
        moved = max(float(np.abs(a - b).max()) for a, b in zip(alone.head.get_weights(), long.head.get_weights(), strict=True))
        assert moved > 1e-3  # the epochs after e moved the long head: a snapshot taken at the wrong epoch would show
        assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(twin.head.get_weights(), alone.head.get_weights(), strict=True))
        assert result.best == e and len(result.history) == e and result.history["selected"].tolist() == [False] * (e - 1) + [True]
        cols = ["loss", "accuracy"]
        assert np.allclose(result.history[cols], results[2].history[cols].iloc[:e])
        assert np.allclose(result.history[cols], want.history[cols])
    trained.clear()
    fit_heads(jobs(3), lr=0.01, epochs=[3, 7, 3], patience=2, batch=16)
    assert sum(trained) == 3


def test_heads_over_shared_rows_pool_them_once_and_train_exactly_as_on_their_own_copies(vgg16_spec, monkeypatch):
    """A grid's folds index one feature matrix: the compiled run holds each distinct (row, label) once, and the heads
    come out bit for bit as from a pool holding every head's rows again (the layout before), labels kept apart."""
    from brainmri.learn import headfit

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 16)).astype("float32"), rng.integers(0, 2, 40).astype("float32")
    x[1], y[1] = x[0], 1.0 - y[0]  # the same features under the other label: two rows of the pool, not one
    folds = [(np.arange(40)[np.arange(40) % 4 != k], np.arange(40)[np.arange(40) % 4 == k]) for k in range(4)]

    def jobs():
        import keras

        from brainmri.learn.models import build_head

        out = []
        for k, (rows, val) in enumerate(folds):
            keras.utils.set_random_seed(k)
            head = build_head(16, vgg16_spec.model_copy(update={"dense": 32, "dropout": 0.5}), seed=0, adapt_on=x[rows])
            out.append(HeadJob(head, x[rows], y[rows], x[val], y[val], {0: 1.3, 1: 0.8}, 11 + k))
        return out

    def every_copy(blocks):
        sizes = np.cumsum([0] + [len(b[0]) for b in blocks])
        where = [np.arange(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]), where

    pooled, pools = jobs(), []
    real = headfit._shared_rows
    monkeypatch.setattr(headfit, "_shared_rows", lambda blocks: pools.append(real(blocks)) or pools[-1])
    got = fit_heads(pooled, lr=0.01, epochs=6, patience=2, batch=8)
    assert len(pools[0][0]) == 40  # each image once (4 heads x 40 rows before); row 1 kept apart from row 0 by its label
    for (bx, by), rows in zip([(a, b) for j in pooled for a, b in ((j.x_fit, j.y_fit), (j.x_val, j.y_val))], pools[0][2], strict=True):
        assert np.array_equal(pools[0][0][rows], bx) and np.array_equal(pools[0][1][rows], by)
    monkeypatch.setattr(headfit, "_shared_rows", every_copy)
    copied = jobs()
    want = fit_heads(copied, lr=0.01, epochs=6, patience=2, batch=8)
    for a, b in zip(pooled, copied, strict=True):
        assert all(np.array_equal(u, v) for u, v in zip(a.head.get_weights(), b.head.get_weights(), strict=True))
    assert all(r.history.equals(w.history) for r, w in zip(got, want, strict=True))


def test_compiled_loop_matches_keras_fit_on_tiny_data(vgg16_spec):
    """The same head, start and hyperparameters as Keras model.fit: not identical draws, so close, not equal."""
    import keras

    rng = np.random.default_rng(1)
    w = rng.normal(size=32)
    x = rng.normal(size=(500, 32)).astype("float32")
    y = (x @ w + rng.normal(scale=3.0, size=500) > 0).astype(int)
    fit_i, val_i, test_i = slice(0, 300), slice(300, 360), slice(360, 500)
    keras.utils.set_random_seed(3)
    bb = vgg16_spec.model_copy(update={"dense": 64, "dropout": 0.5})
    a = build_head(32, bb, seed=3, adapt_on=x[fit_i])
    b = build_head(32, bb, seed=3, adapt_on=x[fit_i])
    b.set_weights(a.get_weights())
    cw = class_weights(y[fit_i], "balanced")
    hist_a, _ = fit(a, x[fit_i], y[fit_i], (x[val_i], y[val_i]), lr=1e-3, epochs=20, patience=0, batch=32, cw=cw, label="t")
    (res,) = fit_heads([HeadJob(b, x[fit_i], y[fit_i], x[val_i], y[val_i], cw, 3)], lr=1e-3, epochs=20, patience=0, batch=32)
    pa, pb = np.asarray(a(x[test_i])).reshape(-1), np.asarray(b(x[test_i])).reshape(-1)
    # measured over 4 seeds: AUC within 0.01, max |dp| <= 0.10, median |dp| <= 0.02, val loss within 0.016 every epoch,
    # train loss (a mean over dropout batches) within 0.03 on average; the bounds below leave about 2x room
    assert abs(roc_auc_score(y[test_i], pa) - roc_auc_score(y[test_i], pb)) < 0.03
    assert np.abs(pa - pb).max() < 0.2 and np.median(np.abs(pa - pb)) < 0.04
    assert np.allclose(hist_a["val_loss"], res.history["val_loss"], atol=0.04)
    assert np.abs(hist_a["loss"] - res.history["loss"]).mean() < 0.06
    assert hist_a["val_loss"].iloc[0] - hist_a["val_loss"].iloc[-1] > 0.1  # and it did learn: the check can fail


def test_saved_model_reproduces_the_loops_validation_loss(small_run):
    """model.keras (base and head, on images) gives the val loss the compiled loop recorded for the selected epoch."""
    p, trained, *_ = small_run
    for name in ("vgg16-aug", "vgg16-noaug"):
        hist = pd.read_csv(p.model_file("models", name, "history"))
        chosen = hist[hist["selected"]]
        assert len(chosen) == 1 and int(chosen["epoch"].iloc[0]) == trained[name]["selected_epoch"]
        va = split_part(p, "val")
        model = load_model(p.model_file("models", name, "model"))
        prob = np.asarray(model(load_batch(va.paths, p.backbones["vgg16"].input_size), training=False)).reshape(-1)
        cal = trained[name]["calibration"]
        assert cal["method"] == "platt" and cal["a"] > 0
        prob = calibration.apply(prob, 1 / cal["a"], -cal["c"] / cal["a"])  # the saved model is calibrated: undone, the loop's head
        assert float(log_loss(va.y, prob, labels=[0, 1])) == pytest.approx(float(chosen["val_loss"].iloc[0]), abs=1e-4)
        assert float(np.mean((prob > 0.5) == va.y)) == pytest.approx(float(chosen["val_accuracy"].iloc[0]), abs=1e-6)


def test_train_writes_model_history_and_metrics(small_run):
    p, trained, *_ = small_run
    t = json.loads(p.model_file("models", "vgg16-aug", "train_metrics").read_text())
    assert t == json.loads(json.dumps(trained["vgg16-aug"]))
    assert t["augment"] and t["n_augmented"] == t["n_train"] and trained["vgg16-noaug"]["n_augmented"] == 0
    assert t["weights"]["kind"] == "none" and "random" in t["weights"]["description"]
    assert {"accuracy", "bce", "auc"} <= set(t["train"]) and 0 < t["threshold"] < 1
    assert t["cv"]["folds"] == 2 and {"model", "baseline_logreg"} <= set(t["cv"])
    assert set(t["cv"]["model"]["auc"]) == {"mean_of_folds", "sd_of_folds", "pooled_out_of_fold"}  # every CV figure says which
    spread = t["cv"]["seed_spread"]  # whole CV runs with other seeds: the first is the CV above
    assert spread["seeds"] == [42, 1042, 2042] and spread["pooled_out_of_fold_auc"][0] == t["cv"]["model"]["auc"]["pooled_out_of_fold"]
    assert len(spread["pooled_out_of_fold_auc"]) == 3 and spread["sd"] >= 0 and spread["range"][0] <= spread["range"][1]
    per_fold = [f["model_auc"] for f in t["cv"]["per_fold"]]
    assert t["cv"]["model"]["auc"]["mean_of_folds"] == pytest.approx(np.mean(per_fold), abs=1e-4)
    assert trained["smallcnn-aug"]["cv"] is None  # end-to-end models have no feature cache to cross-validate on
    live = p.path("models") / "vgg16-aug" / p.paths.files.live  # DVCLive: numbers only, and one curve per metric
    numbers = json.loads((live / "metrics.json").read_text())
    assert numbers["val_auc"] == pytest.approx(t["val"]["auc"]) and "cv_auc_pooled_out_of_fold" in numbers
    curve = pd.read_csv(live / "plots" / "metrics" / "val_loss.tsv", sep="\t")
    assert len(curve) == t["epochs_run"] and list(curve.columns) == ["step", "val_loss"]
    model = load_model(p.model_file("models", "vgg16-aug", "model"))
    assert [layer.name for layer in model.get_layer("head").layers][1] == "feature_scale"


def test_same_params_give_the_same_metrics(small_run, tmp_path):
    """A retrain in the same process reads every feature from the cache and gives byte-identical train.json."""
    p, trained, *_ = small_run
    q = load_params(
        p.root / "params.yaml", {"paths": {"models": str(tmp_path / "out" / "models"), "data_root": str(tmp_path / "out")}}
    )  # the shared run stays
    cached = sorted(p.path("feature_cache").rglob("*.npy"))
    again = train(q, "vgg16-aug")
    assert sorted(p.path("feature_cache").rglob("*.npy")) == cached  # nothing recomputed: the key is stable in-process
    assert json.dumps(again) == json.dumps(trained["vgg16-aug"])
    written = q.model_file("models", "vgg16-aug", "train_metrics").read_bytes()
    assert written == p.model_file("models", "vgg16-aug", "train_metrics").read_bytes()


def test_too_small_input_and_unknown_model_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="input_size must be between 32"):
        load_params(make_project(tmp_path / "a", {"backbones": {"vgg16": {"input_size": 16}}}) / "params.yaml")
    with pytest.raises(ConfigError, match="models.x.backbone 'vgg17' is not a key of backbones"):
        load_params(make_project(tmp_path / "b", {"models": {"x": {"backbone": "vgg17", "augment": True}}}) / "params.yaml")
    p = load_params(make_project(tmp_path / "c", tiny_training()) / "params.yaml")
    with pytest.raises(ConfigError, match="unknown model 'vgg16'; models in params.yaml: resnet50v2-noaug"):
        train(p, "vgg16")
    assert os.path.exists(tmp_path / "c" / "params.yaml")


def test_fine_tuning_unfreezes_only_the_top_layers(small_run, tmp_path):
    p, *_ = small_run
    over = {
        "backbones": {"vgg16": {"fine_tune_layers": 2, "fine_tune_epochs": 2}},
        "train": {"cv_folds": 0},
        "ensemble": {"members": []},  # fine-tuned models have no CV predictions to ensemble on
        "paths": {"models": str(tmp_path / "out" / "models"), "data_root": str(tmp_path / "out")},
    }  # its own output folder: the shared run stays as it was
    q = load_params(p.root / "params.yaml", over)
    before = load_model(p.model_file("models", "vgg16-noaug", "model"))
    t = train(q, "vgg16-noaug")
    hist = pd.read_csv(q.model_file("models", "vgg16-noaug", "history"))
    assert list(hist["phase"].unique()) == ["head", "fine_tune"] and t["cv"] is None
    after = load_model(q.model_file("models", "vgg16-noaug", "model"))
    base_b = before.get_layer("vgg16_features").get_layer("vgg16")
    base_a = after.get_layer("vgg16_features").get_layer("vgg16")
    assert np.array_equal(base_b.get_layer("block1_conv1").get_weights()[0], base_a.get_layer("block1_conv1").get_weights()[0])
    assert not np.array_equal(base_b.get_layer("block5_conv3").get_weights()[0], base_a.get_layer("block5_conv3").get_weights()[0])


def test_saved_model_reproduces_the_validation_metrics(small_run):
    """What evaluate, export and predict load is what train selected: the round trip through .keras loses nothing."""
    from brainmri.intake.parts import split_part
    from brainmri.stats.metrics import point

    p, trained, *_ = small_run
    va = split_part(p, "val")
    for name in p.models:
        model = load_model(p.model_file("models", name, "model"))
        prob = np.asarray(model.predict(load_batch(va.paths, p.backbones[p.models[name].backbone].input_size), verbose=0)).ravel()
        m = point(va.y, prob, trained[name]["threshold"])
        for k in ("accuracy", "auc", "bce"):
            assert m[k] == pytest.approx(trained[name]["val"][k], abs=1e-3), (name, k)


def test_train_never_reads_the_test_split(small_run, tmp_path):
    """Every test image replaced by noise and its label flipped: train writes byte-identical train.json and history,
    and a model with exactly the same weights (its file differs only in the layer names Keras numbers per process)."""
    p, *_ = small_run
    # selection too: a grid chosen by CV over train+val. It runs on the original data first, so the copy below shares
    # its cached features: a feature extraction repeated in one process may round differently in its last bit
    # (oneDNN), and this test is about which images train reads, not about that.
    grid = {"backbones": {"vgg16": GRID}, "train": {"threshold": ["youden", 0.5]}}
    p_grid = load_params(
        p.root / "params.yaml", {**grid, "paths": {"models": str(tmp_path / "out" / "grid"), "data_root": str(tmp_path / "out")}}
    )
    assert train(p_grid, "vgg16-noaug")["selection"]["points"]
    root = tmp_path / "copy"
    shutil.copytree(p.root, root, ignore=shutil.ignore_patterns("models", "eval", "export", "benchmark", "reports"))
    q = load_params(root / "params.yaml")
    split = pd.read_csv(q.path("split_manifest"), keep_default_na=False)
    test = split["split"] == "test"
    assert test.sum() > 0
    rng = np.random.default_rng(0)
    for name in split.loc[test, "image"]:  # same name, a valid image of other content: reading it would not fail
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(q.path("ingest_images") / name)
    flip = {q.ingest.positive_class: q.ingest.negative_class, q.ingest.negative_class: q.ingest.positive_class}
    split.loc[test, "label"] = split.loc[test, "label"].map(flip)
    split.to_csv(q.path("split_manifest"), index=False)
    cached = sorted(q.path("feature_cache").rglob("*.npy"))
    for name in ("vgg16-aug", "smallcnn-aug"):
        train(q, name)
    q_grid = load_params(
        root / "params.yaml", {**grid, "paths": {"models": str(tmp_path / "out2" / "grid-noised"), "data_root": str(tmp_path / "out2")}}
    )
    train(q_grid, "vgg16-noaug")
    assert sorted(q.path("feature_cache").rglob("*.npy")) == cached  # no feature computed: not even a test image's
    for a_p, b_p, name in ((p, q, "vgg16-aug"), (p, q, "smallcnn-aug"), (p_grid, q_grid, "vgg16-noaug")):
        for key in ("train_metrics", "history"):
            a, b = a_p.model_file("models", name, key), b_p.model_file("models", name, key)
            assert a.read_bytes() == b.read_bytes(), (name, key)
        wa, wb = (load_model(x.model_file("models", name, "model")).get_weights() for x in (a_p, b_p))
        assert len(wa) == len(wb) and all(np.array_equal(a, b) for a, b in zip(wa, wb, strict=True)), name


GRID = {"feature_layer": ["block3_pool", ""], "learning_rate": [0.01, 0.0001], "dropout": [0.2, 0.5]}


def test_a_grid_is_chosen_by_cv_on_train_and_val_and_the_chosen_point_is_what_is_saved(small_run, tmp_path):
    """Lists in params are a grid: every point is cross-validated, the best pooled out-of-fold AUC wins, and the
    saved model is built at that point (its feature layer and dropout), with the CV figures of that point's folds."""
    p, *_ = small_run
    over = {
        "backbones": {"vgg16": {**GRID, "dense": 256, "l2": 0.0}},  # a hidden layer: a linear head has no rate or dropout
        "train": {"threshold": ["youden", 0.5]},
        "paths": {"models": str(tmp_path / "out" / "m"), "data_root": str(tmp_path / "out")},
    }
    q = load_params(p.root / "params.yaml", over)
    t = train(q, "vgg16-noaug")
    sel = t["selection"]
    assert [{k: pt[k] for k in GRID} for pt in sel["points"]] == [
        {"feature_layer": f, "learning_rate": lr, "dropout": d}
        for f in GRID["feature_layer"]
        for lr in GRID["learning_rate"]
        for d in GRID["dropout"]
    ]
    aucs = [pt["cv_auc_pooled_out_of_fold"] for pt in sel["points"]]
    best = sel["points"][aucs.index(max(aucs))]
    assert sel["chosen"] == {k: best[k] for k in SETTINGS} == t["settings"]
    assert len(set(aucs)) > 1  # the points differ: the choice is a real one
    assert t["cv"]["model"]["auc"]["pooled_out_of_fold"] == best["cv_auc_pooled_out_of_fold"]  # the same folds, reused
    rules = sel["threshold_rules"]
    assert t["threshold_rule"] == max(rules, key=lambda r: r["cv_balanced_accuracy_pooled_out_of_fold"])["rule"]
    model = load_model(q.model_file("models", "vgg16-noaug", "model"))
    assert model.get_layer("head").get_layer("head_dropout").rate == best["dropout"]
    assert model.get_layer("vgg16_features").output_shape[-1] == (256 if best["feature_layer"] == "block3_pool" else 512)
    # the chosen point given as single values trains the same model: training beside the grid changed nothing
    alone = {
        **over,
        "backbones": {"vgg16": t["settings"]},
        "train": {"threshold": t["threshold_rule"]},
        "paths": {"models": str(tmp_path / "out" / "a"), "data_root": str(tmp_path / "out")},
    }
    t_alone = train(load_params(p.root / "params.yaml", alone), "vgg16-noaug")
    assert t_alone["cv"]["model"]["auc"]["pooled_out_of_fold"] == pytest.approx(best["cv_auc_pooled_out_of_fold"], abs=2e-3)
    assert t_alone["val"]["auc"] == pytest.approx(t["val"]["auc"], abs=2e-3)


def test_a_linear_head_at_c_1_without_copies_is_the_logistic_regression_bar_and_cv_chooses_the_copies(small_run, tmp_path):
    """`augment: [true, false]` makes the copies a grid dimension, every head offered with and without them on equal
    terms; the linear head at C = 1 without copies is the CV report's logistic-regression baseline, prediction for
    prediction, so the chosen head's pooled CV AUC is at least the bar's."""
    p, *_ = small_run
    over = {
        "backbones": {"vgg16": {"dense": [0, 16], "linear_c": 1.0, "epochs": 3}},
        "models": {"vgg16-aug": {"backbone": "vgg16", "augment": [True, False]}},
        "paths": {"models": str(tmp_path / "out" / "m"), "data_root": str(tmp_path / "out")},
    }
    q = load_params(p.root / "params.yaml", over)
    assert [(g["dense"], g["augment"]) for g in q.grid("vgg16-aug")] == [(0, True), (0, False), (16, True), (16, False)]
    t = train(q, "vgg16-aug")
    points = t["selection"]["points"]
    assert [(pt["dense"], pt["augment"]) for pt in points] == [(0, True), (0, False), (16, True), (16, False)]
    bar = t["cv"]["baseline_logreg"]["auc"]["pooled_out_of_fold"]
    assert t["cv"]["model"]["auc"]["pooled_out_of_fold"] >= bar == points[1]["cv_auc_pooled_out_of_fold"]
    assert points[0]["cv_auc_pooled_out_of_fold"] != points[1]["cv_auc_pooled_out_of_fold"]  # the copies change the head
    chosen = t["selection"]["chosen"]
    assert t["settings"] == chosen and t["augment"] == chosen["augment"]
    assert t["n_augmented"] == (t["n_train"] if chosen["augment"] else 0)  # one copy per training image here
    # the chosen point alone: the linear head without copies predicts out of fold what the baseline predicts
    alone = {
        "backbones": {"vgg16": {"dense": 0, "linear_c": 1.0}},
        "models": {"vgg16-aug": {"backbone": "vgg16", "augment": False}},
        "paths": {"models": str(tmp_path / "out" / "a"), "data_root": str(tmp_path / "out")},
    }
    q_alone = load_params(p.root / "params.yaml", alone)
    t_alone = train(q_alone, "vgg16-aug")
    cv = t_alone["cv"]
    assert cv["model"]["auc"]["pooled_out_of_fold"] == bar and cv["model"]["bce"] == cv["baseline_logreg"]["bce"]
    for fold in cv["per_fold"]:  # log loss fold by fold: the same probabilities, not merely the same ranking
        assert fold["model_bce"] == pytest.approx(fold["baseline_bce"], abs=2e-4) and fold["model_auc"] == fold["baseline_auc"]


def test_a_grid_needs_cached_features_and_cv(small_run, tmp_path):
    p, *_ = small_run
    models = {"paths": {"models": str(tmp_path / "out" / "m"), "data_root": str(tmp_path / "out")}}
    with pytest.raises(ConfigError, match="backbones.smallcnn .model smallcnn-aug.: lists .* are a grid chosen by cross-validation"):
        load_params(p.root / "params.yaml", {"backbones": {"smallcnn": {"learning_rate": [0.01, 0.001]}}, **models})
    # a list of threshold rules is global: a model with no CV (end to end) takes the first, and says so
    q = load_params(p.root / "params.yaml", {"train": {"threshold": [0.5, "youden"]}, **models})
    t = train(q, "smallcnn-aug")
    assert t["threshold_rule"] == 0.5 and "no cross-validation" in t["threshold_rule_chosen_by"]
    with pytest.raises(ConfigError, match="needs train.cv_folds >= 2"):  # at load time, before any feature is extracted
        hidden = {"dropout": [0.1, 0.5], "dense": 64}  # a grid of a hidden-layer head
        load_params(p.root / "params.yaml", {"backbones": {"vgg16": hidden}, "train": {"cv_folds": 0}, **models})
    with pytest.raises(ConfigError, match="without repeats"):
        load_params(p.root / "params.yaml", {"backbones": {"vgg16": {"epochs": [5, 5]}}})
    with pytest.raises(ConfigError, match="a list of both .a grid dimension chosen by CV., got .True, True."):
        load_params(p.root / "params.yaml", {"models": {"vgg16-aug": {"backbone": "vgg16", "augment": [True, True]}}})
    with pytest.raises(ConfigError, match="model smallcnn-aug.: lists .there, or models.smallcnn-aug.augment."):
        load_params(p.root / "params.yaml", {"models": {"smallcnn-aug": {"backbone": "smallcnn", "augment": [True, False]}}})
    with pytest.raises(ConfigError, match="linear_c .* must be above 0, got 0.0"):
        load_params(p.root / "params.yaml", {"backbones": {"vgg16": {"linear_c": 0.0}}})
    with pytest.raises(ConfigError, match="non-empty"):
        load_params(p.root / "params.yaml", {"backbones": {"vgg16": {"feature_layer": []}}})
