"""The step's checks on their own: pure functions of a step record, table-driven, and
the one place that reports them."""

from __future__ import annotations

import copy
import warnings

import pytest
from torch import nn

from thermokfac.kfac import checks
from thermokfac.kfac.checks import Finding
from thermokfac.kfac.guards import Reporter
from thermokfac.kfac.layers import helper_for
from thermokfac.kfac.records import LayerRecord, StepRecord


def _record(**fields) -> StepRecord:
    return StepRecord(**fields)


@pytest.mark.parametrize(("fields", "removed", "trainable", "unseen", "expected"), [
    ({"reached": {"fc"}}, False, True, False, None),
    ({}, False, False, False, None),  # every layer frozen: nothing to check
    ({}, False, True, True, None),  # parameters replaced since: their gradients unseen
    ({}, False, True, False, "found no gradient from a backward pass"),
    ({"reached": {"fc"}}, True, True, False, "was removed"),
    ({"reached": {"fc"}, "added_onto_update": "fc"}, False, True, False,
     "added to the preconditioned gradient that the previous step left in layer 'fc'"),
])
def test_call_order(fields, removed, trainable, unseen, expected):
    record = _record(**fields)
    before = copy.deepcopy(record)
    found = checks.call_order(record, 3, removed, trainable, unseen)
    assert record == before  # a check changes nothing
    if expected is None:
        assert found is None
    else:
        assert found.error is RuntimeError and expected in found.message


def test_after_capture_reports_in_order_and_refuses_what_cannot_be_read():
    record = _record(transformed_passes=2, repeated_gradients=1, reached={"fc"},
                     unbatched_calls={"pos": "input of shape (5,)"},
                     problems={"fc": "a nested (jagged) tensor input"})
    found = checks.after_capture(record, 0, hooks_ran=True)
    assert [(f.counter, f.count, f.error) for f in found] == [
        ("transformed_passes", 2, None), (None, 1.0, ValueError),
        ("repeated_gradients", 1, None), ("unbatched_layer_calls", 1, None)]
    assert "skip_layers=['fc']" in found[1].message
    silent = checks.after_capture(_record(reached={"fc"}), 0, hooks_ran=False)
    assert len(silent) == 1 and silent[0].error is RuntimeError
    assert checks.after_capture(_record(), 0, hooks_ran=False) == []


def test_missing_refused_unstepped_and_multi_rank():
    layer = LayerRecord("fc", helper_for(nn.Linear(2, 2))(nn.Linear(2, 2)))
    assert checks.missing(_record(), layer, 0) is None  # not reached: nothing missing
    found = checks.missing(_record(reached={"fc"}), layer, 0)
    assert found.counter == "missing_factor_skips"
    assert checks.refused_then_new_backward(_record(refused_at=2, param_gradients=2)) is None
    assert checks.refused_then_new_backward(
        _record(refused_at=2, param_gradients=4)).counter == "discarded_curvature"
    assert not checks.unstepped(_record(param_gradients=0))
    assert not checks.unstepped(_record(param_gradients=2, forward_mark=2))
    assert checks.unstepped(_record(param_gradients=2, forward_mark=0))
    assert checks.multi_rank(True, 4) is None and checks.multi_rank(False, 1) is None
    assert checks.multi_rank(False, 2).counter == "multi_rank_warnings"


def test_the_reporter_counts_warns_once_and_raises():
    stats = {"repeated_gradients": 0.0}
    reporter = Reporter(lambda: stats)
    found = Finding("twice", counter="repeated_gradients", count=2, key="repeated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reporter.report(found, None, found)
    assert stats["repeated_gradients"] == 4 and len(caught) == 1
    with pytest.raises(ValueError, match="bad"):
        reporter.report(Finding("bad", error=ValueError), found)
    assert stats["repeated_gradients"] == 4  # nothing after a refusal
