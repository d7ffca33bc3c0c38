"""Per-epoch curves come from the runs' history.json files, averaged over seeds per epoch."""

from __future__ import annotations

import json

import pytest

from mmrepro.report import load_histories, plot_curves
from mmrepro.report.curves import family_of, panels


def _run(root, method, seed, history):
    d = root / method / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"method": method, "setting": "complete", "seed": seed}))
    (d / "history.json").write_text(json.dumps(history))
    return d / "metrics.json"


def test_curves_average_seeds_per_epoch_and_plot(tmp_path):
    paths = [
        _run(tmp_path, "cggm", 0, [{"epoch": 1, "util_text": 0.5, "coeff_text": 1.0, "valid_loss": 1.0},
                                   {"epoch": 2, "util_text": 0.7, "coeff_text": 0.8, "valid_loss": 0.9}]),
        _run(tmp_path, "cggm", 1, [{"epoch": 1, "util_text": 0.6, "coeff_text": 1.2, "valid_loss": 1.1}]),
        _run(tmp_path, "joint", 0, [{"epoch": 1, "valid_loss": 1.3}]),
    ]
    h = load_histories(paths)
    util = h[(h.method == "cggm") & (h.key == "util_text")].groupby("step")["value"].mean()
    assert util.to_dict() == pytest.approx({1: 0.55, 2: 0.7})
    png, pdf = plot_curves(h, tmp_path / "curves")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:4] == b"%PDF"


def test_a_run_without_history_is_an_error_naming_the_file(tmp_path):
    path = _run(tmp_path, "joint", 0, [])
    path.with_name("history.json").unlink()
    with pytest.raises(ValueError, match="history.json"):
        load_histories([path])


def test_cggm_coefficients_are_drawn_by_median_and_extreme_share(tmp_path):
    paths = [
        _run(tmp_path, "cggm", 0, [{"epoch": 1, "coeff_text": 4e5, "coeff_median_text": 0.9, "coeff_extreme_share": 0.1,
                                    "util_text": 0.5, "valid_loss": 1.0}]),
        _run(tmp_path, "ogm_ge", 0, [{"epoch": 1, "coeff_text": 0.7, "valid_loss": 1.0}]),
    ]
    assert family_of("coeff_median_text") == "coeff_median_" and family_of("coeff_text") == "coeff_"
    assert family_of("coeff_extreme_share") == "coeff_extreme_share"
    h = load_histories(paths)
    assert [f for f, _ in panels(h)] == ["util_", "coeff_median_", "coeff_extreme_share", "coeff_", "valid_loss"]
    # without a run that logs plain coefficients only, CGGM's epoch means get no panel
    assert ("coeff_", "epoch") not in panels(load_histories(paths[:1]))
    png, _ = plot_curves(h, tmp_path / "curves")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
