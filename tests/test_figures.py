"""The result figures, drawn from small fixtures and checked against their data: axis
scales and limits, what is left out and said to be, every clock a figure claims, labels
that do not run into each other (``thermokfac plot`` draws the committed figures the
same way from their JSON)."""

from __future__ import annotations

import json

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from thermokfac import plots


@pytest.fixture
def drawn(monkeypatch):
    """The figures the next drawing function saves (kept open for inspection)."""
    figures = []

    def keep(fig, path, dpi, rect=None):
        fig.tight_layout(rect=rect)
        figures.append(fig)
        return [path]
    monkeypatch.setattr(plots, "_save", keep)
    yield figures
    plt.close("all")


def _compare(folder, estimated_clocks):
    curves = [
        {"label": "adam", "estimated": False,
         "points": [{"step": s, "clock_s": c, "val_loss": v, "val_accuracy": a}
                    for s, c, v, a in [(0, 0.0, 2.3, 0.05), (10, 0.5, 0.9, 0.6),
                                       (20, 1.0, 0.6, 0.8), (30, 2.0, 0.4, 0.9)]]},
        {"label": "thermo, settle t0+T", "estimated": True,
         "points": [{"step": s, "clock_s": c, "val_loss": v, "val_accuracy": a}
                    for s, c, v, a in zip((0, 10, 20, 30), estimated_clocks,
                                          (2.3, 0.8, 0.5, 0.35), (0.05, 0.7, 0.85, 0.92))]}]
    folder.mkdir()
    (folder / "compare.json").write_text(json.dumps(
        {"metric_key": "val_accuracy", "title": "fixture", "caption": "a caption",
         "curves": curves}))
    return curves


def test_compare_on_a_log_clock_leaves_step_zero_out_and_says_so(tmp_path, drawn):
    curves = _compare(tmp_path / "c", (0.0, 5.0, 50.0, 500.0))
    plots.plot_compare(tmp_path / "c")
    loss, metric = drawn[0].axes[:2]
    for ax in (loss, metric):
        assert ax.get_xscale() == "log"
        assert "step 0 not shown" in ax.get_xlabel()
        for line in ax.get_lines():
            assert min(line.get_xdata()) > 0  # no point at clock 0, no edge segments
        low, high = ax.get_xlim()
        assert low <= 0.5 and high >= 500.0
    low, high = metric.get_ylim()
    assert 0.05 < low <= 0.6 and high >= 0.92  # step 0's 5% does not stretch the axis
    low, high = loss.get_ylim()
    assert low <= 0.35 and 0.9 <= high < 2.3  # nor its loss
    legend = [t.get_text() for t in drawn[0].legends[0].get_texts()]
    assert legend == [c["label"] for c in curves]


def test_compare_on_a_linear_clock_keeps_step_zero(tmp_path, drawn):
    _compare(tmp_path / "c", (0.0, 1.0, 2.0, 3.0))
    plots.plot_compare(tmp_path / "c")
    metric = drawn[0].axes[1]
    assert metric.get_xscale() == "linear" and "not shown" not in metric.get_xlabel()
    assert all(0.0 in line.get_xdata() for line in metric.get_lines())
    assert metric.get_ylim()[0] <= 0.05


def _sweep(folder):
    def run(lr, seconds, estimated=None):
        curve = [{"step": 0, "seconds": 0.0, "estimated_s": 0.0, "val_accuracy": 0.1},
                 {"step": 10, "seconds": seconds, "estimated_s": (estimated or {}).get("rc"),
                  "val_accuracy": 0.9}]
        return {"lr": lr, "batch_size": 64, "seconds": seconds,
                "estimated_s": (estimated or {}).get("rc"),
                "estimated_by_settle": estimated, "curve": curve}
    by_settle = {"rc": 5.0, "rc_over_alpha_min": 12.0, "target_error": 1500.0}
    arms = [
        {"name": "adam", "clock": "measured", "best_lr": 0.01, "batch_size": 64,
         "reached": 2, "seeds": 2, "median_s": 10.0, "median_estimated_by_settle": None},
        {"name": "sgd", "clock": "measured", "best_lr": 0.1, "batch_size": 64,
         "reached": 0, "seeds": 2, "median_s": None, "median_estimated_by_settle": None},
        {"name": "thermo", "clock": "thermo-m2", "best_lr": 0.03, "batch_size": 64,
         "reached": 2, "seeds": 2, "median_s": 20.0, "median_estimated_s": 5.0,
         "median_estimated_by_settle": by_settle}]
    runs = {"adam": [run(0.01, 9.0), run(0.01, 11.0)], "sgd": [],
            "thermo": [run(0.03, 19.0, {k: v * 0.9 for k, v in by_settle.items()}),
                       run(0.03, 21.0, {k: v * 1.1 for k, v in by_settle.items()})]}
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps(
        {"metric": "val_accuracy", "target": 0.85, "seeds": [0, 1],
         "base": {"model": "mlp", "data": "digits"}, "arms": arms, "runs": runs}))
    return by_settle


def test_sweep_shows_every_settle_clock_with_readable_labels(tmp_path, drawn):
    by_settle = _sweep(tmp_path / "s")
    plots.plot_sweep(tmp_path / "s")
    fig = drawn[0]
    bars = fig.axes[0]
    labels = [t.get_text() for t in bars.get_yticklabels()]
    assert len(labels) == 2 + len(by_settle)  # two measured arms, one bar per clock
    assert labels[0].startswith("adam") and labels[1].startswith("sgd")
    for model, name in plots.SETTLE_LABELS.items():
        assert any(f"thermo, estimated, settle {name}" in label for label in labels), model
    widths = [patch.get_width() for patch in bars.patches]
    assert widths == [10.0, 0.0, *by_settle.values()]  # medians; a missed arm: none
    assert any("missed the target" in t.get_text() for t in bars.texts)
    assert bars.get_xscale() == "log"  # 5 s to 1 500 s
    assert bars.get_xlim()[1] >= 1500.0 * 1.1  # the slowest seed too
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in bars.get_yticklabels()]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    curves = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "thermo (estimated, settle RC)" in curves
