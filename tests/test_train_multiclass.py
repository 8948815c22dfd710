"""Training N-class heads (issue 31; notes in brainmri.learn.multiclass): softmax heads trained by the compiled loop
and as multinomial logistic regressions, their hand-written gradients against a GradientTape, class weights,
temperature calibration folded into the softmax layer, grid selection by macro one-vs-rest AUC, and the train stage
on a three-class phantom project. Synthetic features and phantoms only: small and fast."""

import json

import numpy as np
import pandas as pd
import pytest
from factory import make_project, materialise_weights, tiny_training
from sklearn.metrics import roc_auc_score

from brainmri.config import Backbone, load_params
from brainmri.learn import calibration, multiclass
from brainmri.learn.fitting import class_weights, predict
from brainmri.learn.headfit import HeadJob, fit_heads, softmax_loss_and_grads
from brainmri.learn.models import MULTI_OUTPUT, build_head, output_layer


def spec(**kw) -> Backbone:
    """A backbone entry with a small hidden layer (dense 0 for a linear head)."""
    base = dict(
        application="VGG16", weights="none", input_size=32, pooling="avg", feature_layer="", dense=16, l2=0.0, linear_c=1.0, dropout=0.2,
        learning_rate=0.01, epochs=40, patience=5, fine_tune_layers=0, fine_tune_epochs=0, fine_tune_learning_rate=1e-5,
    )  # fmt: skip
    return Backbone(**{**base, **kw})


def clusters(k: int, n: int, d: int = 8, seed: int = 0, spread: float = 0.6):
    """`n` rows of K Gaussian clusters in d dimensions (unit-distance-ish centres, `spread` noise): separable, not trivially."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 1.5
    y = np.arange(n) % k
    rng.shuffle(y)
    return (centres[y] + rng.normal(scale=spread, size=(n, d))).astype(np.float32), y


def softmax_job(k: int, bb: Backbone, seed: int = 0, cw_mode: str = "balanced") -> HeadJob:
    x, y = clusters(k, 240, seed=seed)
    xv, yv = clusters(k, 90, seed=seed)  # the same centres (same seed), fresh noise below
    xv = xv + np.random.default_rng(seed + 99).normal(scale=0.3, size=xv.shape).astype(np.float32)
    head = build_head(x.shape[1], bb, seed=seed, adapt_on=x, n_classes=k)
    return HeadJob(head, x, y, xv, yv, class_weights(y, cw_mode, k), seed + 5)


def test_balanced_class_weights_are_n_over_k_times_the_class_count():
    y = np.array([0] * 6 + [1] * 3 + [2] * 1)
    cw = class_weights(y, "balanced", 3)
    assert cw == pytest.approx({0: 10 / (3 * 6), 1: 10 / (3 * 3), 2: 10 / (3 * 1)})
    assert class_weights(np.array([0, 0, 0, 1]), "balanced") == {0: 4 / 6, 1: 4 / 2}  # two classes: n / (2 n_c), as ever
    assert class_weights(np.array([0, 0, 1, 1]), "balanced", 3)[2] == 1.0  # a class with no image weighs 1
    assert class_weights(y, "none", 3) is None


@pytest.mark.parametrize("l2", [None, 0.03])
def test_the_written_out_softmax_gradients_equal_automatic_differentiation(l2):
    """softmax_loss_and_grads against a GradientTape over the same loss: stacked heads, dropout, class weights, a
    padded (zero-weight) row, relu on both sides of its kink, with and without the L2 penalty."""
    import tensorflow as tf

    rng = np.random.default_rng(4)
    heads, b, d, u, k = 3, 9, 7, 5, 4
    p = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in [(heads, d, u), (heads, u), (heads, u, k), (heads, k)]]
    xb = tf.constant(rng.normal(size=(heads, b, d)).astype(np.float32))
    yb = tf.one_hot(rng.integers(0, k, (heads, b)), k)
    kept = tf.constant(((rng.random((heads, b, u)) >= 0.3) / 0.7).astype(np.float32))
    coef = rng.uniform(0.5, 1.5, (heads, b)).astype(np.float32)
    coef[:, -1] = 0.0
    coef = tf.constant(coef / b)
    pen = None if l2 is None else tf.constant(np.array([l2, 0.0, 2 * l2], np.float32))
    logits, loss, grads = softmax_loss_and_grads(p, xb, yb, kept, coef, pen)
    with tf.GradientTape() as tape:
        tape.watch(p)
        h = tf.nn.relu(tf.einsum("hbd,hdu->hbu", xb, p[0]) + p[1][:, None]) * kept
        want_logits = tf.einsum("hbu,huk->hbk", h, p[2]) + p[3][:, None, :]
        want_loss = tf.reduce_sum(coef * -tf.reduce_sum(yb * tf.nn.log_softmax(want_logits), axis=-1), axis=1)
        if pen is not None:
            want_loss += pen * (tf.reduce_sum(p[0] ** 2, axis=[1, 2]) + tf.reduce_sum(p[2] ** 2, axis=[1, 2]))
        total = tf.reduce_sum(want_loss)
    want = tape.gradient(total, p)
    assert np.allclose(logits, want_logits, atol=1e-5) and np.allclose(loss, want_loss, atol=1e-5)
    for got, ref in zip(grads, want, strict=True):
        assert got.shape == ref.shape and np.allclose(got, ref, rtol=1e-5, atol=1e-6), float(np.abs(got - ref).max())
    assert float(np.abs(np.asarray(want[2])).max()) > 1e-2  # the check has something to compare


@pytest.mark.parametrize("k", [3, 4])
def test_hidden_softmax_heads_learn_separable_classes_and_keep_their_best_epoch(k):
    """The compiled loop trains K-class softmax heads: probabilities (n, K) summing to 1, high macro AUC on held-out
    rows, and with patience the head holds the weights of its lowest validation loss, as for two classes."""
    jobs = [softmax_job(k, spec(), seed=s) for s in (0, 1)]
    before = [float(multiclass.log_loss(j.y_val, predict(j.head, j.x_val))) for j in jobs]
    results = fit_heads(jobs, lr=0.01, epochs=40, patience=5, batch=16)
    for job, res, loss0 in zip(jobs, results, before, strict=True):
        prob = predict(job.head, job.x_val)
        assert prob.shape == (len(job.y_val), k) and np.allclose(prob.sum(axis=1), 1.0, atol=1e-5)
        assert multiclass.macro_auc(job.y_val, prob) > 0.95 and multiclass.accuracy(job.y_val, prob) > 0.8
        hist = res.history
        assert res.best == int(hist["val_loss"].idxmin()) + 1 and hist["val_loss"].min() < loss0 / 2
        # the loop's validation loss (unweighted) is the saved head's multi-class log loss at the kept epoch
        assert multiclass.log_loss(job.y_val, prob) == pytest.approx(hist["val_loss"].min(), abs=1e-4)
        assert multiclass.accuracy(job.y_val, prob) == pytest.approx(hist["val_accuracy"].iloc[res.best - 1], abs=1e-6)


def test_a_softmax_head_trains_alone_as_in_a_group_and_a_rerun_is_identical():
    def run(n):
        jobs = [softmax_job(3, spec(dropout=0.5), seed=0) for _ in range(n)]
        for i, j in enumerate(jobs):
            j.seed = 5 + i
        fit_heads(jobs, lr=0.01, epochs=8, patience=0, batch=16)
        return [j.head.get_weights() for j in jobs]

    a, b, group = run(1), run(1), run(2)
    assert all(np.array_equal(u, v) for u, v in zip(a[0], b[0], strict=True))
    assert all(np.allclose(u, v, atol=1e-5) for u, v in zip(a[0], group[0], strict=True))
    assert max(float(np.abs(u - v).max()) for u, v in zip(group[0], group[1], strict=True)) > 1e-3


@pytest.mark.parametrize("k", [3, 4])
def test_a_linear_softmax_head_is_the_multinomial_logistic_regression(k):
    """dense 0: scikit-learn's multinomial regression at C = linear_c on the standardised features; the Keras head
    then outputs its predict_proba."""
    from sklearn.linear_model import LogisticRegression

    c = 0.05
    job = softmax_job(k, spec(dense=0, linear_c=c))
    (res,) = fit_heads([job], lr=0.01, epochs=1, patience=0, batch=16, linear_c=c)
    norm = job.head.get_layer("feature_scale")
    std = lambda x: (x - np.asarray(norm.mean)) / np.sqrt(np.asarray(norm.variance))  # noqa: E731
    sw = np.array([job.class_weight[c] for c in job.y_fit])
    ref = LogisticRegression(C=c, max_iter=5000).fit(std(job.x_fit), job.y_fit, sample_weight=sw)
    prob = predict(job.head, job.x_val)
    assert output_layer(job.head).name == MULTI_OUTPUT and prob.shape == (len(job.y_val), k)
    assert np.allclose(prob, ref.predict_proba(std(job.x_val)), atol=1e-4)
    assert res.history["val_accuracy"].iloc[0] == pytest.approx(multiclass.accuracy(job.y_val, prob))
    assert roc_auc_score(job.y_val, prob, multi_class="ovr") > 0.95


def test_a_linear_head_fitted_without_one_class_gives_it_no_probability():
    """A small fold can lack a class: the multinomial head still has K outputs, the absent class at about 0, and the
    two present ones as scikit-learn's (binary) regression on them gives."""
    from sklearn.linear_model import LogisticRegression

    job = softmax_job(3, spec(dense=0, linear_c=0.1))
    present = job.y_fit != 1
    job.x_fit, job.y_fit = job.x_fit[present], job.y_fit[present]
    job.class_weight = class_weights(job.y_fit, "balanced", 3)
    fit_heads([job], lr=0.01, epochs=1, patience=0, batch=16, linear_c=0.1)
    prob = predict(job.head, job.x_val)
    assert prob.shape == (len(job.y_val), 3) and prob[:, 1].max() < 1e-6
    norm = job.head.get_layer("feature_scale")
    std = lambda x: (x - np.asarray(norm.mean)) / np.sqrt(np.asarray(norm.variance))  # noqa: E731
    sw = np.array([job.class_weight[c] for c in job.y_fit])
    ref = LogisticRegression(C=0.1, max_iter=5000).fit(std(job.x_fit), job.y_fit, sample_weight=sw)
    assert np.allclose(prob[:, [0, 2]], ref.predict_proba(std(job.x_val)), atol=1e-4)


def test_temperature_is_recovered_and_folding_it_equals_applying_it_to_the_logits():
    rng = np.random.default_rng(2)
    z = rng.normal(scale=2.0, size=(4000, 3))
    y = np.array([rng.choice(3, p=row) for row in multiclass.softmax(z)])
    overconfident = multiclass.softmax(3.0 * z)  # calibrated at T = 3
    assert calibration.fit_temperature(overconfident, y) == pytest.approx(3.0, rel=0.1)

    head = build_head(6, spec(), seed=1, n_classes=3)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    prob = predict(head, x)
    calibration.fold_temperature(head, 2.5)
    folded = predict(head, x)
    assert np.allclose(folded, calibration.apply_temperature(prob, 2.5), atol=1e-5)
    assert not np.allclose(folded, prob, atol=1e-2)  # the map moved the probabilities
    assert np.array_equal(folded.argmax(axis=1), prob.argmax(axis=1))  # and no decision


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """A three-class project's params (phantom classes a, b, c), not yet ingested."""
    over = {**tiny_training(), "ingest": {"source": "data/raw/synthetic", "classes": ["a", "b", "c"], "positive_class": "", "max_side": 96}}
    over["backbones"]["vgg16"].update(dense=[0, 16], linear_c=0.1, epochs=5)  # a two-point grid: linear and hidden heads
    over["train"].update(cv_seeds=2, calibration="platt")
    models = {"vgg16-noaug": {"backbone": "vgg16", "augment": False}, "smallcnn-noaug": {"backbone": "smallcnn", "augment": False}}
    root = make_project(tmp_path_factory.mktemp("three"), over, replace={"models": models})
    return load_params(root / "params.yaml")


def test_selection_chooses_the_grid_point_of_the_best_macro_auc(three_classes):
    """select() on two feature layers (linear heads, fitted to convergence): on the first class c's features are
    copies of class b's, on the second every class is separable; the second is chosen, by its macro one-vs-rest AUC."""
    from brainmri.learn.selection import N_CLASS_CRITERION, select

    p = three_classes
    x, y = clusters(3, 150, seed=3)
    blind = x.copy()
    blind[y == 2] = x[y == 1][: int((y == 2).sum())]  # class c's features copied from class b's: indistinguishable
    grid = [{"feature_layer": "blind", "dense": 0}, {"feature_layer": "seeing", "dense": 0}]
    data = {"blind": (blind, {}), "seeing": (x, {})}
    chosen, folds, trained, record = select(p, "vgg16-noaug", grid, data.__getitem__, y, np.arange(len(y)))
    aucs = [pt["cv_auc_pooled_out_of_fold"] for pt in record["points"]]
    assert chosen == grid[1] and aucs[1] > aucs[0] + 0.1 and record["criterion"] == N_CLASS_CRITERION
    assert len(folds) == p.train.cv_folds and len(trained) == len(folds)
    assert all(0 < pt["cv_bce_pooled_out_of_fold"] < 5 for pt in record["points"])


@pytest.mark.heavy  # runs the ingest, split and train stages (tests/conftest.py: the fast tier leaves it out)
def test_the_train_stage_trains_a_three_class_model(three_classes):
    """ingest, split and train on 3 x 16 phantoms: train.json names the classes, decides by arg-max with no threshold,
    records a temperature, and cv_predictions.csv has one column per class; the saved model gives (n, 3)."""
    from brainmri.intake.parts import split_part
    from brainmri.intake.phantoms import generate
    from brainmri.intake.preprocess import load_batch
    from brainmri.learn.models import load_model
    from tasks.ingest import ingest
    from tasks.split import split
    from tasks.train import train

    p = three_classes
    generate(p.resolve("data/raw/synthetic"), {"a": False, "b": True, "c": True}, 16, 1, 64, 96, 0.0)
    ingest(p)
    split(p)
    materialise_weights(p)
    out = train(p, "vgg16-noaug")
    assert out["classes"] == ["a", "b", "c"] and out["threshold"] is None and out["threshold_rule"] == "argmax"
    assert out["calibration"]["method"] == "temperature" and out["calibration"]["T"] > 0
    assert set(out["val"]) == {"accuracy", "bce", "auc"} and out["selection"]["criterion"].startswith("pooled out-of-fold macro")
    assert len(out["cv"]["seed_spread"]["pooled_out_of_fold_auc"]) == 2
    saved = json.loads(p.model_file("models", "vgg16-noaug", "train_metrics").read_text())
    assert saved["classes"] == ["a", "b", "c"] and saved["threshold"] is None
    cv = pd.read_csv(p.model_file("models", "vgg16-noaug", "cv_predictions"), keep_default_na=False)
    cols = [f"{kind}_{c}" for kind in ("probability", "calibrated") for c in "abc"]
    assert list(cv.columns) == ["image", "group", "label", "fold", *cols]
    assert np.allclose(cv[cols[3:]].sum(axis=1), 1.0, atol=1e-4)
    raw = cv[cols[:3]].to_numpy()
    kept = raw.min(axis=1) >= 1e-4  # rows whose 6-decimal rounding leaves the logits as they were, to 1e-2 / T
    want = calibration.apply_temperature(raw[kept], out["calibration"]["T"])
    assert kept.sum() > len(cv) / 2 and np.allclose(cv[cols[3:]].to_numpy()[kept], want, atol=1e-4)
    va = split_part(p, "val")
    model = load_model(p.model_file("models", "vgg16-noaug", "model"))
    prob = predict(model, load_batch(va.paths, p.backbones["vgg16"].input_size))
    assert prob.shape == (len(va.y), 3) and np.allclose(prob.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.heavy  # runs the ingest, split and train stages (tests/conftest.py: the fast tier leaves it out)
def test_the_reference_cnn_trains_end_to_end_on_three_classes(three_classes):
    """The small CNN, trained whole by Keras with sparse categorical cross-entropy, calibrated on val (no CV): its
    history has Keras's loss per epoch, train.json decides by arg-max, and the saved model's val probabilities are the
    recorded figures'."""
    from brainmri.intake.parts import split_part
    from brainmri.intake.preprocess import load_batch
    from brainmri.learn.models import load_model
    from tasks.train import train

    p = three_classes
    if not p.path("split_manifest").exists():
        pytest.skip("needs the three-class project the train-stage test ingests and splits")
    out = train(p, "smallcnn-noaug")
    assert out["classes"] == ["a", "b", "c"] and out["threshold_rule"] == "argmax" and out["cv"] is None
    assert out["calibration"]["method"] == "temperature" and out["calibration"]["fitted_on"].startswith("val")
    hist = pd.read_csv(p.model_file("models", "smallcnn-noaug", "history"))
    assert len(hist) >= 1 and np.isfinite(hist["loss"]).all()
    va = split_part(p, "val")
    model = load_model(p.model_file("models", "smallcnn-noaug", "model"))
    prob = predict(model, load_batch(va.paths, p.backbones["smallcnn"].input_size))
    assert prob.shape == (len(va.y), 3)
    assert out["val"]["bce"] == pytest.approx(multiclass.log_loss(va.y, prob), abs=1e-3)
    assert pd.read_csv(p.model_file("models", "smallcnn-noaug", "cv_predictions")).empty
