import numpy as np

from brainmri.intake.phantoms import MARKER, generate, phantom


def test_phantoms_are_deterministic_and_tumours_differ():
    a = phantom(np.random.default_rng(5), True, 80, 90)
    b = phantom(np.random.default_rng(5), True, 80, 90)
    c = phantom(np.random.default_rng(5), False, 80, 90)
    assert a.shape == (80, 90) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a[:3].mean() < 30 and a.mean() > a[:3].mean() + 20  # dark background, bright head


def test_generate_writes_class_folders_with_duplicates(tmp_path):
    n = generate(tmp_path / "ph", {"yes": True, "no": False}, 20, 3, 64, 128, 0.3)
    files = sorted(p.relative_to(tmp_path / "ph").as_posix() for p in (tmp_path / "ph").rglob("*.*") if p.name != MARKER)
    assert "not patient data" in (tmp_path / "ph" / MARKER).read_text()  # the set says it is synthetic
    assert n == len(files) > 40 and any(" copy" in f for f in files)
    assert {f.split("/")[0] for f in files} == {"yes", "no"}
    again = tmp_path / "again"
    generate(again, {"yes": True, "no": False}, 20, 3, 64, 128, 0.3)
    assert all((tmp_path / "ph" / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_n_class_phantoms_draw_a_tumour_type_per_class_and_none_in_the_no_tumour_class():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from brainmri.intake.phantoms import class_kinds

    kinds = class_kinds(["glioma", "meningioma", "notumor", "pituitary"], "")
    assert kinds == {"glioma": 1, "meningioma": 2, "notumor": 0, "pituitary": 3}
    assert class_kinds(["no", "yes"], "yes") == {"no": False, "yes": True}  # two classes: the demo as ever
    assert class_kinds(["a", "b", "c"], "") == {"a": 1, "b": 2, "c": 3}  # no tumour-free class named: a type each
    # each type has something to learn: even a linear model on raw 16 px pixels tells the four apart above chance (0.25;
    # 0.44 measured, some 4 standard errors above it)
    x = np.array([phantom(np.random.default_rng([k, i]), k, 64, 64)[::4, ::4].ravel() for k in range(4) for i in range(30)])
    y = np.repeat(np.arange(4), 30)
    assert cross_val_score(LogisticRegression(max_iter=2000), x / 255.0, y, cv=3).mean() > 0.35
