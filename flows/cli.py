"""The `brainmri` command: one subcommand per stage of dvc.yaml, plus the flow (run, demo, serve) and tools."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from brainmri.core.errors import BrainMRIError
from flows.serve import DEPLOYMENT

CODE_ROOT = Path(__file__).resolve().parent.parent  # the code's own repository: its dvc.yaml lists the stages (--params may be elsewhere)
ITEMS = {  # a `foreach` stage's item, as its command's argument
    "${models}": ("model", "a model name from the models section of params.yaml, e.g. vgg16-aug"),
    "${backbones}": ("backbone", "a backbone name from the backbones section of params.yaml, e.g. vgg16"),
}


def _params(args, overrides: dict | None = None):
    from brainmri.config import load_params

    return load_params(args.params, overrides)


def cmd_stage(args) -> None:
    import importlib

    from brainmri.core import timing_lock
    from brainmri.core.running import run_interruptible, stage_lock

    p = _params(args)
    item = [getattr(args, args.item)] if args.item else []  # a model or backbone key: checked against a pattern by params
    locks = p.path("timing_cache").parent / "locks"  # beside the timing memo, outside every DVC output
    with stage_lock(locks, "@".join([args.command, *item])), timing_lock.shared(p.path("timing_cache")):  # imports included
        module = importlib.import_module(f"tasks.{args.command}")
        run_interruptible(lambda: getattr(module, args.command)(p, *item))


def cmd_synthesize(args) -> None:
    from brainmri.intake.phantoms import class_kinds, generate

    p = _params(args)
    s = p.synthetic
    out = p.resolve(args.out) if args.out else p.resolve(s.out)
    tumor = class_kinds(p.ingest.classes, p.ingest.positive_class)
    n = generate(
        out, tumor, args.n or s.n_per_class, p.seed if args.seed is None else args.seed, s.min_size, s.max_size, s.duplicate_fraction
    )
    logging.getLogger("brainmri").info("synthesize: %d phantom images written to %s", n, out)


def cmd_predict(args) -> None:
    from brainmri.deploy.predict import predict

    frame = predict(args.model, args.inputs, args.out, overwrite=args.overwrite, runtime=args.runtime)
    errors = int((frame["error"] != "").sum())
    logging.getLogger("brainmri").info("predict: %d images -> %s (%d could not be read)", len(frame), args.out, errors)


def cmd_run(args) -> None:
    from flows.pipeline import run

    run(args.params, args.verbose, args.promote)


def cmd_serve(args) -> None:
    from prefect import serve

    from flows.serve import retraining

    o = _params(args).orchestration
    cron = args.cron or o.cron
    when = f"every {args.interval:g} s" if args.interval else f"cron '{cron}' ({o.timezone})"
    logging.getLogger("brainmri").info("serve: deployment %s, %s; Ctrl-C stops", args.name, when)
    serve(retraining(args.params, cron, args.interval, o.timezone, args.name))


def cmd_lineage(args) -> None:
    from brainmri.provenance.lineage import lineage, render

    p = _params(args)
    target = Path(args.artifact).resolve()
    if target.is_relative_to(p.path("served").resolve()):  # the promotion step's, not a stage's: its run says where it came from
        return _served_lineage(p, target)
    info = lineage(p.root, target)
    print(json.dumps(info, indent=2) if args.json else render(info))


def _served_lineage(p, target: Path) -> None:
    """The served model's record in the registry, and the lineage of the exported model it was copied from."""
    from brainmri.provenance.lineage import lineage, md5, render
    from flows.promote import read_registry

    registry = read_registry(p)
    rec = registry["served"]
    if rec is None:
        print(f"{target}: no model has been promoted yet (registry {p.path('registry')})")
        return
    run = next(r for r in registry["runs"] if r["run"] == rec["run"])
    print(f"{target}: served version {rec['version']} ({rec['stage']}), models.{rec['model']}, md5 {rec['md5']}")
    print(f"promoted by run {rec['run']} at {run['time']}: {run['reason']}")
    print(f"recorded as: {json.dumps(run.get('record', {}))}; git {json.dumps(run['git'])}")
    candidate = p.model_file("export", rec["model"], "onnx")
    if candidate.is_file() and md5(candidate) == rec["md5"]:
        print("the workspace's exported model is the served one; its lineage:\n")
        print(render(lineage(p.root, candidate)))
    else:
        print(f"the workspace has moved on since: `dvc exp apply {rec['run']}` then `dvc checkout` restores that run's files")


DEMO_BANNER = (
    "SYNTHETIC DEMO: every stage and every backbone on generated phantom images, small and offline. "
    "The numbers show the pipeline works, not how well it finds tumours."
)


def _headline(p) -> None:
    """Where the report is, and its results table."""
    from brainmri.report.tables import TABLES

    folder = p.path("report")
    print(f"\nReport: {folder / 'report.html'} (Markdown: {folder / 'report.md'})\n")
    if (folder / TABLES["results"]).is_file():
        print((folder / TABLES["results"]).read_text())


def cmd_demo(args) -> None:
    from flows.demo import prepare
    from flows.pipeline import run

    print(DEMO_BANNER, flush=True)
    p = prepare(Path(args.params).resolve().parent)
    run(str(p.root / "params.yaml"), args.verbose)
    print("\n" + DEMO_BANNER)
    _headline(p)


def cmd_quickstart(args) -> None:
    from flows.pipeline import run

    p = _params(args)
    source = p.resolve(p.ingest.source)
    if not source.exists():
        print(f"No dataset at {source} (ingest.source); running the offline demo instead. README: 'The real dataset'.")
        return cmd_demo(args)
    logging.getLogger("brainmri").info("quickstart: dataset found at %s; running the pipeline as configured", source)
    run(args.params, args.verbose)
    _headline(p)


def cmd_deps(args) -> None:
    from brainmri.config import read_yaml
    from brainmri.provenance import codedeps

    root = Path(args.params).resolve().parent
    dvc_file = root / "dvc.yaml"
    if args.write:
        changed = codedeps.write(root, dvc_file)
        print(f"updated for the import graph: {', '.join(changed)}" if changed else f"{dvc_file} and versions.yaml: already exact")
        return
    for stage, deps in codedeps.expected_deps(root, read_yaml(dvc_file)).items():
        print(f"{stage}: {' '.join(d.removeprefix(codedeps.CODE_PREFIX) for d in deps)}")


def cmd_params(args) -> None:
    print(json.dumps(_params(args).model_dump(), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainmri", description="Brain MRI tumour classification pipeline (DVC stages + Prefect flow).")
    parser.add_argument(
        "--params", default="params.yaml", help="parameters file; all paths in it are relative to its folder (default: %(default)s)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Prefect's and TensorFlow's own logs and every stage's full output"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_stage_commands(sub)
    add_synthesize(sub)
    add_flow_commands(sub)
    add_predict(sub)
    add_lineage(sub)
    add_project_commands(sub)
    return parser


def add_stage_commands(sub) -> None:
    """One subcommand per stage of dvc.yaml, the one list of stages: its help the stage's `desc`, and the item
    argument (model or backbone) of a `foreach` stage."""
    from brainmri.config import read_yaml

    for name, spec in read_yaml(CODE_ROOT / "dvc.yaml")["stages"].items():
        desc = spec.get("do", spec).get("desc")
        stage = sub.add_parser(name, help=desc, description=desc)
        item = None
        if "foreach" in spec:
            item, text = ITEMS[spec["foreach"]]
            stage.add_argument(item, help=text)
        stage.set_defaults(func=cmd_stage, item=item)


def add_synthesize(sub) -> None:
    syn = sub.add_parser(
        "synthesize",
        help="write synthetic MRI phantoms in class folders (synthetic.* params)",
        description="Write brain-MRI-like phantom images, one folder per class, deterministic by seed.",
    )
    syn.add_argument("--out", help="output folder (default: synthetic.out)")
    syn.add_argument("--n", type=int, help="images per class (default: synthetic.n_per_class)")
    syn.add_argument("--seed", type=int, help="seed (default: seed)")
    syn.set_defaults(func=cmd_synthesize)


def add_flow_commands(sub) -> None:
    """The commands that run the Prefect flow: run, serve, demo, quickstart."""
    run_p = sub.add_parser(
        "run",
        help="run the pipeline as a Prefect flow: the stages dvc repro would run, recorded in dvc.lock",
        description="Run the Prefect flow: every stale DVC stage (DVC decides), model branches fanned out per orchestration.*.",
    )
    run_p.add_argument(
        "--promote", action="store_true", help="then record the run and promote the model if it is not worse (as scheduled runs do)"
    )
    run_p.set_defaults(func=cmd_run)
    srv = sub.add_parser(
        "serve",
        help="serve the flow on a schedule (scheduled retraining); unchanged inputs run nothing",
        description="Serve the pipeline flow as a Prefect deployment with a schedule; runs until interrupted. "
        "Default schedule: orchestration.cron in params.yaml.",
    )
    when = srv.add_mutually_exclusive_group()
    when.add_argument("--cron", help="cron schedule, e.g. '0 3 * * 1' (default: orchestration.cron)")
    when.add_argument("--interval", type=float, help="run every this many seconds instead of on a cron")
    srv.add_argument("--name", default=DEPLOYMENT, help="deployment name (default: %(default)s)")
    srv.set_defaults(func=cmd_serve)
    sub.add_parser(
        "demo",
        help="run every stage and backbone on synthetic phantoms in demo/ (offline, a few minutes)",
        description="Write demo/params.yaml (params.yaml with demo/profile.yaml over it), make synthetic phantoms, "
        "and run the flow in demo/, a DVC workspace of its own; ends by printing the report's table.",
    ).set_defaults(func=cmd_demo)
    sub.add_parser(
        "quickstart",
        help="the main job: the pipeline on the dataset if it is in place, else the offline demo",
        description="Run the pipeline flow on ingest.source if it exists; otherwise run `brainmri demo`. "
        "Ends by printing where the report is and its results table.",
    ).set_defaults(func=cmd_quickstart)


def add_predict(sub) -> None:
    pred = sub.add_parser(
        "predict",
        help="classify images with an exported ONNX model (no TensorFlow needed)",
        description="Classify images with an exported ONNX model, with exactly the training preprocessing. "
        "Each INPUT is an image or a folder (searched recursively); unreadable files get an error row.",
    )
    pred.add_argument("--model", required=True, help="an exported model.onnx (its metadata holds size, threshold and classes)")
    pred.add_argument("--out", required=True, help="output table: .csv, or .json by extension; a new file unless --overwrite")
    pred.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out regular file (never the model, an input, a folder, a link or a special file)",
    )
    pred.add_argument(
        "--runtime",
        default="onnxruntime",
        choices=["onnxruntime", "openvino", "openvino-bf16"],
        help="what runs the model (default: %(default)s): OpenVINO fp32 matches ONNX Runtime within 1e-4 (measured 1e-6); "
        "openvino-bf16 needs a CPU "
        "with bf16 (AMX or AVX-512 BF16). Give model.int8.onnx for int8. `brainmri benchmark` times each and checks it on val",
    )
    pred.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    pred.set_defaults(func=cmd_predict)


def add_lineage(sub) -> None:
    lin = sub.add_parser(
        "lineage",
        help="print the chain of stages, params, input hashes, git commit and metrics behind an artifact",
        description="Trace an artifact (e.g. data/export/vgg16-aug/model.onnx) back to the raw data through dvc.lock.",
    )
    lin.add_argument("artifact", help="a file or folder some stage wrote, e.g. data/export/vgg16-aug/model.onnx")
    lin.add_argument("--json", action="store_true", help="print JSON instead of text")
    lin.set_defaults(func=cmd_lineage)


def add_project_commands(sub) -> None:
    """The commands about the project itself: its code deps and its params."""
    deps = sub.add_parser(
        "deps",
        help="print each stage's code deps, derived from the import graph; --write puts them into dvc.yaml",
        description="Each stage's code deps are exactly the project files its module imports, transitively (inside functions too).",
    )
    deps.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml (comments kept)")
    deps.set_defaults(func=cmd_deps)
    sub.add_parser(
        "params", help="print the validated parameters as JSON", description="Validate params.yaml and print it as JSON."
    ).set_defaults(func=cmd_params)


def main(argv: list[str] | None = None) -> int:
    from brainmri.core.machine import pool_tensorflow_memory

    pool_tensorflow_memory()  # every stage's TensorFlow, and the workers it spawns, pool their memory
    args = build_parser().parse_args(argv)
    if not args.verbose:  # Prefect's own console chatter off; its logs still reach the Prefect UI (the API handler)
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not args.verbose:  # other libraries (Prefect's run loggers propagate here): our summary says what failed
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.CRITICAL)
    ours = logging.getLogger("brainmri")
    ours.setLevel(logging.WARNING if args.quiet else logging.INFO)
    for handler in [h for h in ours.handlers if getattr(h, "brainmri_cli", False)]:
        ours.removeHandler(handler)  # main() called again in one process (tests): one handler, on today's stderr
    handler = logging.StreamHandler(sys.stderr)  # our own lines, plain, whatever the root handler lets through
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.brainmri_cli = True
    ours.addHandler(handler)
    ours.propagate = False
    from brainmri.core.running import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            args.func(args)
    except BrainMRIError as exc:
        print(f"brainmri {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"brainmri {args.command}: interrupted; outputs already in place were left untouched", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
