import re

import pytest
import yaml
from factory import REPO, make_project
from pydantic import ValidationError

from brainmri.config import load_params
from brainmri.core.errors import ConfigError


def test_repository_params_load_and_are_frozen():
    p = load_params(REPO / "params.yaml")
    assert p.ingest.positive_class == "yes" and p.ingest.negative_class == "no"
    assert p.path("split_manifest") == REPO / "data/split/split.csv"
    with pytest.raises(ValidationError, match="frozen"):
        p.seed = 1


def test_every_param_has_a_why_comment():
    lines = (REPO / "params.yaml").read_text().splitlines()
    leaves = [ln for ln in lines if re.match(r"^\s*[\w]+:\s*\S", ln) and not ln.strip().startswith("#")]
    missing = [ln for ln in leaves if " # " not in ln and "  #" not in ln]
    assert leaves and not missing, missing


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"ingest": {"sorce": "x"}}, "unknown key 'ingest.sorce' (did you mean 'source'?)"),
        ({"augmnt": {}}, "unknown key 'augmnt' (did you mean 'augment'?)"),
        ({"split": {"train": 0.8}}, "must sum to 1"),
        ({"split": {"train": -0.1, "val": 0.55, "test": 0.55}}, "split.train=-0.1"),
        ({"augment": {"copies": -1}}, "augment.copies must be at least 0, got -1"),
        ({"ingest": {"positive_class": "tumour"}}, "'tumour' is not one of ingest.classes"),
        ({"ingest": {"classes": ["yes"]}}, "ingest.classes must name two or more different class folders"),
        ({"ingest": {"classes": ["a", "b", "a"], "positive_class": ""}}, "two or more different class folders"),
        ({"ingest": {"classes": ["glioma", "meningioma", "notumor"]}}, "positive_class applies only to two classes"),
        ({"seed": "42"}, "'seed': input should be a valid integer"),
        ({"augment": {"brightness": [1.2, 0.8]}}, "augment.brightness"),
        ({"benchmark": {"min_repeats": 21}}, "benchmark.min_repeats (21) must not exceed benchmark.repeats (20)"),
        ({"seed": -1}, "seed must be in [0, 2**31), got -1"),
        ({"seed": 2**40}, "seed must be in [0, 2**31)"),
        ({"ingest": {"outlier_z": float("nan")}}, "'ingest.outlier_z': nan is not a value"),
        ({"export": {"parity_tolerance": float("nan")}}, "'export.parity_tolerance': nan is not a value"),
        ({"benchmark": {"seconds": float("inf")}}, "'benchmark.seconds': inf is not a value"),
        ({"ingest": {"max_pixels": 2**70}}, "'ingest.max_pixels': an integer of 71 bits is too large"),
    ],
)
def test_bad_params_name_the_key(tmp_path, override, needle):
    make_project(tmp_path, override)
    with pytest.raises(ConfigError) as exc:
        load_params(tmp_path / "params.yaml")
    assert needle in str(exc.value)


def test_params_are_read_as_yaml_1_2_like_dvc_writes_them(tmp_path):
    """`dvc exp run -S` rewrites params.yaml in YAML 1.2, where bare yes/no are strings; we must read it the same way."""
    text = (REPO / "params.yaml").read_text().replace('classes: ["no", "yes"]', "classes: [no, yes]")
    (tmp_path / "params.yaml").write_text(text.replace('positive_class: "yes"', "positive_class: yes"))
    p = load_params(tmp_path / "params.yaml")
    assert p.ingest.classes == ["no", "yes"] and p.ingest.positive_class == "yes"
    (tmp_path / "params.yaml").write_text(text.replace('positive_class: "yes"', "positive_class: true"))
    with pytest.raises(ConfigError, match="'ingest.positive_class': input should be a valid string"):
        load_params(tmp_path / "params.yaml")


def test_yaml_is_parsed_by_the_c_parser_dvc_uses_too():
    """ruamel.yaml.clib's parser (requirements.lock): DVC reads params.yaml once per param dep of every stage, and
    pure-Python parsing made each `dvc status` 2.6x slower. A ruamel upgrade that stops loading it fails here."""
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None and YAML(typ="safe").Parser is CParser


def test_missing_key_and_missing_file(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    del data["dedupe"]["max_distance"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="missing key 'dedupe.max_distance'"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("paths", "needle"),
    [
        ({"ingest_images": ""}, "paths.ingest_images '' is the project folder"),  # it replaced the whole project with PNGs
        ({"ingest_images": "."}, "is the project folder"),
        ({"augment_images": ".."}, "or holds it"),
        ({"report": "/"}, "or holds it"),
        ({"ingest_images": "data/raw/brain_tumor_dataset"}, "overlaps ingest.source"),  # replaced the raw data
        ({"external_images": "data/raw"}, "overlaps ingest.source"),  # holds it
        ({"weights": "weights/x"}, "overlaps paths.weights_inbox"),
        ({"ingest_manifest": "params.yaml"}, "overlaps params.yaml"),
        ({"registry": "dvc.yaml"}, "overlaps dvc.yaml"),
        ({"models": ".git"}, "overlaps .git"),
        ({"report": "tasks"}, "overlaps paths.code + tasks"),
        ({"eval": "data/models/eval"}, "overlaps paths.eval"),  # another output's folder
        ({"models": "data"}, "overlaps paths.models 'data'"),
        ({"timing_cache": "versions.yaml"}, "overlaps versions.yaml"),  # a DVC dependency of every stage
        ({"timing_cache": ".venv"}, "overlaps .venv"),
    ],
)
def test_an_output_path_cannot_replace_the_project_its_inputs_or_another_output(tmp_path, paths, needle):
    """A stage replaces its outputs whole: paths.ingest_images '' once replaced the whole project with PNGs."""
    make_project(tmp_path, {"paths": paths})
    with pytest.raises(ConfigError) as exc:
        load_params(tmp_path / "params.yaml")
    assert needle in str(exc.value)


@pytest.mark.parametrize("value", ["9" * 4301, "0x" + "f" * 5000])
def test_an_integer_too_long_to_read_or_use_is_one_sentence(tmp_path, value):
    text = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("seed: 42", f"seed: {value}", 1))
    with pytest.raises(ConfigError, match=r"params.yaml: .*(digits|too large)"):
        load_params(tmp_path / "params.yaml")


def test_an_output_path_through_a_link_is_compared_where_it_leads(tmp_path):
    """The project reached through a symlinked folder (macOS's /tmp is one): an absolute output written through the
    link named the project itself, and the text alone did not show it."""
    make_project(tmp_path / "real" / "proj")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for out in (tmp_path / "link" / "proj", tmp_path / "link" / "proj" / "data" / "raw"):
        with pytest.raises(ConfigError, match="or holds it|overlaps ingest.source"):
            load_params(tmp_path / "link" / "proj" / "params.yaml", {"paths": {"report": str(out)}})
    with pytest.raises(ConfigError, match="lies outside the project"):  # a user's folder elsewhere: replaced, before
        load_params(tmp_path / "link" / "proj" / "params.yaml", {"paths": {"report": str(tmp_path / "elsewhere")}})
    over = {"paths": {"report": str(tmp_path / "out" / "r"), "data_root": str(tmp_path / "out")}}
    assert load_params(tmp_path / "link" / "proj" / "params.yaml", over)  # a data root outside it, named


def test_the_demo_workspace_guards_the_repository_one_level_up(tmp_path):
    """The demo's params live in demo/ and its code one level up (paths.code '../'): the repository's own files are
    protected from there too, while the demo's own outputs load."""
    make_project(tmp_path / "demo", {"paths": {"code": "../", "weights_inbox": "../weights"}})
    assert load_params(tmp_path / "demo" / "params.yaml")
    for out, what in (("../.git", ".git"), ("../params.yaml", "params.yaml"), ("../tasks", "tasks")):
        with pytest.raises(ConfigError, match=f"overlaps paths.code \\+ {re.escape(what)}"):
            load_params(tmp_path / "demo" / "params.yaml", {"paths": {"report": out}})


def test_n_classes_label_in_the_order_given_and_binary_keeps_positive_as_one(tmp_path):
    make_project(tmp_path, {"ingest": {"classes": ["pituitary", "glioma", "notumor", "meningioma"], "positive_class": ""}})
    p = load_params(tmp_path / "params.yaml")
    assert not p.ingest.binary and p.ingest.label_names == ("pituitary", "glioma", "notumor", "meningioma")
    assert p.ingest.label_index(["notumor", "pituitary", "other"]).tolist() == [2, 0, -1]
    with pytest.raises(ConfigError, match="two classes only"):
        _ = p.ingest.negative_class
    two = load_params(REPO / "params.yaml")  # ["no", "yes"] with "yes" positive: label 1 as always
    assert two.ingest.binary and two.ingest.label_names == ("no", "yes")
    assert two.ingest.label_index(["yes", "no"]).tolist() == [1, 0]
