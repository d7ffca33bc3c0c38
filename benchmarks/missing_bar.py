"""The MPLMM issue's bar on synth, outside Snakemake and MLflow (so it runs on a bare GPU machine).

What it runs, per seed: a ``mplmm_mult`` backbone trained with plain joint training on complete
data of synth's pretraining task (MPLMM's stage 1), then each method fine-tuned from it on the
main task under the ``missing`` setting (training rate ``--rate``, patterns redrawn per epoch)
and scored on every available-set test case, their mean and a sweep of test missing rates, with
the library's own loaders, training loop and evaluation (``RunData``, ``fit``) as a pipeline
job uses them. Each run writes a ``metrics.json`` like a job's, so
``mmrepro missing-report --table T --plot P <out>/runs/*/*/metrics.json`` builds the Table 1
layout and the test-rate curve from them. Seeds run in parallel processes (``--workers``).

Example: ``python benchmarks/missing_bar.py --device cuda --seeds 0 1 2 3 4 --out benchmarks/results/bar``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
from pathlib import Path

import torch
import yaml

from mmrepro import reproducibility
from mmrepro.data import build_store
from mmrepro.jobs import RunData, write_json
from mmrepro.methods import TRANSFORMS, build
from mmrepro.methods.hooks import JointTraining
from mmrepro.methods.transforms import count_parameters
from mmrepro.models import build_model
from mmrepro.train import TrainConfig, fit

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=["mplmm", "modality_dropout", "modality_substitution"])
    p.add_argument("--rate", type=float, default=0.7, help="training missing rate")
    p.add_argument("--test-rates", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--n", type=int, nargs=3, default=None, metavar=("TRAIN", "VALID", "TEST"),
                   help="synth sizes (default: config/config.yaml's)")
    p.add_argument("--workers", type=int, default=None, help="parallel seed processes (default: one per seed)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per seed process (default 1)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/missing_bar"))
    return p.parse_args(argv)


def spec(args: argparse.Namespace, seed: int, method: str, task: str, setting: dict) -> dict:
    """A run spec as :func:`mmrepro.config.run_spec` builds it, for the parts ``RunData`` reads."""
    return {"study": "missing", "dataset": "synth", "method": method, "setting": setting["type"], "seed": seed,
            "task": task, "data_setting": {"type": setting["type"], "params": setting["params"]},
            "train": {"batch_size": 64}}


def model_for(data: RunData, args: argparse.Namespace) -> torch.nn.Module:
    return build_model(data.schema, data.task, backbone="mplmm_mult", d_model=args.d_model, layers=args.layers,
                       heads=args.heads, kernel=1, dropout=0.0, fusion_layers=1)


def run_seed(job: tuple[argparse.Namespace, Path, int]) -> list[str]:
    args, store, seed = job
    reproducibility.configure(seed, args.threads)
    cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=1e-3, patience=args.patience, clip=0.8, device=args.device)
    pre = RunData(store, spec(args, seed, "joint", "pretrain", {"type": "complete", "params": {}}))
    backbone = model_for(pre, args)
    result = fit(backbone, pre.loader("train", shuffle=True), pre.loader("valid"), JointTraining(), cfg)
    done = []
    missing = {"type": "missing", "params": {"rate": args.rate, "test_rates": args.test_rates}}
    for method in args.methods:
        reproducibility.configure(seed, args.threads)
        data = RunData(store, spec(args, seed, method, "main", missing))
        model = model_for(data, args)
        model.load_state_dict(result.best_state)
        params = {"prompt_length": args.prompt_length} if method.startswith("mplmm") else {}
        model = build(TRANSFORMS, method, params).apply(model)
        trainable, total = count_parameters(model)
        fitted = fit(model, data.loader("train", shuffle=True), data.loader("valid"), JointTraining(), cfg)
        model.load_state_dict(fitted.best_state)
        out = args.out / "runs" / method / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", {
            "study": "missing", "dataset": "synth", "method": method, "setting": f"rate{args.rate}", "seed": seed,
            "task": "regression", "label": "main", "backbone": "mplmm_mult", "metrics": data.evaluate(model, args.device),
            "trainable_params": trainable, "total_params": total, "best_epoch": fitted.best_epoch,
            "epochs_run": fitted.epochs_run, "backbone_params": count_parameters(backbone)[1]})
        done.append(str(out / "metrics.json"))
        print(f"seed {seed} {method}: done", flush=True)
    return done


def main(argv=None) -> int:
    args = parse_args(argv)
    synth = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["datasets"]["synth"]
    if args.n:
        synth["synth"]["n"] = dict(zip(("train", "valid", "test"), args.n))
    store = build_store("synth", synth, args.out / "store")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}))
    jobs = [(args, store, seed) for seed in args.seeds]
    with mp.get_context("spawn").Pool(args.workers or len(jobs)) as pool:
        paths = [p for done in pool.map(run_seed, jobs) for p in done]
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
