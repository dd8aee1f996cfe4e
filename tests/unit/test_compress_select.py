"""Choosing among measured variants: the Pareto front and the recommendation."""

from hypothesis import given
from hypothesis import strategies as st

from forgeml.compression.measure import pareto, recommend


def rows(*points: tuple[float, float]) -> list[dict]:
    out = [{"accuracy": acc, "p50_ms": ms} for acc, ms in points]
    for row, on_front in zip(out, pareto(out), strict=True):
        row["pareto"] = on_front
    return out


def test_front_keeps_only_undominated_variants():
    measured = rows((0.90, 10.0), (0.90, 4.0), (0.85, 2.0), (0.80, 3.0), (0.91, 12.0))
    assert [row["pareto"] for row in measured] == [False, True, True, False, True]


def test_knee_is_the_point_highest_above_the_line_between_the_ends():
    measured = rows((0.92, 10.0), (0.91, 3.0), (0.70, 1.0))
    assert recommend(measured, None) == 1


def test_two_point_front_takes_the_faster_one_within_a_point_of_accuracy():
    assert recommend(rows((0.92, 10.0), (0.915, 2.0)), None) == 1
    assert recommend(rows((0.92, 10.0), (0.85, 2.0)), None) == 0


def test_latency_target_takes_the_most_accurate_variant_under_it():
    measured = rows((0.92, 10.0), (0.91, 3.0), (0.70, 1.0))
    assert recommend(measured, 5.0) == 1
    assert recommend(measured, 0.5) == 2  # none is fast enough: the fastest


points = st.lists(
    st.tuples(st.floats(0, 1, allow_nan=False), st.floats(0.01, 1000, allow_nan=False)), min_size=1, max_size=12
)


@given(points, st.one_of(st.none(), st.floats(0.01, 1000, allow_nan=False)))
def test_recommendation_is_on_the_front_or_honours_the_target(measured, target):
    measured = rows(*measured)
    chosen = measured[recommend(measured, target)]
    if target is None:
        assert chosen["pareto"]
    elif any(row["p50_ms"] <= target for row in measured):
        assert chosen["p50_ms"] <= target
        assert chosen["accuracy"] == max(row["accuracy"] for row in measured if row["p50_ms"] <= target)
    assert any(row["pareto"] for row in measured)


@given(st.integers(2, 48).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1))))
def test_a_student_keeps_evenly_spaced_layers_from_the_first_to_the_top(case):
    from forgeml.models.registry import spread

    n, keep = case
    chosen = spread(n, keep)
    assert len(chosen) == keep and chosen == sorted(set(chosen)) and chosen[0] == 0
    assert keep == 1 or chosen[-1] == n - 1
