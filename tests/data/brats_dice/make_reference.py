"""Regenerate ``volumes.npz`` and ``reference.json``: Dice per BraTS region from the organisers' package.

Needs the package, which the project does not install (it caps numpy < 2.3 and pandas < 3):
    pip install brats-evaluation==0.0.10 && python tests/data/brats_dice/make_reference.py
The volumes are written once and read back on later runs, so the reference stays tied to them.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from datetime import date
from importlib.resources import files
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
SHAPE = (10, 12, 8)
FLIP = (0.15, 0.45, 0.0)  # share of voxels relabelled at random in each case's prediction


def volumes() -> tuple[np.ndarray, np.ndarray]:
    """Truth: random labels 0..3 in a box; prediction: the truth with a share of voxels relabelled.
    The last case predicts no enhancing tumour (label 3) at all: an empty prediction region."""
    rng = np.random.default_rng(0)
    truths, preds = [], []
    for share in FLIP:
        truth = np.zeros(SHAPE, np.uint8)
        truth[2:8, 3:9, 1:7] = rng.integers(0, 4, size=(6, 6, 6))
        pred = truth.copy()
        flip = rng.random(SHAPE) < share
        pred[flip] = rng.integers(0, 4, size=int(flip.sum()))
        if share == 0.0:
            pred[pred == 3] = 1
        truths.append(truth)
        preds.append(pred)
    return np.stack(preds), np.stack(truths)


def main() -> None:
    from panoptica import Panoptica_Evaluator

    path = HERE / "volumes.npz"
    if not path.exists():
        pred, truth = volumes()
        np.savez_compressed(path, pred=pred, truth=truth)
    saved = np.load(path)
    config = "config_gli.yaml"
    evaluator = Panoptica_Evaluator.load_from_config(str(files("brats_evaluation") / "configs" / config))
    cases = []
    for pred, truth in zip(saved["pred"], saved["truth"]):
        result = evaluator.evaluate(pred, truth, verbose=False)
        cases.append({region: float(result[region].to_dict()["global_bin_dsc"]) for region in ("et", "tc", "wt")})
    reference = {
        "what": "global_bin_dsc per region of each case in volumes.npz (pred[i] against truth[i])",
        "package": f"brats-evaluation=={importlib.metadata.version('brats-evaluation')}",
        "evaluator": f"panoptica=={importlib.metadata.version('panoptica')}, brats_evaluation/configs/{config}",
        "computed_with": f"python {platform.python_version()}, numpy {np.__version__}, {date.today().isoformat()}",
        "cases": cases,
    }
    (HERE / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")


if __name__ == "__main__":
    main()
