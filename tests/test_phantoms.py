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
