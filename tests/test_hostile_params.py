"""Hostile params (issue 32): every value that reaches a command line is constrained, and values that would pass
params but break later (in predict, or deep in a stage) are refused when params are loaded, naming the key."""

import re

import pytest
import yaml
from factory import REPO, make_project

from brainmri.config import load_params
from brainmri.core.errors import ConfigError

HOSTILE = "x;touch pwned;#"  # the probe's backbone key: dvc repro ran `touch pwned`


def interpolations() -> list[tuple[str, str, str | None]]:
    """(stage, expression, foreach) for every ${...} in a cmd of dvc.yaml."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    found = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        over = stage.get("foreach")
        for expr in re.findall(r"\$\{([^}]*)\}", str(body.get("cmd", ""))):
            found.append((name, expr.strip(), over.strip("${} ") if isinstance(over, str) else None))
    return found


def poisoned(params: dict, expr: str, over: str | None) -> dict:
    """`params` with the value behind `expr` replaced by a shell injection."""
    if expr == "key":  # a foreach key: rename the first entry
        section = params[over]
        first = next(iter(section))
        params[over] = {HOSTILE: section[first], **{k: v for k, v in section.items() if k != first}}
        for spec in params.get("models", {}).values():  # keep the models pointing at a backbone that exists
            if over == "backbones" and spec.get("backbone") == first:
                spec["backbone"] = HOSTILE
        return params
    if expr.startswith("item."):
        entry = next(iter(params[over].values()))
        entry[expr.removeprefix("item.")] = HOSTILE
        return params
    *parents, leaf = expr.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = HOSTILE
    return params


def test_dvc_yaml_interpolates_into_commands_only_values_params_constrain(tmp_path):
    """Each ${...} in a cmd: (DVC runs commands through a shell) is tried with a shell injection behind it; loading
    params must refuse every one. A new interpolation whose value is free text fails this test."""
    found = interpolations()
    assert found, "dvc.yaml's commands interpolate model and backbone keys"
    for stage, expr, over in found:
        params = poisoned(yaml.safe_load((REPO / "params.yaml").read_text()), expr, over)
        root = tmp_path / f"{stage}-{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        with pytest.raises(ConfigError):
            load_params(root / "params.yaml")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"backbones": {"vgg16": {"input_size": 2048}}}, "input_size must be between 32 .* and 1024"),
        ({"ingest": {"max_side": 70000}}, "ingest.max_side must be at most 65535"),
        ({"ingest": {"max_pixels": 50_000_000}}, "ingest.max_pixels must be at most 40000000"),  # predict refused its model
        ({"ingest": {"max_file_bytes": 300_000_000}}, "ingest.max_file_bytes must be at most 250000000"),
        ({"ingest": {"classes": [" ", "yes"], "positive_class": "yes"}}, "ingest.classes: ' ' is not a usable class folder name"),
        ({"ingest": {"classes": ["no", "y" * 500_000], "positive_class": "no"}}, "is not a usable class folder name"),
        ({"ingest": {"classes": ["no", "../yes"], "positive_class": "no"}}, "is not a usable class folder name"),
        ({"backbones": {"vgg16": {"weights": "weights/../elsewhere/x.h5"}}}, "outside the weights inbox"),
        ({"backbones": {"vgg16": {"weights": "params.yaml"}}}, "outside the weights inbox"),  # was caught by the weights stage
        ({"ingest": {"source": "d" * 5000}}, "ingest.source is 5000 bytes long"),
        ({"ingest": {"source": "data/" + "x" * 300}}, "ingest.source has a file or folder name over 255 bytes"),
        ({"external": {"source": "ext\nernal"}}, "external.source holds a control character"),
        ({"paths": {"report": "r" * 300}}, "paths.report has a file or folder name over 255 bytes"),
        ({"paths": {"files": {"model": "../model.keras"}}}, "paths.files.model '../model.keras' must be a plain file name"),
    ],
)
def test_values_that_would_break_later_are_refused_when_params_load(tmp_path, override, needle):
    make_project(tmp_path, override)
    with pytest.raises(ConfigError, match=needle):
        load_params(tmp_path / "params.yaml")


def test_a_hostile_backbone_key_is_refused_naming_it(tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["backbones"][HOSTILE] = data["backbones"].pop("vgg16")
    for spec in data["models"].values():
        spec["backbone"] = HOSTILE if spec["backbone"] == "vgg16" else spec["backbone"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=re.escape(f"backbones.{HOSTILE!r}: a name is 1-64 letters")):
        load_params(tmp_path / "params.yaml")


def test_an_output_outside_the_project_is_refused_unless_under_a_data_root_brainmri_made(tmp_path):
    """paths.ingest_images pointing at a user's folder outside the project passed params, and ingest replaced that
    folder's contents with exit 0."""
    root = make_project(tmp_path / "proj")
    mine = tmp_path / "my photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ConfigError, match=r"paths.ingest_images .* lies outside the project"):
        load_params(root / "params.yaml", {"paths": {"ingest_images": str(mine)}})
    with pytest.raises(ConfigError, match=r"paths.data_root .* holds files brainmri did not write"):
        load_params(root / "params.yaml", {"paths": {"ingest_images": str(mine / "x"), "data_root": str(mine)}})
    with pytest.raises(ConfigError, match=r"paths.data_root .* holds the project"):
        load_params(root / "params.yaml", {"paths": {"ingest_images": str(tmp_path / "x"), "data_root": str(tmp_path)}})
    assert (mine / "holiday.jpg").read_bytes() == b"precious" and sorted(p.name for p in mine.iterdir()) == ["holiday.jpg"]
    data = tmp_path / "scratch"
    p = load_params(root / "params.yaml", {"paths": {"ingest_images": str(data / "images"), "data_root": str(data)}})
    assert p.path("ingest_images") == data / "images" and (data / ".brainmri-data-root").is_file()
    (data / "images").mkdir()  # brainmri's own folder under its marked root: loads again
    assert load_params(root / "params.yaml", {"paths": {"ingest_images": str(data / "images"), "data_root": str(data)}})
