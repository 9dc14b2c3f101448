"""The `cxr` command: one sub-command per stage; it parses arguments and prints, the stage modules do the work."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cxr import commands, quiet, sweep
from cxr.redact import install_log_filter, redact
from cxr.storage import StorageError

DESCRIPTION = """cxr trains multi-label chest X-ray classifiers on Ray (NIH ChestX-ray14's 14 findings, or any label set
a dataset spec names: --dataset chexpert, mimic-cxr-jpg, padchest, csv or your own YAML), streaming prepared shards
from object storage, and records every run in MLflow. A typical session:

  cxr inspect DATA_ROOT [--dataset SPEC] check a dataset root (NIH's layout by default)
  cxr prepare DATA_ROOT s3://bucket/x    decode every image once into shards + manifest.json
  cxr train --config CONFIG key=value    train, score the best epoch on test, log it all to MLflow
  cxr sweep --config CONFIG --space SPACE.yaml            many trainings (Ray Tune + ASHA), the best registered
  cxr evaluate --model models:/NAME@champion --out DIR    the test report, with confidence intervals
  cxr promote --model-name NAME --candidate N             champion/challenger by a paired bootstrap
  cxr retrain --config CONFIG --prepare ROOT OUT          what a schedule runs: prepare, train, promote
  cxr predict --model models:/NAME@champion --images DIR --out p.parquet   score new studies (PNG/DICOM)

Paths are local paths or fsspec URLs (s3://…); S3 credentials come from the AWS_* environment."""


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none (None, an off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def _parser(sub: argparse._SubParsersAction, name: str, help: str, verbose: argparse.ArgumentParser,
            ) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", parents=[verbose],
                          formatter_class=_Defaults)


def build_parser() -> argparse.ArgumentParser:
    from cxr import __version__

    verbose = argparse.ArgumentParser(add_help=False)  # so that -v works before and after the sub-command
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging, and every library's output (TensorFlow's, Ray's) unfiltered")
    p = argparse.ArgumentParser(prog="cxr", description=DESCRIPTION, parents=[verbose],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"cxr {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = _parser(sub, "inspect", "validate a dataset root and summarise labels, splits and problems", verbose)
    q.add_argument("data_root", help="local path or fsspec URL laid out like the NIH release")
    _dataset_argument(q)
    q.add_argument("--json", action="store_true", help="one JSON object on stdout")
    q.add_argument("--scan-images", action="store_true", help="decode every image (finds truncated/RGBA/16-bit)")
    q.add_argument("--strict", action="store_true", help="exit non-zero if any problem is found")
    q.add_argument("--seed", type=int, default=0, help="seed of the patient-grouped split")
    q.add_argument("--val-fraction", type=float, default=0.1, help="fraction of train patients held out for val")
    q.add_argument("--test-fraction", type=float, default=0.2, help="test patients when no official lists exist")
    q.set_defaults(func=commands.cmd_inspect)

    s = _parser(sub, "synth", "write a synthetic dataset of chest-radiograph phantoms (NIH's or another layout)",
                verbose)
    s.add_argument("out_root", help="local folder to write (nih: images/, Data_Entry CSV, BBox list, split lists)")
    s.add_argument("--patients", type=int, default=550, help="patients (about 3.5 images each)")
    s.add_argument("--size", type=int, default=256, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="seed of everything drawn: the same seed, the same bytes")
    s.add_argument("--layout", choices=["nih", "chexpert", "mimic-cxr-jpg", "padchest", "csv"], default="nih",
                   help="the published layout to write, read by the built-in spec of that name (default nih)")
    s.add_argument("--messy", action="store_true", help="add the real files' defects (nih: one of each; other "
                   "layouts: each quirk at a count recorded in OUT/synth-quirks.json)")
    s.add_argument("--workers", type=int, default=None, help="drawing processes (default: one per CPU)")
    s.set_defaults(func=commands.cmd_synth)

    r = _parser(sub, "prepare", "convert a dataset root into resized TFRecord shards + manifest.json", verbose)
    r.add_argument("data_root", help="local path or fsspec URL laid out like the NIH release or as --dataset says")
    r.add_argument("out_uri", help="where shards and manifest.json go (local path, file://, s3://)")
    _dataset_argument(r)
    r.add_argument("--size", type=int, default=256, help="stored image side in pixels")
    r.add_argument("--codec", choices=["jpeg", "png", "uint8"], default="jpeg",
                   help="jpeg (q95, cheap to decode), lossless png, or uint8 (the bare pixels: nothing to decode, "
                        "3-4x the bytes of jpeg); see docs/data.md")
    r.add_argument("--quality", type=int, default=95, help="JPEG quality")
    r.add_argument("--images-per-shard", type=int, default=1000, help="images per TFRecord shard")
    r.add_argument("--num-workers", type=int, default=None, help="parallel Ray tasks (default: cluster CPUs)")
    r.add_argument("--seed", type=int, default=0, help="seed of the val split and of the shard order")
    r.add_argument("--val-fraction", type=float, default=0.1, help="fraction of train patients held out for val")
    r.add_argument("--test-fraction", type=float, default=0.2, help="test patients when no official lists exist")
    r.set_defaults(func=commands.cmd_prepare)

    t = _parser(sub, "train", "train on Ray, score the best checkpoint on test, record the run in MLflow", verbose)
    t.add_argument("--config", required=True, help="YAML config (configs/demo.yaml, ...); every key, its type, "
                   "default and meaning: docs/configuration.md; `cxr config --show` prints the resolved config")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    t.add_argument("--promote", action="store_true", help="evaluate the new model version and promote it over "
                   "@champion if it is better by `cxr promote`'s rules (what scheduled retraining runs)")
    t.set_defaults(func=commands.cmd_train)
    sweep.add_parser(_parser(sub, "sweep", "a hyperparameter sweep: many training runs (Ray Tune, ASHA), compared "
                             "in MLflow as a parent run and its children", verbose))

    rt = _parser(sub, "retrain", "the scheduled unit: prepare new data, train a challenger named by the date slot, "
                 "evaluate it and promote it if it beats @champion", verbose)
    rt.add_argument("--config", required=True, help="YAML config of the training run")
    rt.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.epochs=20")
    rt.add_argument("--slot", default=None, help="the schedule slot naming the run: YYYY-MM-DD, or the name of the "
                    "RayJob a scheduler made (NAME-YYYY-MM-DD, NAME-<minutes since the epoch>), which survives "
                    "retries (default: today, UTC); the same slot resumes the same run")
    rt.add_argument("--prepare", nargs=2, metavar=("DATA_ROOT", "OUT_URI"), default=None,
                    help="prepare DATA_ROOT into OUT_URI first and train on it")
    rt.add_argument("--size", type=int, default=256, help="with --prepare: stored image side")
    rt.add_argument("--codec", choices=["jpeg", "png", "uint8"], default="jpeg", help="with --prepare: codec")
    rt.add_argument("--images-per-shard", type=int, default=1000, help="with --prepare: images per shard")
    rt.set_defaults(func=commands.cmd_retrain)

    e = _parser(sub, "evaluate", "score a model on a split: per-finding AUROC with patient-level CIs, operating "
                "points, calibration, figures", verbose)
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a checkpoint folder, runs:/RUN/NAME, models:/NAME/VERSION or "
                       "models:/NAME@ALIAS")
    which.add_argument("--predictions", help="or a CSV/Parquet table of predictions made elsewhere (an image column "
                       "and one probability column per finding), scored against --data's labels")
    e.add_argument("--image-column", default=None, help="with --predictions: the image-name column (default: "
                   "'Image Index' or 'path')")
    e.add_argument("--against", default=None, help="with --predictions: a model or another table, compared on the "
                   "common images by a paired patient bootstrap")
    e.add_argument("--data", default=None, help="manifest (or its folder) or dataset root (default: the data the "
                   "model was trained on)")
    e.add_argument("--dataset", default=None, metavar="NAME_OR_SPEC.yaml", help="how --data, a raw root, is read: "
                   "a built-in dataset spec (nih, chexpert, mimic-cxr-jpg, padchest, csv) or a spec file (default: "
                   "as the model's run read it, else nih; docs/data.md)")
    e.add_argument("--labels", default=None, metavar="FILE", help="a CSV/Parquet of expert labels: the images it "
                   "labels are scored against it instead of the data's labels (needs --label-map)")
    e.add_argument("--label-map", default=None, metavar="NAME_OR_MAP.yaml", help="with --labels: which column is "
                   "which finding, what its values mean, which predicted findings score it; a built-in "
                   "(nih-majkowska2019) or a YAML file (docs/evaluation.md)")
    e.add_argument("--split", default=None, help="the split to score (default: test; with --predictions, "
                   "the table's rows)")
    e.add_argument("--val-split", default="val", help="the split the operating thresholds are chosen on")
    e.add_argument("--out", default=None, help="folder (local or URL) for report.json, report.md and the figures")
    _scoring_arguments(e)
    e.add_argument("--subgroups", default="auto", help="AUROC per subgroup of these attributes: sex,age,view or "
                   "some of them; 'auto' (default): each the data records; 'none': skip")
    e.add_argument("--age-bands", default="0,18,40,60,80", help="with --subgroups age: lower edges of the bands, "
                   "in years (the last band is open-ended)")
    e.add_argument("--no-record", action="store_true", help="do not log the evaluation to the model's MLflow run")
    e.set_defaults(func=commands.cmd_evaluate)

    pr = _parser(sub, "predict", "score images (PNG, JPEG, DICOM; a file, folder, glob or bucket prefix) with a "
                 "model, on Ray, into a Parquet or CSV table", verbose)
    pr.add_argument("--model", required=True, help="a checkpoint folder, runs:/…, models:/NAME/VERSION or "
                    "models:/NAME@ALIAS")
    pr.add_argument("--images", required=True, help="a file, a folder (recursively), a glob, or a URL prefix")
    pr.add_argument("--out", required=True, help="predictions.parquet or predictions.csv (local or URL); unreadable "
                    "files go to <out>.errors.csv")
    pr.add_argument("--num-workers", type=int, default=None, help="model replicas (default: one per GPU, else one "
                    "per node)")
    pr.add_argument("--batch-size", type=int, default=32, help="images per model call")
    pr.add_argument("--operating-point", choices=("sensitivity", "youden"), default="sensitivity",
                    help="the yes/no columns' thresholds, as the model's recorded `cxr evaluate` chose them on "
                    "validation: at its target sensitivity (0.9) or at Youden's J (default: sensitivity)")
    pr.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                    help="MLflow tracking URI for models:/ URIs (default: $MLFLOW_TRACKING_URI)")
    pr.set_defaults(func=commands.cmd_predict)

    x = _parser(sub, "explain", "Grad-CAM overlays and contact sheets; with a dataset's BBox list, localization "
                "accuracy in Wang et al.'s layout", verbose)
    x.add_argument("--model", required=True, help="a checkpoint folder, runs:/…, models:/NAME/VERSION or "
                   "models:/NAME@ALIAS")
    where = x.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", help="a dataset root with BBox_List_2017.csv: explain and score its annotated images")
    where.add_argument("--images", help="files, a folder, a glob or a URL prefix: overlays only (no ground truth)")
    x.add_argument("--out", required=True, help="folder (local or URL) for overlays/, sheets/ and localization.md")
    x.add_argument("--split", default="test", help="with --data: the split whose annotated images are scored, or "
                   "'all' (NIH's boxed images are all in its official test list)")
    x.add_argument("--findings", default=None, help="comma-separated findings (default: with --data those boxed on "
                   "each image, with --images each image's most probable)")
    x.add_argument("--max-overlays", type=int, default=12, help="overlay PNGs per finding (all images are scored)")
    x.add_argument("--batch-size", type=int, default=16, help="images per Grad-CAM batch")
    x.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    record = x.add_mutually_exclusive_group()
    record.add_argument("--record", action="store_true", help="with --images: log the overlays to the model's MLflow "
                        "run too (by default only --data's annotated-set figures and scores are logged there)")
    record.add_argument("--no-record", action="store_true", help="with --data: do not log to the model's MLflow run")
    x.set_defaults(func=commands.cmd_explain)

    c = _parser(sub, "config", "print a config file plus overrides as resolved, or the reference of every key", verbose)
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--show", action="store_true", help="the resolved config as YAML: what `cxr train` would use")
    what.add_argument("--doc", action="store_true", help="every key's type, default, meaning: docs/configuration.md")
    c.add_argument("--config", default=None, help="with --show: the YAML config")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="with --show: overrides, e.g. optim.lr=3e-4")
    c.set_defaults(func=commands.cmd_config)

    m = _parser(sub, "promote", "compare a registered version with @champion on the same test patients and move the "
                "alias only if it is better with confidence", verbose)
    m.add_argument("--model-name", required=True, help="the registered model")
    m.add_argument("--candidate", required=True, help="its version number, or the run id that registered it")
    m.add_argument("--data", default=None, help="the data both are scored on (default: the candidate's)")
    m.add_argument("--min-gain", type=float, default=0.0, help="the mean-AUROC gain's CI lower bound must exceed this")
    m.add_argument("--max-drop", type=float, default=0.02, help="no finding's AUROC may drop by more than this")
    m.add_argument("--min-unseen", type=float, default=0.5, help="the fraction of the test patients that must remain "
                   "once those either model trained or was validated on are left out; fewer is an error")
    m.add_argument("--min-auroc", type=float, default=None, help="the test mean AUROC a first model must reach to "
                   "become champion (off: the first registered model always does)")
    _scoring_arguments(m)
    m.add_argument("--dry-run", action="store_true", help="decide and explain, but tag and move nothing")
    m.set_defaults(func=commands.cmd_promote)
    return p


def _dataset_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, metavar="NAME_OR_SPEC.yaml", help="a built-in dataset spec (nih, "
                   "chexpert, mimic-cxr-jpg, padchest, csv) or a spec file; default nih (docs/data.md)")


def _scoring_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (of patients)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--batch-size", type=int, default=64, help="images per prediction batch")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; `key=value` overrides may also come after options ("--slot 2026-12-01 optim.epochs=4")."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; its local Ray (if it started one) ends with it, its folder kept if it failed or with -v."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter hides our output
    args = parse(argv)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    install_log_filter()
    if args.verbose:
        quiet.set_verbose()  # TensorFlow's start-up lines and library INFO logs too
    else:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers' level on import
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model loaded
    # MLflow prints "View run … at: URL" with the URL as given, credentials included; cxr prints its own.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    code = 1  # until the command returns: an exception keeps the local Ray's folder too
    try:
        code = _run(args)
        return code
    finally:
        if "cxr.cluster" in sys.modules:  # a local Ray may have started
            sys.modules["cxr.cluster"].finish(keep=code != 0 or args.verbose)


def _run(args: argparse.Namespace) -> int:
    """The command's exit code: 2 for bad input, 1 for storage or MLflow that failed; a bug's traceback."""
    try:
        if getattr(args, "model", None):  # evaluate, predict, explain: a model in an MLflow store needs the store
            from cxr.models.loading import require_tracking

            require_tracking(args.model, args.tracking_uri)
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as exc:  # includes config.ConfigError
        print(f"cxr {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except StorageError as exc:  # after its retries and deadline: the message names the object
        print(f"cxr {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not _tracking_error(exc):
            raise
        uri = getattr(args, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI") or "the tracking URI"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"cxr {args.command}: error: MLflow at {redact(uri)} failed: {redact(first)[:500]}", file=sys.stderr)
        return 1


def _tracking_error(exc: BaseException) -> bool:
    """An MLflow server that is down or refuses: worth one clear line, not a traceback."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    return isinstance(exc, MlflowException | RequestException)


if __name__ == "__main__":
    sys.exit(main())
