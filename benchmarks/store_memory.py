"""Peak memory of converting and training on a MOSEI-sized dataset (issue: real datasets, item 2).

Claim under test: a MOSEI-sized MMSA pickle converts into the feature store with peak memory at
most 1.3x its arrays, and training reads the store memory-mapped without copying a whole split
per epoch.

Three stages, each in a fresh Python process so that one stage's memory never hides another's:

1. ``write``: an MMSA-layout ``unaligned_50.pkl`` with MOSEI's shapes (train/valid/test 16326 /
   1871 / 4659 samples; text BERT features 50x768, audio 500x74, vision 375x35, float32; plus
   ``text_bert``, ids, raw text, lengths and labels) filled with random numbers, split by split.
2. ``convert``: ``convert_mmsa`` + ``write_store``, the path ``mmrepro make-data`` takes. Reported:
   peak RSS (``VmHWM``) of the process minus its RSS before the conversion started, divided by
   the bytes of the arrays the store holds (the ratio the claim is about).
3. ``train``: one epoch of the real ``train_job`` (late-fusion backbone, batch 64) on the store.
   A sampling thread records, every 10 ms, the anonymous (``RssAnon``: memory the process owns)
   and file-backed (``RssFile``: pages of the memory-mapped arrays, page cache the kernel can drop)
   parts of the RSS. Reported: their peaks, minus the level before training, against the train
   split's bytes. A per-epoch copy of the split would show as anonymous memory of about 1x.

Usage: ``python benchmarks/store_memory.py [--scale 1.0] [--work DIR]`` (``--scale`` shrinks the
sample counts for a quick look; the claim is about ``--scale 1``, which needs ~8 GB of disk twice
and about 10 GB of memory). Writes ``benchmarks/results/store_memory.{json,md}`` and prints them.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MOSEI = {"train": 16326, "valid": 1871, "test": 4659}
SHAPES = {"text": (50, 768), "audio": (500, 74), "vision": (375, 35)}
OUT = Path(__file__).resolve().parent / "results"


def proc_status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def write_pickle(path: Path, scale: float) -> None:
    rng = np.random.default_rng(0)
    data = {}
    for split, n in MOSEI.items():
        n = max(8, int(n * scale))
        t_text, _ = SHAPES["text"]
        data[split] = {
            "id": np.array([f"video{i // 10}$_${i % 10}" for i in range(n)], dtype=object),
            "raw_text": np.array(["a clip"] * n, dtype=object),
            "text": rng.standard_normal((n, *SHAPES["text"]), dtype=np.float32),
            "text_bert": np.stack([rng.integers(100, 30000, (n, t_text)), np.ones((n, t_text)),
                                   np.zeros((n, t_text))], axis=1).astype(np.float32),
            "audio": rng.standard_normal((n, *SHAPES["audio"]), dtype=np.float32),
            "vision": rng.standard_normal((n, *SHAPES["vision"]), dtype=np.float32),
            "audio_lengths": rng.integers(1, SHAPES["audio"][0] + 1, n).tolist(),
            "vision_lengths": rng.integers(1, SHAPES["vision"][0] + 1, n).tolist(),
            "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
            "annotations": ["Neutral"] * n,
        }
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)


def convert(pickle_path: Path, store: Path) -> dict:
    from mmrepro.data.mmsa import convert_mmsa
    from mmrepro.data.store import FeatureStore, write_store

    reset_peak()
    before = proc_status()
    schema, splits, provenance = convert_mmsa(pickle_path, name="mosei_bench")
    manifest = write_store(store, schema, splits, provenance)
    after = proc_status()
    entries = FeatureStore(manifest).manifest["splits"]
    array_bytes = sum(e["bytes"] for s in entries.values() for e in s["arrays"].values())
    peak = after["VmHWM"] - before["VmRSS"]
    return {"pickle_bytes": pickle_path.stat().st_size, "store_array_bytes": array_bytes,
            "convert_peak_rss_bytes": peak, "convert_peak_over_arrays": peak / array_bytes}


class Sampler(threading.Thread):
    """Records the peaks of RssAnon and RssFile every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.peaks, self.stopped = interval, {"RssAnon": 0, "RssFile": 0}, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            status = proc_status()
            for key in self.peaks:
                self.peaks[key] = max(self.peaks[key], status[key])
            time.sleep(self.interval)


def train(store: Path, work: Path) -> dict:
    import os

    import yaml

    from mmrepro.config import load_schema, run_spec, validate_config
    from mmrepro.data.store import FeatureStore
    from mmrepro.jobs import train_job
    from mmrepro.tracking import init_store

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    config["datasets"] = {"mosei_bench": {"loader": "mmsa", "path": "unused", "task": "sentiment"}}
    config["studies"] = {"balance": {"datasets": ["mosei_bench"], "methods": ["joint"],
                                     "settings": {"complete": {"type": "complete"}}}}
    config["train"]["epochs"] = 1
    validate_config(config, load_schema(repo / "workflow" / "schemas" / "config.schema.yaml"))
    spec = run_spec(config, "balance", "mosei_bench", "joint", "complete", 0)
    uri = os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    init_store(uri, ["balance"], work / "artifacts")
    info = FeatureStore(store).manifest["splits"]["train"]
    train_bytes = sum(e["bytes"] for e in info["arrays"].values())
    before = proc_status()
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    train_job(spec, store / "manifest.json", work / "run", threads=2)
    seconds = time.perf_counter() - start
    sampler.stopped.set()
    sampler.join()
    anon = sampler.peaks["RssAnon"] - before["RssAnon"]
    file_backed = sampler.peaks["RssFile"] - before["RssFile"]
    return {"train_split_bytes": train_bytes, "train_samples": info["n"], "epoch_seconds": seconds,
            "train_peak_anon_bytes": anon, "train_peak_anon_over_split": anon / train_bytes,
            "train_peak_file_backed_bytes": file_backed}


def stage(name: str, *args: str) -> dict:
    """Run one stage in a fresh interpreter and return its JSON result."""
    done = subprocess.run([sys.executable, __file__, "--stage", name, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"stage {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {}


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of MOSEI's sample counts (1 = MOSEI)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    p.add_argument("--stage", choices=["write", "convert", "train"], help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage == "write":
        write_pickle(Path(args.paths[0]), args.scale)
        return
    if args.stage == "convert":
        print(json.dumps(convert(Path(args.paths[0]), Path(args.paths[1]))))
        return
    if args.stage == "train":
        print(json.dumps(train(Path(args.paths[0]), Path(args.paths[1]))))
        return

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        pkl, store = work / "unaligned_50.pkl", work / "store"
        stage("write", "--scale", str(args.scale), str(pkl))
        result = {"scale": args.scale, **stage("convert", str(pkl), str(store))}
        pkl.unlink()
        result.update(stage("train", str(store), str(work)))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "store_memory.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Feature-store memory, MOSEI-sized (scale {args.scale})", "",
        "| stage | measured | relative | claim |", "|---|---|---|---|",
        f"| convert pickle -> store | peak RSS +{gib(result['convert_peak_rss_bytes'])} | "
        f"{result['convert_peak_over_arrays']:.2f}x the store's arrays ({gib(result['store_array_bytes'])}) | <= 1.3x |",
        f"| train 1 epoch ({result['train_samples']} samples, {result['epoch_seconds']:.0f} s) | "
        f"peak anonymous +{gib(result['train_peak_anon_bytes'])} | {result['train_peak_anon_over_split']:.2f}x the train "
        f"split ({gib(result['train_split_bytes'])}) | no per-epoch copy (<< 1x) |",
        f"| (same epoch) | peak file-backed +{gib(result['train_peak_file_backed_bytes'])} | page cache of the "
        "memory-mapped arrays, reclaimable | |",
    ]
    (OUT / "store_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
