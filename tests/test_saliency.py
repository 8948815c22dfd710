"""Saliency: a model that learned a planted marker outside the head is flagged, and its heat sits on the marker."""

import numpy as np
from factory import brain

from brainmri.config import load_params
from brainmri.learn.models import build_head, build_network
from brainmri.learn.saliency import grad_cam, head_share, masks


def marked(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Phantom heads (no tumours) on a 64 px canvas; every second one, class 1, has a bright 8 px square in a corner."""
    xs, ys = [], []
    for i in range(n):
        canvas = np.zeros((64, 64), np.uint8)
        canvas[4:60, 4:60] = brain(seed + i, tumor=False, size=(56, 56))
        if i % 2:
            canvas[1:9, 1:9] = 255  # outside the head: the only thing that tells the classes apart
        xs.append(np.repeat(canvas[..., None], 3, -1))
        ys.append(i % 2)
    return np.stack(xs).astype(np.float32), np.array(ys)


def test_a_model_that_learned_a_corner_marker_is_flagged_and_its_heat_is_on_the_marker(small_run):
    import keras

    p0, *_ = small_run
    over = {"backbones": {"vgg16": {"input_size": 64, "feature_layer": "block3_pool"}}}  # an 8 x 8 map to draw heat on
    p = load_params(p0.root / "params.yaml", over)
    keras.utils.set_random_seed(0)
    net = build_network(p, "vgg16", 0)
    x, y = marked(80, 0)
    feats = net.extractor.predict(x, verbose=0)
    head = build_head(feats.shape[1], p.backbones["vgg16"].at(p.backbones["vgg16"].grid()[0]), 0, adapt_on=feats)
    head.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    head.fit(feats, y, epochs=60, batch_size=16, verbose=0)
    net.attach(head)
    xt, yt = marked(40, 1000)
    assert ((net.full.predict(xt, verbose=0).ravel() >= 0.5) == yt).mean() >= 0.9  # it learned the marker
    (cams, _), head_masks = grad_cam(net.full, xt), masks(xt)
    assert np.allclose(cams.sum(axis=(1, 2))[cams.sum(axis=(1, 2)) > 0], 1.0, atol=1e-4)
    share = head_share(cams, head_masks)
    assert np.nanmean(share) < p.saliency.min_head_share  # flagged, as the report flags it
    corner = cams[yt == 1][:, :12, :12].sum(axis=(1, 2)).mean()  # the marker's corner is 3.5% of the input...
    assert corner > 3 * (12 * 12) / (64 * 64)  # ...and holds over 3x its share of the heat on the marked images
    assert 0.2 < head_masks.mean() < 0.6  # the masks are the heads, not the whole canvas or nothing
    out = net.full.get_layer("head").get_layer("tumour_probability")  # saturate the sigmoid: logits of hundreds
    w, b = out.get_weights()
    out.set_weights([w * 1000, b * 1000])
    saturated, _ = grad_cam(net.full, xt)
    # the logit scaled by 1000 scales every gradient alike: the same maps, where a saturated probability would give none
    assert np.allclose(saturated, cams, atol=1e-5) and (saturated.sum(axis=(1, 2)) > 0.99).mean() > 0.8


def test_the_saliency_stage_records_what_the_report_shows_and_reads_no_test_image(small_run, tmp_path):
    """The stage's record agrees with its heatmaps; with every test label flipped, its files are the same bytes; the
    report's table shows the recorded shares."""
    import json

    import pandas as pd

    from tasks.saliency import saliency

    p, *_ = small_run
    for name in p.models:
        r = json.loads(p.model_file("saliency", name, "saliency").read_text())
        with np.load(p.model_file("saliency", name, "heatmaps")) as f:
            cams, heads, images = f["cams"].astype(np.float32), f["heads"], f["images"].tolist()
        share = head_share(cams, heads)
        assert images == list(r["share_by_image"]) and len(images) == r["n_images"] > 0
        assert np.allclose(share, [np.nan if v is None else v for v in r["share_by_image"].values()], atol=2e-3, equal_nan=True)
        assert abs(np.nanmean(share) - r["mean_share_inside_head"]) < 2e-3  # float16 heatmaps on disk, float32 in the record
    split = pd.read_csv(p.path("split_manifest"), keep_default_na=False)
    flip = {p.ingest.positive_class: p.ingest.negative_class, p.ingest.negative_class: p.ingest.positive_class}
    split.loc[split["split"] == "test", "label"] = split.loc[split["split"] == "test", "label"].map(flip)
    manifest, out = tmp_path / "out" / "split.csv", {"saliency": str(tmp_path / "out" / "s"), "data_root": str(tmp_path / "out")}
    q = load_params(p.root / "params.yaml", {"paths": {"split_manifest": str(manifest), **out}})  # makes the data root
    split.to_csv(manifest, index=False)
    for name in p.models:
        saliency(q, name)
        for file in ("saliency", "heatmaps"):
            assert q.model_file("saliency", name, file).read_bytes() == p.model_file("saliency", name, file).read_bytes(), (name, file)
    look = (p.path("report") / "report.md").read_text().split("### Where the models look", 1)[1].split("\n## ", 1)[0]
    for name in p.models:
        r = json.loads(p.model_file("saliency", name, "saliency").read_text())
        flag = "LOOKS OUTSIDE THE HEAD" if r["mean_share_inside_head"] < p.saliency.min_head_share else ""
        row = f"| {name} | {r['mean_share_inside_head']:.2f} | {r['head_share_of_input']:.2f} | {r['empty_heatmaps']} of {r['n_images']} |"
        assert f"{row} {flag} |".replace("  ", " ") in look.replace("  ", " "), (row, look)
    assert "(saliency.png)" in look and (p.path("report") / "saliency.png").stat().st_size > 2000  # the best model's overlays
