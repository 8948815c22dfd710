"""Where a model looks: Grad-CAM heatmaps on the Keras model, and the share of each heatmap inside the head.

Grad-CAM (Selvaraju et al. 2017) weights each channel of the frozen base's last feature map by the mean gradient of
the output logit with respect to it, sums and clips at zero, and upsamples to the input. The head is the region
ingest crops to (brainmri.intake.decode.head_mask, holes filled). A model whose heatmaps fall mostly outside it looks at
margins, text, padding or borders, not anatomy, and the report flags it.

Written here, not taken from a library: tf-keras-vis and keras-cv's Grad-CAM need a flat model with a named conv
layer, while ours nests the base inside the feature extractor; the computation is a dozen lines.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from brainmri.intake.decode import head_mask


def parts(model):
    """(preprocess layer, base, pooling layer, head) of a saved brainmri model (brainmri.learn.models.stack)."""
    import keras

    extractor = next(layer for layer in model.layers if layer.name.endswith("_features"))
    base = next(layer for layer in extractor.layers if isinstance(layer, keras.Model))
    return extractor.get_layer("preprocess"), base, extractor.get_layer("pool"), model.get_layer("head")


def grad_cam(model, x: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (n, size, size), each summing to 1 (all zero where Grad-CAM found no positive evidence either way),
    and the model's probability for each image (the same forward pass: the output logit through the sigmoid; for N
    classes the (n, K) softmax, the heatmap being the predicted class's)."""
    import tensorflow as tf

    from brainmri.learn.models import output_layer

    pre, base, pool, head = parts(model)
    out = output_layer(head)
    if int(out.units) > 1:
        return _grad_cam_classes(pre, base, pool, head, out, x, batch)
    hidden = [layer for layer in head.layers[1:] if layer is not out]  # [feature_scale,] head_dense, head_dropout
    size = x.shape[1]
    maps, logits = [], []
    for i in range(0, len(x), batch):
        # the base runs outside the tape: recorded, its ops were differentiated too (their filter and input gradients,
        # two thirds of the stage's time for VGG19), though the heatmap needs the gradient at its output only
        a = base(pre(tf.constant(x[i : i + batch])), training=False)
        with tf.GradientTape() as tape:
            tape.watch(a)
            h = pool(a)
            for layer in hidden:
                h = layer(h, training=False)
            # the logit itself, before the sigmoid: taken from the output probability, a saturated image (|z| > 16)
            # would have no gradient and an empty heatmap
            logit = tf.reshape(tf.matmul(h, out.kernel) + out.bias, [-1])
        g = tape.gradient(logit, a)
        logits.append(logit.numpy())
        # for a tumour call the evidence for tumour; for a no-tumour call the evidence against (the sign flipped)
        sign = tf.where(logit >= 0, 1.0, -1.0)[:, None, None]
        cam = tf.nn.relu(sign * tf.reduce_sum(tf.reduce_mean(g, axis=(1, 2), keepdims=True) * a, axis=-1))
        cam = tf.image.resize(cam[..., None], (size, size), method="bilinear")[..., 0].numpy()
        total = cam.sum(axis=(1, 2), keepdims=True)
        maps.append(np.divide(cam, total, out=np.zeros_like(cam), where=total > 0))
    if not maps:
        return np.zeros((0, size, size), np.float32), np.zeros(0, np.float32)
    return np.concatenate(maps), 1.0 / (1.0 + np.exp(-np.concatenate(logits).astype(np.float64)))


def _grad_cam_classes(pre, base, pool, head, out, x: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM of an N-class head: the gradient of the predicted class's logit (before the softmax, so a confident
    call still has one); the evidence for the class said, as for a two-class tumour call."""
    import tensorflow as tf

    hidden = [layer for layer in head.layers[1:] if layer is not out]
    size = x.shape[1]
    maps, logits = [], []
    for i in range(0, len(x), batch):
        a = base(pre(tf.constant(x[i : i + batch])), training=False)  # outside the tape, as for two classes
        with tf.GradientTape() as tape:
            tape.watch(a)
            h = pool(a)
            for layer in hidden:
                h = layer(h, training=False)
            z = tf.matmul(h, out.kernel) + out.bias  # [b, K]
            said = tf.gather(z, tf.argmax(z, axis=1), batch_dims=1)
        g = tape.gradient(said, a)
        logits.append(z.numpy())
        cam = tf.nn.relu(tf.reduce_sum(tf.reduce_mean(g, axis=(1, 2), keepdims=True) * a, axis=-1))
        cam = tf.image.resize(cam[..., None], (size, size), method="bilinear")[..., 0].numpy()
        total = cam.sum(axis=(1, 2), keepdims=True)
        maps.append(np.divide(cam, total, out=np.zeros_like(cam), where=total > 0))
    k = int(out.units)
    if not maps:
        return np.zeros((0, size, size), np.float32), np.zeros((0, k), np.float32)
    from brainmri.learn.multiclass import softmax

    return np.concatenate(maps), softmax(np.concatenate(logits))


def masks(x: np.ndarray) -> np.ndarray:
    """The head mask of each model input (n, size, size): as ingest finds it, holes filled; all True when none is found."""
    from scipy import ndimage

    out = []
    for arr in x:
        m = head_mask(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
        out.append(ndimage.binary_fill_holes(m) if m is not None else np.ones(arr.shape[:2], bool))
    return np.stack(out) if out else np.zeros((0, *x.shape[1:3]), bool)


def head_share(cams: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Per image, the share of its heatmap inside the head (NaN where the heatmap is empty)."""
    inside = (cams * head).sum(axis=(1, 2))
    total = cams.sum(axis=(1, 2))
    return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)
