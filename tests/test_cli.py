"""The command line: every verb explains itself, bad input exits with a message, CI runs the README's command."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import REPO, SCHEMA, small_synth
from mmrepro.cli import main, parser
from mmrepro.data import build_store

VERBS = ["check-config", "doctor", "init-tracking", "track", "fetch", "make-data", "check-data", "train", "adapt",
         "tune", "report", "compare", "curves", "cggm-report", "missing-report", "mechanism", "mechanisms-report"]


def test_every_verb_is_listed_and_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for verb in VERBS:
        assert verb in top
        with pytest.raises(SystemExit) as done:
            main([verb, "--help"])
        assert done.value.code == 0
        assert "usage: mmrepro " + verb in capsys.readouterr().out


def test_check_config_accepts_the_default_and_names_the_bad_key(tmp_path, capsys):
    assert main(["check-config", str(REPO / "config" / "config.yaml"), "--schema", str(SCHEMA)]) == 0
    bad = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    bad["studies"]["balance"]["methods"] = ["joint", "magic"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["check-config", str(tmp_path / "bad.yaml"), "--schema", str(SCHEMA)]) == 2
    assert "config key studies.balance.methods[1]: unknown method 'magic'" in capsys.readouterr().err


@pytest.mark.parametrize("layers", [["paper.yaml"], ["grids/balance_synth.yaml"],
                                    ["grids/balance_synth.yaml", "grids/balance_cggm_sweeps.yaml"],
                                    ["grids/peft_synth.yaml", "grids/peft_synth_large.yaml"], ["grids/shift_synth_bar.yaml"]])
def test_every_shipped_config_layers_cleanly_over_the_default(layers):
    """Files layer as Snakemake's --configfile does: mappings merge, so a grid may name synth
    without redefining it."""
    files = [str(REPO / "config" / "config.yaml")] + [str(REPO / "config" / f) for f in layers]
    assert main(["check-config", *files, "--schema", str(SCHEMA)]) == 0


def test_check_data_reports_a_corrupted_array(tmp_path, capsys):
    manifest = build_store("synth", small_synth(train=20, valid=10, test=10), tmp_path / "synth")
    assert main(["check-data", str(manifest)]) == 0
    target = tmp_path / "synth" / "train" / "y" / "main.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    assert main(["check-data", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "split=train" in err and "key=y/main" in err


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^(pip install .*)$", readme, flags=re.M)
    assert len(commands) == 2 and "snakemake --cores all" in commands[0] and "pytest" in commands[1]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [commands[1]]


def test_parser_requires_a_verb():
    with pytest.raises(SystemExit):
        parser().parse_args([])


def test_report_puts_the_papers_numbers_beside_ours(tmp_path):
    import csv
    import json

    paths = []
    for seed, mae in enumerate([0.8, 0.9]):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "study": "balance", "dataset": "mosi_mult", "method": "cggm", "setting": "complete", "seed": seed,
            "task": "regression", "backbone": "late", "trainable_params": 10,
            "metrics": {"test": {"mae": mae, "corr": 0.5, "acc2_has0": 0.7, "f1_has0": 0.7, "acc2_non0": 0.7,
                                 "f1_non0": 0.7, "acc7": 0.3}}}))
        paths.append(str(d / "metrics.json"))
    reference = REPO / "config" / "reference" / "balance.csv"
    with open(reference, newline="") as fh:
        paper = next(r for r in csv.DictReader(fh) if r["dataset"] == "mosi" and r["metric"] == "MAE")
    assert main(["report", "--table", str(tmp_path / "t"), "--plot", str(tmp_path / "p"),
                 "--paper-table", str(tmp_path / "paper"), "--reference", str(reference), *paths]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| MAE paper |" in table and paper["value"] in table and "0.850±0.071" in table
    others = (tmp_path / "paper.md").read_text()  # the paper's cells we did not run
    assert "food101" in others and "mosi_mult" not in others
