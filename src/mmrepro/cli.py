"""``mmrepro <verb>``: the only entry point the Snakemake rules call.

Each verb does one job of the DAG. Rules pass their wildcards and a JSON run spec built by
:mod:`mmrepro.config` (a file under ``<results>/specs/``; the JSON text itself is accepted too);
run ``mmrepro <verb> --help`` for the arguments of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path



def _spec_text(value: str) -> tuple[str, str]:
    """A spec argument's JSON and where it came from: the text itself (it starts with ``{``) or the
    file it names (what the rules pass: :func:`mmrepro.config.spec_file`)."""
    if value.lstrip().startswith("{"):
        return value, ""
    try:
        return Path(value).read_text(), f"{value}: "
    except OSError as e:
        raise argparse.ArgumentTypeError(f"no spec file {value} ({e.strerror}); pass a spec's JSON or its file") from None


def _json(value: str) -> dict:
    text, where = _spec_text(value)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{where}not valid JSON: {e}") from None


def _spec_from(value: str, kind: str):
    """A ``--spec`` of ``kind`` (a class of :mod:`mmrepro.spec`): JSON checked key by key."""
    from mmrepro import spec

    text, where = _spec_text(value)
    try:
        return getattr(spec, kind).from_json(text)
    except spec.SpecError as e:
        raise argparse.ArgumentTypeError(f"{where}{e}") from None


def _run_spec(value: str):
    """A job's run spec (:class:`mmrepro.spec.RunSpec`)."""
    return _spec_from(value, "RunSpec")


def _mechanism_spec(value: str):
    """A mechanisms point (:class:`mmrepro.spec.MechanismSpec`)."""
    return _spec_from(value, "MechanismSpec")


def _report_inputs(parser: argparse.ArgumentParser) -> None:
    """A report's options beside the runs: the paper's numbers and the study's report groups."""
    parser.add_argument("--reference", type=Path, default=None,
                        help="CSV of the paper's numbers (config/reference/<study>.csv), shown beside ours")
    parser.add_argument("--names", type=Path, default=None,
                        help="the mapping of the paper's names to ours (default: names.yaml beside --reference)")
    parser.add_argument("--groups", type=_json, default={},
                        help="JSON {group: [dataset, ...]}: datasets also reported as one row (the study's report_groups)")


def cmd_check_config(args: argparse.Namespace) -> int:
    from mmrepro.config import load_schema, read_config_files, validate_config

    validate_config(read_config_files(args.configfile), load_schema(args.schema))
    print(f"config OK: {', '.join(args.configfile)}")
    return 0


def cmd_init_tracking(args: argparse.Namespace) -> int:
    from mmrepro.config import EXPERIMENTS, ConfigError
    from mmrepro.jobs import write_json
    from mmrepro.tracking import artifact_root, init_store, server_problem, tracking_uri

    uri = tracking_uri(args.results, args.uri)
    # before any job is submitted: a server that refuses the jobs fails here, once, on the login node
    problem = server_problem(uri) if uri.startswith(("http://", "https://")) else None
    if problem:
        raise ConfigError(f"tracking.uri (or MLFLOW_TRACKING_URI): {problem}")
    ids = init_store(uri, EXPERIMENTS, artifact_root(args.results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"uri": uri, "experiments": ids})
    print(f"MLflow store ready at {uri}: {', '.join(ids)}")
    print(f"look at the runs: mlflow ui --app-name mmrepro --backend-store-uri {uri}; each study's columns "
          "(open once, then 'Override saved view'):")
    for name, exp_id in ids.items():  # workflowType: the training runs under a plain `mlflow ui` too
        print(f"  {name}: #/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey=compare")
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from mmrepro.jobs import write_json
    from mmrepro.tracking import artifact_root, ingest_runs, relocate_artifacts, tracking_uri

    uri = tracking_uri(args.results, args.uri)
    moved = relocate_artifacts(uri, artifact_root(args.results))  # a results folder moved since init-tracking
    if moved:
        print(f"artifact locations of {', '.join(moved)} now under {artifact_root(args.results).resolve()}")
    ids = ingest_runs(uri, [m.parent for m in args.metrics])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"uri": uri, "runs": ids})
    print(f"{len(ids)} runs in MLflow at {uri}")
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    from mmrepro.data import build_store

    manifest = build_store(args.dataset, args.entry, args.out.parent)
    if manifest.resolve() != args.out.resolve():
        raise SystemExit(f"--out must be <store folder>/manifest.json, got {args.out}")
    print(f"wrote {manifest}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from mmrepro.data.store import FeatureStore

    FeatureStore(args.manifest).verify()
    print(f"{args.manifest}: every array matches its recorded shape, dtype, size and SHA-256")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from mmrepro.data.download import (ChecksumMismatch, DatasetIncomplete, ManualDownloadRequired, UnsafeArchive,
                                       fetch_and_report, summary)

    if "path" not in args.entry:
        print(f"mmrepro fetch: error: the spec of dataset {args.dataset!r} has no 'path'", file=sys.stderr)
        return 2
    entry, checksums = args.entry, args.checksums or args.entry.get("checksums")
    try:
        if entry.get("stand_in"):   # random files in the real format: written here, held to their own digest
            from mmrepro.data.standin import entry as stand_in

            entry, notes = stand_in.fetch(args.dataset, entry)
            print("\n".join(notes))
            checksums = None
        report = fetch_and_report(args.dataset, entry.get("source"), entry["path"], checksums=checksums)
    except ManualDownloadRequired as e:
        print(f"mmrepro fetch: {e}", file=sys.stderr)
        return 2
    except (ChecksumMismatch, DatasetIncomplete, UnsafeArchive, OSError, ValueError) as e:
        print(f"mmrepro fetch: error: {e}", file=sys.stderr)
        return 1
    print(summary(report))
    return 0


def cmd_stand_in(args: argparse.Namespace) -> int:
    from mmrepro.config import read_config_files
    from mmrepro.data.standin import MANIFEST, OVERLAY, Scale, generate
    from mmrepro.data.standin.plan import FULL_MAX_BYTES

    config = read_config_files(args.configfile)
    max_bytes = (None if args.scale == "tiny" or (args.max_gb is not None and args.max_gb <= 0)
                 else FULL_MAX_BYTES if args.max_gb is None else int(args.max_gb * 1e9))
    try:
        manifest = generate(config.get("datasets", {}), args.out, Scale(args.scale, max_bytes), args.datasets,
                            seed=args.seed, configs=[str(p) for p in args.configfile])
    except ValueError as e:
        print(f"mmrepro stand-in: error: {e}", file=sys.stderr)
        return 2
    for rel in manifest["written"]:
        w = manifest["paths"][rel]
        counts = ", ".join(f"{k} {v}" for k, v in w["counts"]["written"].items())
        cut = f"  [{w['counts']['cut']}]" if w["counts"]["cut"] and w["scale"] == "full" else ""
        print(f"{w['bytes'] / 1e6:10.1f} MB {w['seconds']:7.1f} s  {rel}  ({counts}){cut}")
    print(f"wrote {manifest['bytes'] / 1e6:.1f} MB in {manifest['seconds']:.0f} s under {manifest['root']}; "
          f"config overlay {Path(manifest['root']) / OVERLAY}, manifest {Path(manifest['root']) / MANIFEST}")
    return 0


def _tuned(args: argparse.Namespace):
    """The run spec, with a search's best parameters when ``--tuned`` names its best.json (and marked
    when that search chose them with target labels)."""
    spec = args.spec
    if args.tuned is None:
        return spec
    best = json.loads(args.tuned.read_text())
    if (best["study"], best["dataset"], best["method"]) != (spec.study, spec.dataset, spec.method):
        raise SystemExit(f"--tuned {args.tuned} is the search of {best['study']}/{best['dataset']}/{best['method']}, "
                         "not of this run")
    if "target_labels_used" not in best:
        raise SystemExit(f"--tuned {args.tuned}: written before searches recorded whether they scored on target "
                         "labels; delete it and run the search's tune_best job again")
    return dataclasses.replace(spec.with_params(best["params"]), tuned_on_target_labels=best["target_labels_used"])


def _teacher(value: str) -> tuple[str, Path]:
    modality, sep, path = value.partition("=")
    if not sep or not modality or not path:
        raise argparse.ArgumentTypeError(f"expected MODALITY=PATH, got {value!r}")
    return modality, Path(path)


def cmd_train(args: argparse.Namespace) -> int:
    from mmrepro.jobs import train_job

    summary = train_job(_tuned(args), args.data, args.out_dir, args.threads, init=args.init,
                        teachers=dict(args.teacher) or None)
    print(json.dumps(summary["metrics"]["test"], indent=1))
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from mmrepro.jobs import adapt_job

    summary = adapt_job(_tuned(args), args.data, args.model, args.out_dir, args.threads, source_stats=args.source_stats)
    print(json.dumps(summary["metrics"]["test"], indent=1))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from mmrepro import tune
    from mmrepro.jobs import write_json

    if args.step == "create":
        out = tune.create(args.search)
    else:
        search = json.loads(args.search_file.read_text())
        if args.step == "work":
            out = tune.work(search, args.worker, args.data, args.init, args.threads)
        else:
            out = tune.best(search, args.data, args.init, args.threads, args.out.parent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


def _paper(path: Path | None, names: Path | None, study: str) -> object:
    """A study's paper numbers in our names (``names`` defaults to names.yaml beside the CSV); None without a CSV."""
    from mmrepro.report import load_reference

    return None if path is None else load_reference(path, names or path.with_name("names.yaml"), study)


def _study_reference(path: Path | None, names: Path | None, runs) -> object:
    """The paper's numbers for the runs' study, in our names (None without a CSV)."""
    if path is None:
        return None
    studies = sorted(set(runs["study"]))
    if len(studies) != 1:
        raise SystemExit(f"--reference needs runs of one study, got {studies}")
    return _paper(path, names, studies[0])


def cmd_report(args: argparse.Namespace) -> int:
    from mmrepro.report import add_baseline_delta, load_runs, plot_study, summarize, write_table
    from mmrepro.report.groups import add_groups, parse_groups
    from mmrepro.report.paired import add_paired
    from mmrepro.report.marking import marked, stand_in_title
    from mmrepro.report.tables import write_paper_table

    runs = load_runs(args.metrics)
    grouped = add_groups(runs, parse_groups(args.groups))
    summary = add_baseline_delta(summarize(grouped, reference=_study_reference(args.reference, args.names, runs)),
                                 grouped)
    paper = f"{args.paper_table}.md" if args.paper_table else ""
    with marked(stand_in_title(args.metrics)):
        write_table(add_paired(summary, grouped, args.paired_with), args.table, paper_table=paper)
        if args.paper_table:
            write_paper_table(summary, args.paper_table)
        plot_study(runs, args.plot)
    print(f"wrote {args.table}.{{md,csv,tex,html}}{f' and {paper}' if paper else ''} and {args.plot}.{{png,pdf}} "
          f"from {len(args.metrics)} runs")
    return 0


def cmd_paired_plot(args: argparse.Namespace) -> int:
    from mmrepro.report import load_runs
    from mmrepro.report.groups import add_groups, parse_groups
    from mmrepro.report.marking import marked, stand_in_title
    from mmrepro.report.paired import plot_paired

    with marked(stand_in_title(args.metrics)):
        plot_paired(add_groups(load_runs(args.metrics), parse_groups(args.groups)), args.paired_with, args.plot)
    print(f"wrote {args.plot}.{{png,pdf}} from {len(args.metrics)} runs")
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    from mmrepro.report import load_runs
    from mmrepro.report.ledger import write_ledger

    searches = [json.loads(path.read_text()) for path in args.searches]
    paths = write_ledger(load_runs(args.metrics), args.spec, args.table, args.plot, searches)
    print("wrote " + ", ".join(map(str, paths)) + f" from {len(args.metrics)} runs")
    return 0


def cmd_cggm_report(args: argparse.Namespace) -> int:
    from mmrepro.report.cggm import load_balance_runs, write_cggm_report
    from mmrepro.report.marking import marked, stand_in_title

    with marked(stand_in_title(args.metrics)):
        paths = write_cggm_report(load_balance_runs(args.metrics), args.table, args.plot)
    print(f"wrote {', '.join(map(str, paths))} from {len(args.metrics)} runs")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mmrepro.compare import load_tracked_runs
    from mmrepro.report import plot_study, summarize, write_table
    from mmrepro.tracking import tracking_uri

    runs = load_tracked_runs(tracking_uri(args.results, args.uri), args.experiment, args.filter)
    write_table(summarize(runs, reference=_study_reference(args.reference, args.names, runs)), args.table)
    if args.plot:
        plot_study(runs, args.plot)
    print(f"wrote {args.table}.{{md,csv,tex}} from {runs['path'].nunique()} MLflow runs of {args.experiment!r}"
          + (f" matching {args.filter!r}" if args.filter else ""))
    return 0


def cmd_curves(args: argparse.Namespace) -> int:
    from mmrepro.report import load_histories, plot_curves
    from mmrepro.report.marking import marked, stand_in_title

    with marked(stand_in_title(args.metrics)):
        plot_curves(load_histories(args.metrics), args.plot)
    print(f"wrote {args.plot}.{{png,pdf}} from the histories of {len(args.metrics)} runs")
    return 0


def cmd_mechanism(args: argparse.Namespace) -> int:
    import tempfile

    from mmrepro.jobs import write_json
    from mmrepro.mechanisms import Budget, run_point

    spec = args.spec
    with tempfile.TemporaryDirectory(prefix="mechanism.", dir=args.out.parent if args.out.parent.exists() else None) as tmp:
        point = run_point(spec.study, spec.dataset, float(spec.dose), spec.seed, Budget(**spec.budget),
                          Path(tmp), methods=spec.methods, params=spec.params, domain=spec.domain)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, point)
    print(json.dumps(point["diagnostic"], indent=1))
    return 0


def cmd_mechanisms_report(args: argparse.Namespace) -> int:
    from mmrepro.report.mechanisms import diagnostics_table, load_points, plot_mechanism

    points = load_points(args.points)
    diagnostics_table(points, args.table)
    for study in points["study"].unique():
        plot_mechanism(points, study, args.plots / study)
    print(f"wrote {args.table}.{{md,csv}} and one figure per study under {args.plots} from {len(args.points)} points")
    return 0


def cmd_missing_report(args: argparse.Namespace) -> int:
    from mmrepro.report.marking import marked, stand_in_title
    from mmrepro.report.missing import missing_report

    plots = {name: stem for name, stem in [("test", args.plot), ("train", args.train_rate_plot),
                                           ("prompt", args.prompt_length_plot)] if stem is not None}
    with marked(stand_in_title(args.metrics)):
        paths = missing_report(args.metrics, args.table, plots, _paper(args.reference, args.names, "missing"),
                               args.groups)
    print(f"wrote {', '.join(map(str, paths))} from {len(args.metrics)} runs")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mmrepro.doctor import render, run_checks

    checks = run_checks(args.configfile, args.schema)
    print(render(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmrepro", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Most users run the Snakemake workflow (snakemake --cores all <study>), "
                                       "which calls these verbs.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="verb", required=True, metavar="verb")

    s = sub.add_parser("check-config", help="validate config file(s) against the schema and the registries")
    s.add_argument("configfile", nargs="+", help="YAML config files, later ones override earlier keys")
    s.add_argument("--schema", default="workflow/schemas/config.schema.yaml", help="JSON schema (YAML)")
    s.set_defaults(func=cmd_check_config)

    doctor = ("check versions, threads, GPU, the config, the tracking store and the data; say what to fix "
              "(exit code 1 when something is broken)")
    s = sub.add_parser("doctor", help=doctor, description=doctor)
    s.add_argument("--configfile", nargs="+", type=Path, default=[Path("config/config.yaml")],
                   help="config files as given to snakemake (default: config/config.yaml)")
    s.add_argument("--schema", type=Path, default=Path("workflow/schemas/config.schema.yaml"), help="JSON schema (YAML)")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("init-tracking", help="create the MLflow store and one experiment per study (run once, before jobs)")
    s.add_argument("--results", required=True, help="results folder (holds mlflow.db and mlartifacts/)")
    s.add_argument("--uri", default=None, help="tracking URI from the config (MLFLOW_TRACKING_URI overrides)")
    s.add_argument("--out", type=Path, required=True, help="JSON file recording the URI and experiment ids")
    s.set_defaults(func=cmd_init_tracking)

    s = sub.add_parser("track", help="log finished runs (their folders' files) to MLflow, skipping runs already there")
    s.add_argument("--results", required=True, help="results folder (holds mlflow.db and mlartifacts/)")
    s.add_argument("--uri", default=None, help="tracking URI from the config (MLFLOW_TRACKING_URI overrides)")
    s.add_argument("--out", type=Path, required=True, help="JSON file recording each run folder's MLflow run id")
    s.add_argument("metrics", nargs="+", type=Path, help="metrics.json files of the runs (tracking.json is read beside each)")
    s.set_defaults(func=cmd_track)

    s = sub.add_parser("make-data", help="generate or convert a dataset into a feature store")
    s.add_argument("--dataset", required=True, help="dataset name (a key of the config's datasets)")
    s.add_argument("--spec", dest="entry", type=_json, required=True, help="the dataset's config entry: a JSON file or JSON text")
    s.add_argument("--out", type=Path, required=True, help="<store folder>/manifest.json to write")
    s.set_defaults(func=cmd_make_data)

    s = sub.add_parser("fetch", help="download (or resume) and verify a dataset's source files, or say how to get them")
    s.add_argument("--dataset", required=True, help="dataset name (a key of the config's datasets)")
    s.add_argument("--spec", dest="entry", type=_json, required=True,
                   help="the dataset's config entry: a JSON file or JSON text (path, source)")
    s.add_argument("--checksums", type=Path, default=None,
                   help="JSON registry of SHA-256 recorded on first download, for sources without a published "
                        "one (default: the spec's 'checksums', which the workflow sets to <data_root>/checksums.json)")
    s.set_defaults(func=cmd_fetch)

    stand_in = ("write random stand-in files in exactly the on-disk format each real dataset entry's loader reads "
                "(MMSA / MulT pickles, IEMOCAP's HDF5 folder, Food-101 images + titles + local encoder folders, "
                "BraTS NIfTI cases), plus OUT/stand_in.yaml, a config overlay pointing the entries at them, and "
                "OUT/stand_in.json, what was written")
    s = sub.add_parser("stand-in", help="write random stand-ins of the real datasets, to rehearse the paper grid",
                       description=stand_in + ". OUT/<path> mirrors each entry's path under data_root. Layer the "
                       "overlay last: snakemake -n --configfile config/paper.yaml OUT/stand_in.yaml. Values are "
                       "random: nothing trained on them is a result.")
    s.add_argument("--scale", choices=["tiny", "full"], required=True,
                   help="tiny: a handful of samples per split (every rehearsal job runs in seconds); full: the real "
                        "sample counts, sequence lengths, widths and volume sizes (cut in proportion past --max-gb)")
    s.add_argument("--out", type=Path, required=True, help="folder to write (new, empty, or an earlier stand-in folder)")
    s.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                   help="dataset entries to write (default: every entry with raw files)")
    s.add_argument("--configfile", nargs="+", type=Path, default=[Path("config/paper.yaml")],
                   help="config files naming the entries, later ones override (default: config/paper.yaml)")
    s.add_argument("--max-gb", type=float, default=None,
                   help="full scale: GB per entry; a corpus larger than this is cut to fit, in proportion in "
                        "every split, and the manifest says so (0: no cut; default 2: about 17 GB for all of paper.yaml)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random values (default 0)")
    s.set_defaults(func=cmd_stand_in)

    s = sub.add_parser("check-data", help="verify a feature store's arrays against its manifest checksums")
    s.add_argument("manifest", type=Path)
    s.set_defaults(func=cmd_check_data)

    for verb, helptext, func in (("train", "train one run (method x setting x seed) and evaluate it", cmd_train),
                                 ("adapt", "adapt a trained model at test time on a target split", cmd_adapt)):
        s = sub.add_parser(verb, help=helptext)
        s.add_argument("--spec", type=_run_spec, required=True, help="run spec: a JSON file or JSON text (built by mmrepro.config)")
        s.add_argument("--data", type=Path, required=True, help="feature store manifest.json")
        s.add_argument("--out-dir", type=Path, required=True, help="folder for metrics.json, model.pt, config.json")
        s.add_argument("--threads", type=int, default=1, help="CPU threads (Snakemake passes the rule's threads)")
        s.add_argument("--tuned", type=Path, default=None, help="best.json of the run's search: its parameters "
                       "replace the spec's")
        if verb == "train":
            s.add_argument("--init", type=Path, default=None, help="backbone checkpoint to start from (fine-tuning)")
            s.add_argument("--teacher", type=_teacher, action="append", default=[], metavar="MODALITY=MODEL_PT",
                           help="a trained unimodal run's model.pt, for methods that distil from teachers (umt)")
        else:
            s.add_argument("--model", type=Path, required=True, help="trained model checkpoint (model.pt)")
            s.add_argument("--source-stats", type=Path, default=None,
                           help="source feature statistics saved beside the backbone (feature_stats.pt), for SSA")
        s.set_defaults(func=func)

    s = sub.add_parser("tune", help="one step of an Optuna search: create the study, run a worker, or write the best")
    steps = s.add_subparsers(dest="step", required=True, metavar="step")
    t = steps.add_parser("create", help="create (or load) the study and its MLflow parent run; enqueue the default point")
    t.add_argument("--search", type=_json, required=True, help="search spec: a JSON file or JSON text (built by mmrepro.config.search_spec)")
    t.add_argument("--out", type=Path, required=True, help="search.json to write (the spec, with the parent run)")
    for step, helptext in (("work", "run trials until the study's shared budget is finished"),
                           ("best", "after every worker: finish the budget, write best.json and the plots beside it")):
        t = steps.add_parser(step, help=helptext)
        t.add_argument("--search-file", type=Path, required=True, help="search.json written by the create step")
        t.add_argument("--data", type=Path, required=True, help="feature store manifest.json")
        t.add_argument("--init", type=Path, default=None, help="backbone checkpoint the trials start from (or adapt)")
        t.add_argument("--threads", type=int, default=1, help="CPU threads")
        t.add_argument("--out", type=Path, required=True,
                       help="worker's summary JSON" if step == "work" else "best.json (history.png, importances.png beside)")
        if step == "work":
            t.add_argument("--worker", type=int, required=True, help="this worker's index (0 .. tune.workers - 1)")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("claims", help="the claims ledger: each paper's claim decided by paired runs (md, csv, png, pdf)")
    s.add_argument("--spec", type=_json, required=True, help="ledger spec: a JSON file or JSON text (built by mmrepro.claims.ledger_spec)")
    s.add_argument("--table", type=Path, required=True, help="output stem for claims.md and claims.csv")
    s.add_argument("--plot", type=Path, required=True, help="output stem for the intervals figure (png, pdf)")
    s.add_argument("--searches", nargs="*", type=Path, default=[], help="best.json of each search of the ledger")
    s.add_argument("metrics", nargs="+", type=Path, help="metrics.json files of the ledger's runs")
    s.set_defaults(func=cmd_claims)

    s = sub.add_parser("cggm-report", help="the CGGM paper's Tables 5 and 6 and Figure 5 from balance runs (md, png, pdf)")
    s.add_argument("--table", type=Path, required=True, help="output stem for the markdown tables")
    s.add_argument("--plot", type=Path, required=True, help="output stem for the sweep plot")
    s.add_argument("metrics", nargs="+", type=Path, help="metrics.json files of the balance study's runs")
    s.set_defaults(func=cmd_cggm_report)

    s = sub.add_parser("report", help="aggregate metrics.json files into a table (md, csv, tex) and a plot (png, pdf)")
    s.add_argument("--table", type=Path, required=True, help="output stem for the table files")
    s.add_argument("--plot", type=Path, required=True, help="output stem for the plot files")
    s.add_argument("--paper-table", type=Path, default=None,
                   help="output stem (md, html) for the paper's cells without a run of ours (none by default)")
    s.add_argument("--paired-with", default=None, metavar="METHOD",
                   help="the method the others are paired with (per-seed difference, bootstrap interval); none: no column")
    _report_inputs(s)
    s.add_argument("metrics", nargs="+", type=Path, help="metrics.json files of the study's runs")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("mechanism", help="one point of a mechanisms sweep: a study's diagnostic and methods' gains at a dose")
    s.add_argument("--spec", type=_mechanism_spec, required=True,
                   help="a JSON file or JSON text: study, dataset (config entry), dose, seed, budget, methods, params, "
                        "domain (shift)")
    s.add_argument("--out", type=Path, required=True, help="JSON file for the point")
    s.set_defaults(func=cmd_mechanism)

    s = sub.add_parser("mechanisms-report", help="figures (diagnostic and gains vs dose) and a diagnostics table")
    s.add_argument("--table", type=Path, required=True, help="output stem of the diagnostics table (md, csv)")
    s.add_argument("--plots", type=Path, required=True, help="folder for one figure per study (png, pdf)")
    s.add_argument("points", nargs="+", type=Path, help="point JSON files written by `mmrepro mechanism`")
    s.set_defaults(func=cmd_mechanisms_report)

    s = sub.add_parser("missing-report", help="the missing study's per-available-set table (MPLMM's Table 1 "
                                               "layout) and its curves over the test rate, training rate, prompt length")
    s.add_argument("--table", type=Path, required=True, help="output stem for the table files (md, csv, html)")
    s.add_argument("--plot", type=Path, default=None, help="output stem of the curve over the test missing rate (png, "
                                                             "pdf; none by default)")
    s.add_argument("--train-rate-plot", type=Path, default=None, help="output stem of the curve over the training "
                                                                       "missing rate (none by default)")
    s.add_argument("--prompt-length-plot", type=Path, default=None, help="output stem of the curve over the prompt "
                                                                          "length (none by default)")
    _report_inputs(s)
    s.add_argument("metrics", nargs="+", type=Path, help="metrics.json files of the missing study's runs")
    s.set_defaults(func=cmd_missing_report)

    s = sub.add_parser("compare", help="the report's table (and plot) from the MLflow store, for any filter of runs")
    s.add_argument("--experiment", required=True, help="MLflow experiment (a study: balance, missing, shift, peft)")
    s.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.dataset = 'synth' and "
                                                 "tags.method != 'joint'\" (finished runs only)")
    s.add_argument("--table", type=Path, required=True, help="output stem for the table files")
    s.add_argument("--plot", type=Path, default=None, help="output stem for the plot files (none by default)")
    s.add_argument("--results", default="results", help="results folder holding mlflow.db (default: results)")
    s.add_argument("--uri", default=None, help="tracking URI (MLFLOW_TRACKING_URI overrides)")
    s.add_argument("--reference", type=Path, default=None, help="as for report: the paper's numbers")
    s.add_argument("--names", type=Path, default=None, help="as for report: names.yaml beside --reference")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("paired-plot", help="each method's paired difference to a reference method, with its interval (png, pdf)")
    s.add_argument("--plot", type=Path, required=True, help="output stem for the plot files")
    s.add_argument("--paired-with", required=True, metavar="METHOD", help="the method the others are paired with")
    s.add_argument("--groups", type=_json, default={},
                   help="JSON {group: [dataset, ...]}: datasets also compared as one (the study's report_groups)")
    s.add_argument("metrics", nargs="+", type=Path, help="metrics.json files of the study's runs")
    s.set_defaults(func=cmd_paired_plot)

    s = sub.add_parser("curves", help="plot per-epoch curves (utilisation, coefficients, validation loss) of runs")
    s.add_argument("--plot", type=Path, required=True, help="output stem for the plot files")
    s.add_argument("metrics", nargs="+", type=Path, help="metrics.json files; history.json is read beside each")
    s.set_defaults(func=cmd_curves)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from mmrepro.config import ConfigError
    from mmrepro.data.download import ChecksumMismatch, DatasetIncomplete
    from mmrepro.data.schema import DataValidationError

    try:
        return args.func(args)
    except (ConfigError, DataValidationError, ChecksumMismatch, DatasetIncomplete, FileNotFoundError) as e:
        print(f"mmrepro {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
