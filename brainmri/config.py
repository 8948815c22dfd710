"""params.yaml loaded once into frozen, typed objects; unknown keys and impossible values stop the run."""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent

from brainmri.core.errors import ConfigError
from brainmri.core.limits import (
    CLASS_NAME,
    MAX_CLASSES,
    MAX_FILE_BYTES,
    MAX_INPUT_SIZE,
    MAX_PIXELS,
    MAX_SIDE,
    MIN_INPUT_SIZE,
    NAME,
    path_problem,
)

PARAMS_FILE = "params.yaml"


SMALL_CNN = "SmallCNN"  # the built-in from-scratch reference backbone (no keras.applications class, no weights)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def require_min(self, section: str, **lows: float) -> None:
        """Raise naming `section.key` for each key whose value is below its lower bound."""
        for key, low in lows.items():
            if getattr(self, key) < low:
                raise ValueError(f"{section}.{key} must be at least {low}, got {getattr(self, key)}")


class Files(Section):
    model: str
    history: str
    train_metrics: str
    live: str
    scores: str
    metrics: str
    predictions: str
    roc: str
    confusion: str
    confusion_png: str
    onnx: str
    onnx_int8: str
    export_metrics: str
    card: str
    benchmark: str
    audit: str
    cv_predictions: str
    ensemble: str
    saliency: str
    heatmaps: str


class Paths(Section):
    code: str
    weights_inbox: str
    subjects_inbox: str
    data_root: str
    weights: str
    served: str
    registry: str
    ingest_images: str
    ingest_manifest: str
    ingest_report: str
    split_manifest: str
    split_report: str
    split_ledger: str
    split_test_history: str
    augment_images: str
    augment_manifest: str
    ingest_cache: str
    feature_cache: str
    onnx_cache: str
    timing_cache: str
    models: str
    eval: str
    report: str
    export: str
    benchmark: str
    audit: str
    external_images: str
    external_manifest: str
    external_report: str
    external_eval: str
    ensemble: str
    saliency: str
    files: Files

    @model_validator(mode="after")
    def _check(self):
        for key in type(self).model_fields:
            if key != "files" and (why := path_problem(getattr(self, key))):
                raise ValueError(f"paths.{key} {why}")
        if not self.subjects_inbox.strip():  # the ingest stage depends on this folder: '' would name the whole project
            raise ValueError("paths.subjects_inbox must name a folder (the subjects tables' inbox), got ''")
        for key, name in self.files.model_dump().items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
                raise ValueError(f"paths.files.{key} {name!r} must be a plain file name (letters, digits, '_', '.', '-')")
        return self


class External(Section):
    source: str

    @model_validator(mode="after")
    def _check(self):
        if why := path_problem(self.source):
            raise ValueError(f"external.source {why}")
        return self


class Exclusion(Section):
    path: str  # relative to the folder holding the class folders, e.g. 'yes/Y248.JPG'
    reason: str


class Ingest(Section):
    source: str
    classes: list[str]
    positive_class: str
    max_pixels: int
    max_file_bytes: int
    max_side: int
    min_images_per_class: int
    archive_max_members: int
    archive_max_bytes: int
    crop_to_content: bool
    outlier_z: float
    exclude: list[Exclusion]
    subjects: str  # a CSV of source_path, subject inside paths.subjects_inbox; "" for none (brainmri/intake/subjects.py)
    keep_mixed_subjects: bool

    @model_validator(mode="after")
    def _check(self):
        if self.outlier_z <= 0:
            raise ValueError(f"ingest.outlier_z must be above 0, got {self.outlier_z}")
        paths = [e.path for e in self.exclude]
        if len(set(paths)) != len(paths):
            raise ValueError(f"ingest.exclude lists a path twice: {sorted(x for x, k in Counter(paths).items() if k > 1)}")
        if any(not e.reason.strip() for e in self.exclude):
            raise ValueError("ingest.exclude: every excluded file needs a reason")
        if why := path_problem(self.source):
            raise ValueError(f"ingest.source {why}")
        if self.subjects and (why := path_problem(self.subjects)):
            raise ValueError(f"ingest.subjects {why}")
        for name in self.classes:
            if not CLASS_NAME.fullmatch(name):
                raise ValueError(
                    f"ingest.classes: {name[:80]!r} is not a usable class folder name: 1-64 letters, digits, spaces, '_', '.' "
                    "or '-', starting with a letter or digit and not ending in a space"
                )
        for key, most in (("max_side", MAX_SIDE), ("max_pixels", MAX_PIXELS), ("max_file_bytes", MAX_FILE_BYTES)):
            if getattr(self, key) > most:  # export writes these into every model; predict refuses a model past them
                raise ValueError(
                    f"ingest.{key} must be at most {most} (what predict accepts in a model's metadata), got {getattr(self, key)}"
                )
        self._check_classes()
        self.require_min(
            "ingest", max_pixels=1, max_file_bytes=1, max_side=1, min_images_per_class=1, archive_max_members=1, archive_max_bytes=1
        )
        return self

    def _check_classes(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"ingest.classes must name two or more different class folders, got {self.classes}")
        if len(self.classes) > MAX_CLASSES:  # what a model's metadata (and so predict) takes
            raise ValueError(f"ingest.classes names {len(self.classes)} classes; at most {MAX_CLASSES}")
        if len(self.classes) == 2 and self.positive_class not in self.classes:
            raise ValueError(f"ingest.positive_class {self.positive_class!r} is not one of ingest.classes {self.classes}")
        if len(self.classes) > 2 and self.positive_class:
            raise ValueError(
                f'ingest.positive_class applies only to two classes; with {len(self.classes)} classes set it to "" '
                f"(got {self.positive_class!r})"
            )

    @property
    def binary(self) -> bool:
        """Two classes: one sigmoid output, P(positive_class), and a threshold; more: softmax over `label_names`."""
        return len(self.classes) == 2

    @property
    def negative_class(self) -> str:
        if not self.binary:  # a binary-only path reached with N classes fails here, loudly, not with a wrong name
            raise ConfigError(f"ingest.negative_class is defined for two classes only; ingest.classes has {len(self.classes)}")
        return next(c for c in self.classes if c != self.positive_class)

    @property
    def label_names(self) -> tuple[str, ...]:
        """Class names by label index: (negative, positive) for two classes (label 1 = positive_class, as always),
        otherwise ingest.classes in the order given."""
        return (self.negative_class, self.positive_class) if self.binary else tuple(self.classes)

    def label_index(self, names) -> np.ndarray:
        """Integer labels of class names (an iterable of str): positions in `label_names`; -1 for a name outside them."""
        lookup = {c: i for i, c in enumerate(self.label_names)}
        return np.array([lookup.get(str(n), -1) for n in names], dtype=int)


class Dedupe(Section):
    hash_size: int
    max_distance: int
    min_correlation: float
    min_partial_correlation: float
    exact_up_to: int
    neighbours: int

    @model_validator(mode="after")
    def _check(self):
        if self.exact_up_to < 0 or self.neighbours < 0:
            raise ValueError(f"dedupe.exact_up_to and dedupe.neighbours must be 0 or more, got {self.exact_up_to} and {self.neighbours}")
        if not 0.0 < self.min_partial_correlation <= 1.0:
            raise ValueError(f"dedupe.min_partial_correlation must be in (0, 1], got {self.min_partial_correlation}")
        if not 4 <= self.hash_size <= 32:
            raise ValueError(f"dedupe.hash_size must be between 4 and 32, got {self.hash_size}")
        if not 0 <= self.max_distance <= self.hash_size**2:
            raise ValueError(f"dedupe.max_distance must be between 0 and {self.hash_size**2}, got {self.max_distance}")
        if not -1.0 <= self.min_correlation <= 1.0:
            raise ValueError(f"dedupe.min_correlation must be between -1 and 1, got {self.min_correlation}")
        return self


class Split(Section):
    train: float
    val: float
    test: float

    @model_validator(mode="after")
    def _check(self):
        fracs = {"train": self.train, "val": self.val, "test": self.test}
        bad = [k for k, v in fracs.items() if not 0.0 < v < 1.0]
        if bad:
            raise ValueError(f"split fractions must each lie strictly between 0 and 1: {', '.join(f'split.{k}={fracs[k]}' for k in bad)}")
        if abs(sum(fracs.values()) - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must sum to 1, got {sum(fracs.values()):.4f}")
        return self


class Augment(Section):
    copies: int
    rotation: float
    shift: float
    shear: float
    zoom: float
    horizontal_flip: bool
    brightness: list[float]

    @model_validator(mode="after")
    def _check(self):
        self.require_min("augment", copies=0)
        for key, hi in (("rotation", 180.0), ("shift", 0.5), ("shear", 45.0), ("zoom", 0.9)):
            if not 0.0 <= getattr(self, key) <= hi:
                raise ValueError(f"augment.{key} must be between 0 and {hi}, got {getattr(self, key)}")
        if len(self.brightness) != 2 or not 0.0 < self.brightness[0] <= self.brightness[1]:
            raise ValueError(f"augment.brightness must be [low, high] with 0 < low <= high, got {self.brightness}")
        return self


class Synthetic(Section):
    out: str
    n_per_class: int
    min_size: int
    max_size: int
    duplicate_fraction: float

    @model_validator(mode="after")
    def _check(self):
        self.require_min("synthetic", n_per_class=1)
        if why := path_problem(self.out):
            raise ValueError(f"synthetic.out {why}")
        if not 32 <= self.min_size <= self.max_size:
            raise ValueError(f"synthetic sizes need 32 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if not 0.0 <= self.duplicate_fraction <= 0.5:
            raise ValueError(f"synthetic.duplicate_fraction must be between 0 and 0.5, got {self.duplicate_fraction}")
        return self


def candidates(value) -> list:
    """A grid setting's candidates: a list is tried value by value, a single value is the only one."""
    return list(value) if isinstance(value, list) else [value]


class Train(Section):
    batch_size: int
    feature_batch_size: int
    feature_precision: Literal["auto", "fp32", "bf16"]
    class_weight: Literal["balanced", "none"]
    threshold: Literal["youden"] | float | list[Literal["youden"] | float]
    calibration: Literal["temperature", "platt", "none"]
    cv_folds: int
    cv_seeds: int
    bootstrap: int

    @model_validator(mode="after")
    def _check(self):
        self.require_min("train", batch_size=1, feature_batch_size=1, bootstrap=0)
        rules = candidates(self.threshold)
        if not rules or len(set(map(str, rules))) != len(rules):
            raise ValueError(f"train.threshold: a list of rules must be non-empty and without repeats, got {self.threshold}")
        for rule in rules:
            if isinstance(rule, float) and not 0.0 < rule < 1.0:
                raise ValueError(f"train.threshold must be 'youden' or a number between 0 and 1 (or a list of them), got {rule}")
        if self.cv_seeds < 1:
            raise ValueError(f"train.cv_seeds must be at least 1 (one cross-validation run), got {self.cv_seeds}")
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ValueError(f"train.cv_folds must be 0 (off) or at least 2, got {self.cv_folds}")
        return self


# backbone settings a list turns into a grid, chosen by CV
GRID = ("feature_layer", "learning_rate", "dropout", "epochs", "dense", "l2", "linear_c")
LINEAR_FIXED = ("learning_rate", "dropout", "epochs", "l2")  # what a linear head (dense 0, fitted to convergence) does not use
HIDDEN_FIXED = ("linear_c",)  # what a head with a hidden layer does not use
COPIES = "augment"  # a grid point's key when a model's augment lists both: train with the augmented copies or without


class Backbone(Section):
    application: str
    weights: str
    input_size: int
    pooling: Literal["avg", "max"]
    feature_layer: str | list[str]
    dense: int | list[int]
    l2: float | list[float]
    linear_c: float | list[float]
    dropout: float | list[float]
    learning_rate: float | list[float]
    epochs: int | list[int]
    patience: int
    fine_tune_layers: int
    fine_tune_epochs: int
    fine_tune_learning_rate: float

    @model_validator(mode="after")
    def _check(self):
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.application):
            raise ValueError(f"application must name a keras.applications class such as VGG16, got {self.application!r}")
        for key in GRID:
            values = candidates(getattr(self, key))
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{key}: a list of candidates must be non-empty and without repeats, got {getattr(self, key)}")
        for layer in candidates(self.feature_layer):
            if layer and not re.fullmatch(r"[A-Za-z0-9_]+", layer):
                raise ValueError(f"feature_layer must be empty (the whole base) or a layer name such as block4_pool, got {layer!r}")
        if not MIN_INPUT_SIZE <= self.input_size <= MAX_INPUT_SIZE:
            raise ValueError(
                f"input_size must be between 32 pixels (the smallest the backbones accept) and {MAX_INPUT_SIZE} "
                f"(what predict accepts in a model's metadata), got {self.input_size}"
            )
        self.require_min("backbone", patience=0, fine_tune_layers=0, fine_tune_epochs=0)
        self._check_head()
        self._check_training()
        return self

    def _check_training(self) -> None:
        """Epochs, dropout and learning rates in their ranges, every candidate of a grid."""
        for epochs in candidates(self.epochs):
            if epochs < 1:
                raise ValueError(f"backbone.epochs must be at least 1, got {epochs}")
        for dropout in candidates(self.dropout):
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for key, values in (("learning_rate", candidates(self.learning_rate)), ("fine_tune_learning_rate", [self.fine_tune_learning_rate])):
            for v in values:
                if not 0.0 < v < 1.0:
                    raise ValueError(f"{key} must be between 0 and 1, got {v}")

    def _check_head(self) -> None:
        """dense 0 is a linear head: a logistic regression on the standardised features, at scikit-learn's C (linear_c)."""
        dense, l2, c = candidates(self.dense), candidates(self.l2), candidates(self.linear_c)
        if any(d < 0 for d in dense) or any(v < 0 for v in l2):
            raise ValueError(f"dense and l2 must be at least 0, got dense {self.dense}, l2 {self.l2}")
        if any(not 0 < v < float("inf") for v in c):
            raise ValueError(f"linear_c (a linear head's inverse penalty, scikit-learn's C) must be above 0, got {self.linear_c}")
        if 0 in dense and self.application == SMALL_CNN:
            raise ValueError(f"dense 0 (a linear head on cached features) does not apply to {SMALL_CNN}, which trains end to end")

    def grid(self) -> list[dict]:
        """Every combination of the GRID settings' candidates, in params order (the first is the grid's first point).
        A linear head (dense 0) ignores learning_rate, dropout, epochs and l2, and a hidden layer ignores linear_c: each
        appears once per setting it uses, the ones it ignores at their first candidates."""
        import itertools

        firsts = {k: candidates(getattr(self, k))[0] for k in (*LINEAR_FIXED, *HIDDEN_FIXED)}
        points = []
        for combo in itertools.product(*(candidates(getattr(self, k)) for k in GRID)):
            point = dict(zip(GRID, combo, strict=True))
            point.update({k: firsts[k] for k in (LINEAR_FIXED if point["dense"] == 0 else HIDDEN_FIXED)})
            if point not in points:
                points.append(point)
        return points

    def at(self, setting: dict) -> Backbone:
        """This backbone with the grid settings fixed to `setting`'s values (a model's COPIES key is not the backbone's)."""
        return self.model_copy(update={k: v for k, v in setting.items() if k in GRID})


class Export(Section):
    opset: int
    parity_tolerance: float
    int8_calibration_images: int
    int8_calibration_method: Literal["minmax", "percentile", "entropy"] | list[Literal["minmax", "percentile", "entropy"]]
    reduce_range: bool | list[bool]

    @model_validator(mode="after")
    def _check(self):
        for key in ("int8_calibration_method", "reduce_range"):
            values = candidates(getattr(self, key))
            if not values or len(set(values)) != len(values):
                raise ValueError(f"export.{key}: a list of candidates must be non-empty and without repeats, got {getattr(self, key)}")
        if not 13 <= self.opset <= 21:
            raise ValueError(f"export.opset must be between 13 and 21 (what tf2onnx and ONNX Runtime support), got {self.opset}")
        self.require_min("export", parity_tolerance=0, int8_calibration_images=1)
        return self


class Benchmark(Section):
    batch_size: int
    warmup: int
    warmup_next: int
    repeats: int
    min_repeats: int
    seconds: float
    threads: int
    reuse_minutes: int

    @model_validator(mode="after")
    def _check(self):
        self.require_min(
            "benchmark", batch_size=2, warmup=0, warmup_next=0, repeats=3, min_repeats=3, seconds=0, threads=1, reuse_minutes=0
        )
        if self.min_repeats > self.repeats:
            raise ValueError(f"benchmark.min_repeats ({self.min_repeats}) must not exceed benchmark.repeats ({self.repeats})")
        return self


class Orchestration(Section):
    task_runner: Literal["thread", "dask"]
    max_workers: int
    dask_address: str
    retries: int
    retry_delay: int
    exclusive: list[str]
    cron: str
    timezone: str

    @model_validator(mode="after")
    def _check(self):
        self.require_min("orchestration", max_workers=1, retries=0, retry_delay=0)
        if len(self.cron.split()) != 5:
            raise ValueError(f"orchestration.cron must have 5 fields (minute hour day month weekday), got {self.cron!r}")
        return self


class Saliency(Section):
    min_head_share: float
    images: int

    @model_validator(mode="after")
    def _check(self):
        self.require_min("saliency", images=1)
        if not 0.0 <= self.min_head_share <= 1.0:
            raise ValueError(f"saliency.min_head_share must be in [0, 1], got {self.min_head_share}")
        return self


class Audit(Section):
    folds: int
    bootstrap: int
    image_size: int
    shortcut_auc: float

    @model_validator(mode="after")
    def _check(self):
        self.require_min("audit", folds=2, bootstrap=100, image_size=32)
        if not 0.5 <= self.shortcut_auc < 1.0:
            raise ValueError(f"audit.shortcut_auc must be in [0.5, 1), got {self.shortcut_auc}")
        return self


class Ensemble(Section):
    members: list[str]
    max_steps: int
    tta_flip: bool

    @model_validator(mode="after")
    def _check(self):
        self.require_min("ensemble", max_steps=1)
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"ensemble.members lists a model twice: {self.members}")
        if len(self.members) == 1:
            raise ValueError("ensemble.members: one model is no ensemble; list two or more, or none to turn it off")
        return self


class ModelSpec(Section):
    backbone: str
    augment: bool | list[bool]

    @model_validator(mode="after")
    def _check(self):
        values = candidates(self.augment)
        if not values or len(set(values)) != len(values):
            raise ValueError(f"augment: true, false, or a list of both (a grid dimension chosen by CV), got {self.augment}")
        return self


class Promotion(Section):
    model: str
    margin: float
    bootstrap: int
    save_experiment: bool

    @model_validator(mode="after")
    def _check(self):
        self.require_min("promotion", bootstrap=100)
        if not 0 <= self.margin < 1:
            raise ValueError(f"promotion.margin must be in [0, 1), got {self.margin}")
        return self


class Params(Section):
    seed: int
    paths: Paths
    ingest: Ingest
    dedupe: Dedupe
    split: Split
    augment: Augment
    train: Train
    backbones: dict[str, Backbone]
    models: dict[str, ModelSpec]
    export: Export
    benchmark: Benchmark
    audit: Audit
    saliency: Saliency
    ensemble: Ensemble
    external: External
    orchestration: Orchestration
    promotion: Promotion
    synthetic: Synthetic

    _root: Path = PrivateAttr(default=Path("."))

    @model_validator(mode="after")
    def _check_models(self):
        if not 0 <= self.seed < 2**31:  # non-negative, and seed + k (per fold, per CV run) within the 32 bits every library takes
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")
        for section, keys in (("models", self.models), ("backbones", self.backbones)):  # dvc.yaml puts them into shell commands
            for name in keys:
                if not NAME.fullmatch(name):
                    raise ValueError(
                        f"{section}.{name[:80]!r}: a name is 1-64 letters, digits, '-', '_' and '.', starting with a letter or digit"
                    )
        for key, bb in self.backbones.items():
            self._check_weights(key, bb.weights)
        self._check_subjects()
        self._check_grids()
        self._check_ensemble()
        if self.promotion.model not in self.models:
            raise ValueError(f"promotion.model {self.promotion.model!r} is not a key of models ({', '.join(self.models)})")
        return self

    def _check_grids(self) -> None:
        """Every model names a backbone; a grid is chosen by CV on cached features: say so before any work."""
        for name, spec in self.models.items():
            if spec.backbone not in self.backbones:
                raise ValueError(f"models.{name}.backbone {spec.backbone!r} is not a key of backbones ({', '.join(self.backbones)})")
        for name, spec in self.models.items():
            bb = self.backbones[spec.backbone]
            cached = self.train.cv_folds and not (bb.fine_tune_layers and bb.fine_tune_epochs) and bb.application != SMALL_CNN
            if len(self.grid(name)) > 1 and not cached:
                raise ValueError(
                    f"backbones.{spec.backbone} (model {name}): lists (there, or models.{name}.augment) are a grid chosen by "
                    "cross-validation on cached features; that needs train.cv_folds >= 2, no fine-tuning and a frozen "
                    "transfer backbone. Give single values"
                )

    def _check_ensemble(self) -> None:
        """Ensemble candidates must be cross-validated transfer models of one input size; two classes only, so far."""
        if self.ensemble.members and not self.ingest.binary:  # its member selection, threshold and composed graph are two-class
            raise ValueError(
                f"ensemble.members: the ensemble is built for two classes only; ingest.classes has {len(self.ingest.classes)}. "
                "Leave ensemble.members empty"
            )
        for name in self.ensemble.members:
            if name not in self.models:
                raise ValueError(f"ensemble.members: {name!r} is not a key of models ({', '.join(self.models)})")
            bb = self.backbones[self.models[name].backbone]
            if not self.train.cv_folds or bb.application == SMALL_CNN or (bb.fine_tune_layers and bb.fine_tune_epochs):
                raise ValueError(
                    f"ensemble.members: {name!r} has no out-of-fold CV predictions to choose members by: members must be "
                    "transfer models on cached features, with train.cv_folds >= 2 and no fine-tuning"
                )
        sizes = {self.backbones[self.models[n].backbone].input_size for n in self.ensemble.members}
        if len(sizes) > 1:
            raise ValueError(f"ensemble.members: the members take different input sizes ({sorted(sizes)}); one ONNX input needs one size")

    def _check_weights(self, key: str, weights: str) -> None:
        """A weights file must lie in the weights inbox once its path is normalized: 'weights/../elsewhere/x.h5' does not."""
        if weights in ("imagenet", "none"):
            return
        if why := path_problem(weights):
            raise ValueError(f"backbones.{key}.weights {why}")
        inbox = os.path.normpath(self.paths.weights_inbox)
        if not os.path.normpath(weights).startswith(inbox + os.sep):
            raise ValueError(
                f"backbones.{key}.weights {weights!r} is outside the weights inbox {self.paths.weights_inbox}/ "
                "(paths.weights_inbox) once '..' is resolved; put the file, or a symlink to it, there"
            )

    def _check_subjects(self) -> None:
        """A subjects table must lie in the subjects inbox once its path is normalized: the ingest stage depends on that
        folder in dvc.yaml (DVC cannot depend on a path that may be empty), so a table elsewhere would not be tracked."""
        if not self.ingest.subjects:
            return
        inbox = os.path.normpath(self.paths.subjects_inbox)
        if not self.ingest.subjects.strip() or os.path.normpath(self.ingest.subjects) == inbox:
            raise ValueError(
                f"ingest.subjects {self.ingest.subjects!r} names no file; name a CSV table in {self.paths.subjects_inbox}/, or '' for none"
            )
        if not os.path.normpath(self.ingest.subjects).startswith(inbox + os.sep):
            raise ValueError(
                f"ingest.subjects {self.ingest.subjects!r} is outside the subjects inbox {self.paths.subjects_inbox}/ "
                "(paths.subjects_inbox) once '..' is resolved; put the table, or a symlink to it, there"
            )

    @property
    def root(self) -> Path:
        return self._root

    def path(self, key: str) -> Path:
        """Absolute path of `paths.<key>`, resolved against the folder holding params.yaml."""
        return self._root / getattr(self.paths, key)

    def grid(self, name: str) -> list[dict]:
        """Model `name`'s grid: its backbone's points, each with and without the augmented copies (key COPIES) when
        the model's augment lists both, so CV chooses between them on equal terms."""
        spec = self.models[name]
        points = self.backbones[spec.backbone].grid()
        if isinstance(spec.augment, bool) or len(spec.augment) == 1:
            return points
        return [{**point, COPIES: copies} for point in points for copies in spec.augment]

    def model(self, name: str) -> ModelSpec:
        """The models.<name> entry; a ConfigError lists the known names."""
        if name not in self.models:
            raise ConfigError(f"unknown model {name!r}; models in params.yaml: {', '.join(self.models)}")
        return self.models[name]

    def model_file(self, folder: str, model: str, file: str) -> Path:
        """`paths.<folder>/<model>/<paths.files.<file>>`: where one model's file lives."""
        return self.path(folder) / model / getattr(self.paths.files, file)

    def resolve(self, rel: str) -> Path:
        return self._root / rel


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Params
    for part in loc:
        if model is None:
            return None
        if getattr(model, "__origin__", None) is dict:  # dict[str, Section]: any key, then the Section
            model = model.__args__[1]
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(err: ValidationError, file: Path) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"unknown key '{key}'{hint}; allowed keys here: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"missing key '{key}'")
        elif e["type"] == "value_error":
            where = f"'{key}': " if key else ""
            lines.append(where + str(e["ctx"]["error"]))
        else:
            lines.append(f"'{key}': {e['msg'].lower()} (got {e.get('input')!r})")
    return f"{file}: " + "; ".join(lines)


MAX_YAML_BYTES = 1_000_000  # params.yaml is about 10 KB; a larger file is a mistake, and the cap bounds what is read
MAX_YAML_DEPTH = 64  # params.yaml nests 4 levels; dvc.lock about 6


def read_yaml(path: Path):
    """YAML 1.2, as DVC reads and writes it (params.yaml, dvc.lock): bare yes/no are strings, not booleans.

    Anything that stops the file being read becomes one ConfigError sentence: not a regular file (a named pipe
    would block), too large, unreadable, not UTF-8, nested too deeply, or using aliases. Aliases are refused on
    the parser's events, before any node is built, because a few nested aliases expand to billions of values
    ("billion laughs") once validation or merging walks them; params.yaml and dvc.lock never need them.
    """
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if st.st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {st.st_size} bytes is too large for a parameters file (at most {MAX_YAML_BYTES})")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    yaml = YAML(typ="safe")  # libyaml's C parser (ruamel.yaml.clib) when installed, as DVC reads the same files; YAML 1.2 either way
    depth = 0
    try:
        for event in yaml.parse(text):
            depth += isinstance(event, CollectionStartEvent) - isinstance(event, CollectionEndEvent)
            if depth > MAX_YAML_DEPTH:  # stop before any node is built: construction recurses per level
                raise ConfigError(f"{path}: line {event.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
            if isinstance(event, AliasEvent):
                raise ConfigError(
                    f"{path}: line {event.start_mark.line + 1}: YAML alias *{event.anchor} refused; write the value out "
                    "(aliases can expand exponentially, the 'billion laughs' attack)"
                )
        return yaml.load(text)
    except ValueError as exc:  # Python refuses to read integers of more than 4,300 digits (a guard against slow parsing)
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a parameters file") from None  # a guard: the depth cap comes first


def load_params(path: str | Path = PARAMS_FILE, overrides: dict | None = None) -> Params:
    """Read, validate and freeze params.yaml; `overrides` is a nested dict merged on top (for tests and profiles)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        data = read_yaml(path)
    except YAMLError as exc:  # ruamel's messages span several lines with a source excerpt: keep the problem and its line
        problem, mark = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0], getattr(exc, "problem_mark", None)
        raise ConfigError(f"{path}: not valid YAML: {f'line {mark.line + 1}: ' if mark else ''}{problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if overrides:
        data = merge(data, overrides)
    try:
        _check_values(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    params._root = path.resolve().parent
    check_outputs(params, path)
    return params


INPUT_PATHS = ("code", "weights_inbox", "subjects_inbox", "files", "data_root")  # paths.* keys that are not outputs: code, inboxes, names
PROJECT_FILES = (  # beside this params file and beside the code (the demo's params are in demo/, its repository one up)
    *(".git", ".dvc", "dvc.yaml", "dvc.lock", ".dvcignore", ".gitignore", "README.md", "pyproject.toml", "Makefile", "params.yaml"),
    *("versions.yaml", "requirements.lock", "prefect.yaml", ".venv", ".ci", "docs", "mkdocs.yml"),
)
CODE_FOLDERS = ("brainmri", "tasks", "flows", "tests", "benchmarks", "demo")  # under paths.code


def _holds(a: str, b: str) -> bool:
    """Whether normalized absolute path `a` is `b` or a folder above it (strings: Path.parents made loading 20x slower)."""
    return a == b or b.startswith(a.rstrip(os.sep) + os.sep)


def _overlap(a: str, b: str) -> bool:
    return _holds(a, b) or _holds(b, a)


def check_outputs(p: Params, file: Path) -> None:
    """No output path (paths.*) is the project folder or holds it, and none equals, holds or lies in another output, an input
    (ingest.source, external.source, synthetic.out, paths.weights_inbox, paths.subjects_inbox, ingest.subjects) or a file
    or folder the project needs (this params file, DVC's and git's, the code). A stage replaces its outputs whole
    (fsutil.atomic_dir), so an output of '' or the raw data's folder would delete the project or the data. Paths are
    compared as written and as resolved through links. Checked wherever the code loads params; plain `dvc repro`
    deletes a stage's outputs before its command runs, so after editing paths run `brainmri params` (it loads them)
    first."""
    root = p.root
    roots = (str(root), os.path.realpath(root))

    def forms(rel: str) -> tuple[str, str]:  # as written (a symlinked data folder is still the project's), and resolved
        joined = os.path.join(root, rel)
        return os.path.normpath(joined), os.path.realpath(joined)

    outs = {f"paths.{k}": getattr(p.paths, k) for k in Paths.model_fields if k not in INPUT_PATHS}
    for key, rel in outs.items():
        if not rel.strip() or any(_holds(w, r) for w, r in zip(forms(rel), roots, strict=True)):
            raise ConfigError(f"{file}: {key} {rel!r} is the project folder {root} or holds it: a stage replaces its outputs whole")
    keep = {"ingest.source": p.ingest.source, "synthetic.out": p.synthetic.out, "paths.weights_inbox": p.paths.weights_inbox}
    keep["paths.subjects_inbox"] = p.paths.subjects_inbox
    for key, rel in (("external.source", p.external.source), ("ingest.subjects", p.ingest.subjects)):
        if rel.strip():
            keep[key] = rel
    keep.update({name: name for name in (file.name, *PROJECT_FILES)})
    beside_code = (*CODE_FOLDERS, *PROJECT_FILES) if p.paths.code else CODE_FOLDERS  # "": the project files are those above
    keep.update({f"paths.code + {name}": p.paths.code + name for name in beside_code})
    keep.update(outs)
    seen = {other: forms(rel) for other, rel in keep.items()}
    # the project's own folder seen from the code (the demo in demo/) holds every output by design
    guarded = {other: f for other, f in seen.items() if not any(_holds(t, r) for t, r in zip(f, roots, strict=True))}
    for key in outs:
        mine = seen[key]
        for other, theirs in guarded.items():
            if other != key and any(_overlap(a, b) for a, b in zip(mine, theirs, strict=True)):
                raise ConfigError(
                    f"{file}: {key} {outs[key]!r} overlaps {other} {keep[other]!r}: a stage replaces its outputs whole, "
                    "so each output needs a path of its own"
                )
    check_inside(p, file, roots)


DATA_ROOT_MARKER = ".brainmri-data-root"  # in paths.data_root: brainmri made this folder, so what is under it is brainmri's


def check_inside(p: Params, file: Path, roots: tuple[str, str]) -> None:
    """Every output lies inside the project, or under paths.data_root: a folder outside the project that brainmri made
    (or found empty) and marked. A stage replaces its outputs whole, so an output pointed at a user's folder elsewhere
    replaced that folder's contents."""

    def forms(rel: str) -> tuple[str, str]:
        joined = os.path.join(p.root, rel)
        return os.path.normpath(joined), os.path.realpath(joined)

    bases = [roots]
    if p.paths.data_root:
        bases.append(_data_root(p, file, forms(p.paths.data_root), roots))
    for key in Paths.model_fields:
        if key in INPUT_PATHS:
            continue
        rel = getattr(p.paths, key)
        if not any(_holds(b, f) for base in bases for b, f in zip(base, forms(rel), strict=True)):  # a link of the user's: theirs
            raise ConfigError(
                f"{file}: paths.{key} {rel!r} lies outside the project {p.root}; outputs stay inside it unless "
                "paths.data_root names a folder outside it for them"
            )


def _data_root(p: Params, file: Path, data_root: tuple[str, str], roots: tuple[str, str]) -> tuple[str, str]:
    """paths.data_root, checked: not holding the project, and new, empty or marked by brainmri (then marked)."""
    if any(_holds(d, r) for d, r in zip(data_root, roots, strict=True)):
        raise ConfigError(f"{file}: paths.data_root {p.paths.data_root!r} holds the project; name a folder of its own outside it")
    folder = Path(data_root[0])
    try:
        if folder.is_dir() and any(folder.iterdir()) and not (folder / DATA_ROOT_MARKER).is_file():
            raise ConfigError(
                f"{file}: paths.data_root {p.paths.data_root!r} holds files brainmri did not write (no {DATA_ROOT_MARKER} "
                "in it); name a new or empty folder, so that nothing of yours is replaced"
            )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DATA_ROOT_MARKER).touch()
    except OSError as exc:
        raise ConfigError(f"{file}: paths.data_root {p.paths.data_root!r} cannot be used: {exc.strerror or exc}") from None
    return data_root


def _check_values(data, where: str = "") -> None:
    """NaN compares false with every bound, so no range check would catch it, and no setting means infinity; an integer past 64 bits is no
    count or seed any library takes (JSON records and NumPy fail on it far from here)."""
    if isinstance(data, dict):
        for key, value in data.items():
            _check_values(value, f"{where}{key}.")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _check_values(value, f"{where}{i}.")
    elif isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"'{where[:-1]}': {data} is not a value any setting takes; give a finite number")
    elif isinstance(data, int) and not isinstance(data, bool) and abs(data) >= 2**63:
        raise ConfigError(f"'{where[:-1]}': an integer of {data.bit_length()} bits is too large (at most 2**63 - 1)")


def merge(base: dict, over: dict) -> dict:
    """Recursively merge `over` into a copy of `base`."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
