"""`megawsd stability` on a synthetic run with events (tests/analysis_fixtures.py)."""

from __future__ import annotations

import json

import pytest
from analysis_fixtures import make_tree, make_unstable_run

from megawsd.analysis.stability_report import (
    GRAD_EMA,
    GRAD_WARMUP_RECORDS,
    grad_norm_ratios,
    group_ratios,
)
from megawsd.cli import main


def test_report_json(tmp_path, capsys):
    run = make_unstable_run(tmp_path / "unstable")
    assert main(["stability", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # strict JSON: NaN became null
    assert data["schema"] == "megawsd.stability/1"
    r = data["runs"][0]
    assert [(e["step"], e["type"], e["action"]) for e in r["events"]] == [
        (150, "loss_spike", "rollback"),
        (230, "nan", "skip"),
        (260, "grad_spike", "log"),
    ]
    # LR: the event's own lr when recorded, else the last logged lr at or before the step
    assert [e["lr"] for e in r["events"]] == [
        pytest.approx(3e-4 * 0.85),
        pytest.approx(3e-4 * 0.77),
        2.9e-4,
    ]
    assert r["events"][0]["detail"]["rollback_to"] == 100
    assert r["events"][1]["loss"] is None and r["events"][1]["grad_norm"] is None  # "nan" strings
    assert r["events"][1]["detail"] == {"value": "nan"}  # detail fields are passed through
    assert r["loss_spikes"] == 1 and r["nonfinite_events"] == 1 and r["nonfinite_steps"] == [230]
    assert r["by_action"] == {"rollback": 1, "skip": 1, "log": 1}
    assert r["max_grad_norm_ratio_step"] == 260 and r["max_grad_norm_ratio"] > 10
    ratios = r["update_param_ratio"]
    assert ratios["mlp"] == {"min": 2e-3, "max": 2e-3}
    assert ratios["embedding"]["min"] == pytest.approx(1e-3)
    assert ratios["attention"]["min"] == pytest.approx(1e-3 + 5e-6)
    assert ratios["attention"]["max"] == pytest.approx(1e-3 + 300e-6)
    assert r["max_activation"] == pytest.approx(13.0)
    assert (run / "stability.png").read_bytes()[:4] == b"\x89PNG"


def test_report_table_and_plot_path(tmp_path, capsys):
    run = make_unstable_run(tmp_path / "unstable")
    out = tmp_path / "s.png"
    assert main(["stability", str(run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "loss_spike" in text and "rollback" in text and "rollback_to=100" in text
    assert "non-finite loss logged at steps [230]" in text
    assert out.stat().st_size > 10_000


def test_quiet_tree_has_no_events(tmp_path, capsys):
    tree = make_tree(tmp_path)
    assert main(["stability", str(tree), "--json", "--no-plot"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["runs"]) == 4 and all(r["events"] == [] for r in data["runs"])
    assert not (tree / "stability.png").exists()


def test_grad_norm_ratio_matches_definition():
    gs = [1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 8.0, 1.0]
    recs = [{"step": i + 1, "grad_norm": g} for i, g in enumerate(gs)]
    out = grad_norm_ratios(recs)
    # oracle: debiased EMA of the previous values, by direct summation
    expected = []
    for t in range(GRAD_WARMUP_RECORDS, len(gs)):
        w = [(1 - GRAD_EMA) * GRAD_EMA ** (t - 1 - i) for i in range(t)]
        mean = sum(wi * g for wi, g in zip(w, gs[:t])) / sum(w)
        expected.append((t + 1, gs[t] / mean))
    assert [s for s, _ in out] == [s for s, _ in expected]
    assert [v for _, v in out] == pytest.approx([v for _, v in expected])


def test_group_ratio_shapes():
    rec = {
        "update_param_ratio": {"a": 1.0},
        "update_ratio/b": 2.0,
        "update_rms/c": 3.0,
        "param_rms/c": 6.0,
        "update_rms/d": 1.0,
    }
    assert group_ratios(rec) == {"a": 1.0, "b": 2.0, "c": 0.5}


def test_errors(tmp_path, capsys):
    assert main(["stability", str(tmp_path / "missing")]) == 2
    run = make_unstable_run(tmp_path / "u")
    assert main(["stability", str(run), "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out" in capsys.readouterr().err
