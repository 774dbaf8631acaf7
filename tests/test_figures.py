"""Figures stay honest and readable: dropping policies marked, many layers aggregated."""

from types import SimpleNamespace

import numpy as np

import experiments.figures as figs


def _capture(monkeypatch):
    seen = []
    monkeypatch.setattr(figs, "_png", lambda fig: seen.append(fig) or b"png")
    return seen


def test_token_dropping_bar_is_hatched_and_says_how_much(monkeypatch):
    seen = _capture(monkeypatch)
    rows = [{"policy": "static", "speedup": 1.0, "dropped_pct": 0.0},
            {"policy": "capacity", "speedup": 4.2, "dropped_pct": 60.4},
            {"policy": "greedy", "speedup": 2.6, "dropped_pct": 0.0}]
    figs.speedup_figure(rows)
    ax = seen[0].axes[0]
    bars = ax.patches
    assert [b.get_hatch() for b in bars] == [None, "//", None] or [bool(b.get_hatch()) for b in bars] == [False, True, False]
    texts = [t.get_text() for t in ax.texts]
    assert any("drops 60% of tokens" in t.replace("\n", " ") for t in texts)
    assert not any("drops" in t for t, r in zip(texts, rows) if r["dropped_pct"] == 0)


def test_overlapping_lines_differ_in_style(monkeypatch):
    seen = _capture(monkeypatch)
    res = [SimpleNamespace(policy=SimpleNamespace(name=n), step_ids=np.arange(5), step_time=np.ones(5),
                           balance=np.ones((5, 2)), dropped=np.zeros(5)) for n in ("eplb", "greedy", "ilp")]
    figs.step_time_figure(res)
    lines = seen[0].axes[0].get_lines()
    assert len({(l.get_linestyle(), l.get_marker(), l.get_linewidth()) for l in lines}) == 3


def test_many_layers_are_aggregated(monkeypatch):
    seen = _capture(monkeypatch)
    recs = [{"layer": l, "step_id": s, "ref_objective": 1.0, "objective": 0.9, "lower_bound": 0.5,
             "solve_time_s": 0.1, "ref_solve_time_s": 0.01} for l in range(24) for s in (5, 10)]
    figs.optimality_figure([SimpleNamespace(replans=recs)])
    assert len(seen[0].axes[0].get_legend().get_texts()) == 3  # greedy, ILP, bound: not 72 entries
    figs.optimality_figure([SimpleNamespace(replans=[r for r in recs if r["layer"] < 2])])
    assert len(seen[1].axes[0].get_legend().get_texts()) == 6  # few layers: each its own lines
