"""What each `cxr` sub-command does with its parsed arguments: call the stage's module and print its summary.

Split from `cxr.cli` (which parses, sets up logging and turns errors into exit codes) to keep each module short.
"""

from __future__ import annotations

import argparse
import json
import sys

from cxr.redact import redact


def cmd_inspect(args: argparse.Namespace) -> int:
    from cxr.data import roots

    roots.require(args.data_root)  # "no such folder", not a metadata file missing from it
    if args.dataset not in (None, "nih"):
        return _inspect_spec(args)
    from cxr.data import metadata

    ds = metadata.load(args.data_root, seed=args.seed, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, scan_images=args.scan_images,
                       progress=not args.json)
    s = metadata.summary(ds)
    if args.json:
        json.dump(s, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        from cxr.data.spec_summary import render_nih

        print(render_nih(s))
    if args.strict and s["problems"]:
        print(f"--strict: {len(s['problems'])} problem(s) found", file=sys.stderr)
        return 1
    return 0


def _inspect_spec(args: argparse.Namespace) -> int:
    """`--dataset SPEC`: the generic reader (cxr.data.tabular); NIH roots keep cmd_inspect's own path."""
    from cxr.data import spec_summary

    s = spec_summary.inspect(args.dataset, args.data_root, seed=args.seed, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction, scan_images=args.scan_images)
    print(json.dumps(s, default=str) if args.json else spec_summary.render(s))
    if args.strict and s["problems"]:
        print(f"--strict: {len(s['problems'])} problem(s) found", file=sys.stderr)
    return int(args.strict and bool(s["problems"]))


def cmd_synth(args: argparse.Namespace) -> int:
    from cxr import synth

    if args.layout != "nih":
        s = synth.synthesize_layout(args.out_root, args.layout, patients=args.patients, size=args.size,
                                    seed=args.seed, messy=args.messy, workers=args.workers)
        print(f"wrote {s['images']:,} phantoms of {s['patients']:,} patients to {args.out_root} in the "
              f"{args.layout} layout ({', '.join(s['files'])}) in {s['seconds']:.1f}s")
        if args.messy:
            print("quirks: " + ", ".join(f"{k} {v}" for k, v in s["quirks"].items()) + " (synth-quirks.json)")
        return 0
    s = synth.synthesize(args.out_root, patients=args.patients, size=args.size, seed=args.seed,
                         messy=args.messy, workers=args.workers)
    print(f"wrote {s['images']:,} phantoms of {s['patients']:,} patients to {args.out_root} "
          f"in {s['seconds']:.1f}s ({s['bboxes']} boxes)")
    if args.messy:
        print("defects: " + ", ".join(f"{k}={v}" for k, v in s["defects"].items()))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from cxr.data.prepare import prepare
    from cxr.data.shards import Params

    params = Params(size=args.size, codec=args.codec, quality=args.quality, images_per_shard=args.images_per_shard,
                    seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    s = prepare(args.data_root, args.out_uri, params, num_workers=args.num_workers, dataset=args.dataset)
    kinds = ", ".join(f"{k} {v}" for k, v in s.get("excluded_counts", {}).items())
    print(f"prepared {s['images']:,} images into {redact(s['manifest'])}: converted {s['converted']:,} in "
          f"{s['shards_written']} new shards ({s['shards_kept']} kept from an earlier run), "
          f"{s['images_per_second']:,} img/s, {s['bytes'] / 1e6:,.1f} MB, quarantined {s['quarantined']}, "
          f"excluded by metadata {s['excluded_by_metadata']}{f' ({kinds})' if kinds else ''}, {s['seconds']}s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cxr import config

    # every config error surfaces here, before Ray starts
    cfg = config.with_absolute_paths(config.load(args.config, args.overrides))
    from cxr import workflow

    s = workflow.run(cfg, promote=args.promote)
    if s.get("already_finished"):
        print(f"run {cfg.run.name} already finished ({s['epochs_done']} epochs, best epoch {s['best_epoch']}, "
              f"registered as {s['model_name']} version {s['model_version']}); nothing to train. Use another "
              "run.name for a new run, or raise optim.epochs to continue this one.")
        return 0
    best = "none" if s["best_epoch"] is None else str(int(s["best_epoch"]))
    early = " (stopped early)" if s["stopped_early"] else ""
    print(f"\nrun {cfg.run.name}: {s['epochs_done']} epoch(s){early}, best epoch {best}; AUROC per finding:")
    print(s["table"])
    if s["skipped_images"] or s["test_images_skipped"]:
        shown = ", ".join(redact(u) for u in s["skipped_images"][:5]) + (" …" if len(s["skipped_images"]) > 5 else "")
        print(f"skipped as unreadable: {len(s['skipped_images'])} training image(s){': ' + shown if shown else ''}; "
              f"{s['test_images_skipped']} test image(s) (listed in the run's skipped_images.txt)")
    print(f"checkpoints: {redact(s['run_path'])}")
    print(f"MLflow: {redact(s['tracking_uri'])}  experiment {s['experiment']!r}  run {s['mlflow_run_id']}")
    from cxr.tracking.runs import ui_line

    print(ui_line(s["tracking_uri"], s["experiment_id"]))
    if s["model_version"]:
        print(f"model: {s['model_name']} version {s['model_version']} (models:/{s['model_name']}/{s['model_version']})")
    if s.get("decision"):
        print(s["decision"])
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from cxr import config
    from cxr.retrain import retrain

    cfg = config.with_absolute_paths(config.load(args.config, args.overrides))
    params = {"size": args.size, "codec": args.codec, "images_per_shard": args.images_per_shard}
    outcome = retrain(cfg, slot=args.slot, prepare=tuple(args.prepare) if args.prepare else None,
                      prepare_params=params)
    if outcome.details:
        print(outcome.details)
    print(outcome.line)
    return outcome.exit_code


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cxr.evaluation import report
    from cxr.evaluation.evaluate import evaluate

    if args.predictions:  # a table of predictions made elsewhere, scored against --data's labels
        from cxr.evaluation.tables import evaluate_table
        ev = evaluate_table(args.predictions, args.data, args.image_column, args.split, args.val_split, args.out,
                            args.resamples, args.confidence, args.seed, args.subgroups, args.age_bands, args.against,
                            args.tracking_uri, args.batch_size)
    else:
        ev = evaluate(args.model, args.data, split=args.split or "test", val_split=args.val_split, out=args.out,
                      resamples=args.resamples, confidence=args.confidence, seed=args.seed,
                      batch_size=args.batch_size, tracking_uri=args.tracking_uri, record=not args.no_record,
                      subgroup_attributes=args.subgroups, age_bands=args.age_bands)
    rep = ev.report
    print(report.console(rep))
    if args.out:
        print(f"report: {redact(args.out)}/report.md (and report.json, roc.png, pr.png, reliability.png"
              + (", subgroups.png)" if rep.get("subgroups", {}).get("attributes") else ")"))
    if rep["model"]["run_id"] and not args.no_record:
        print(f"logged to MLflow run {rep['model']['run_id']} under evaluation/{rep['data']['split']}/")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cxr.predict import predict

    s = predict(args.model, args.images, args.out, num_workers=args.num_workers, batch_size=args.batch_size,
                tracking_uri=args.tracking_uri, operating_point=args.operating_point)
    if s.thresholds:  # warnings (a model trained on phantoms, no thresholds) were logged as they were found
        print(f"yes/no columns: {s.thresholds}")
    print(f"predicted {s.predicted:,} of {s.inputs:,} images into {redact(s.out)} in {s.seconds:.1f} s "
          f"({s.images_per_second:,.1f} img/s)"
          + (f"; {s.errors:,} could not be read, listed with why in {redact(s.errors_out)}" if s.errors else ""))
    if not s.predicted:
        print(f"cxr predict: error: none of the {s.inputs:,} images could be read", file=sys.stderr)
        return 1
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from cxr.explain.explain import explain

    findings = [f.strip() for f in args.findings.split(",") if f.strip()] if args.findings else None
    ex = explain(args.model, args.out, data=args.data, images=args.images, findings=findings,
                 split=None if args.split == "all" else args.split, max_overlays=args.max_overlays,
                 batch_size=args.batch_size, tracking_uri=args.tracking_uri,
                 record=True if args.record else False if args.no_record else None)
    print(f"explained {ex.explained:,} of {ex.images:,} images in {ex.seconds:.1f} s"
          + (f"; {len(ex.errors):,} could not be read, listed with why in {redact(args.out)}/errors.csv"
             if ex.errors else ""))
    if ex.table:
        print(ex.table)
        print(f"localization: {redact(args.out)}/localization.md (and .json, T(IoBB) and T(IoU))")
    shown = sum(len(v) for v in ex.overlays.values())
    if shown:
        print(f"overlays: {redact(args.out)}/overlays/ ({shown} for {', '.join(sorted(ex.overlays))}); contact "
              f"sheets: {redact(args.out)}/sheets/")
    if ex.run_id:
        print(f"logged to MLflow run {ex.run_id} under explain/")
    if not ex.explained:
        print(f"cxr explain: error: none of the {ex.images:,} images could be read", file=sys.stderr)
        return 1
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from cxr import config

    sys.stdout.write(config.reference() if args.doc else config.show(args.config, args.overrides))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from cxr.tracking.promotion import promote

    decision = promote(args.model_name, args.candidate, tracking_uri=args.tracking_uri, data_uri=args.data,
                       min_gain=args.min_gain, max_drop=args.max_drop, confidence=args.confidence,
                       resamples=args.resamples, seed=args.seed, batch_size=args.batch_size, dry_run=args.dry_run,
                       min_unseen=args.min_unseen, min_auroc=args.min_auroc)
    print(decision.explain())
    return 0
