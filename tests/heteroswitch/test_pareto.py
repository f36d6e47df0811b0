import pytest

from heteroswitch.pareto import dominates, goal_check, isolated_seconds, pareto_front


def test_pareto_front_of_known_points():
    pts = {"a": (1.0, 1.0), "b": (2.0, 0.5), "c": (0.5, 0.5), "d": (2.0, 0.5), "e": (float("nan"), 9.0)}
    assert dominates((1, 1), (0.5, 0.5)) and not dominates((1, 1), (1, 1))
    assert pareto_front(pts) == {"a", "b", "d"}  # c is dominated by a; ties stay; NaN never on the front


def _pt(mean, var, worst, unseen, cost):
    return {"mean": mean, "var": var, "worst": worst, "unseen": unseen, "gflop": cost}


def test_goal_check_against_the_best_always_on_method():
    pts = {"fedavg": _pt(0.84, 0.0070, 0.63, 0.78, 1.0), "isp": _pt(0.80, 0.0008, 0.72, 0.77, 1.0),
           "isp_swad": _pt(0.80, 0.0010, 0.71, 0.78, 1.4), "heteroswitch": _pt(0.835, 0.0008, 0.72, 0.79, 0.75)}
    g = goal_check(pts)
    assert g["best_always_on_variance"] == "isp" and g["best_always_on_worst"] == "isp"
    assert g["variance_vs_fedavg_pct"] == pytest.approx(100 * (1 - 0.0008 / 0.0070))
    assert g["cost_ratio_vs_best_variance_method"] == pytest.approx(0.75)
    assert g["mean_gap_points"] == pytest.approx(0.5) and g["all_met"]
    pts["heteroswitch"] = _pt(0.81, 0.0013, 0.72, 0.79, 1.1)
    g = goal_check(pts)
    assert not g["variance_no_worse_than_best_always_on"] and not g["cost_le_0_8x"]
    assert not g["mean_within_1_point_of_best"] and not g["all_met"]


def test_isolated_seconds_additive_model():
    med = {k: {"dev_s_total": v} for k, v in {"none": 1.0, "isp": 1.2, "swad": 1.5, "isp+swad": 1.7, "probe": 1.1,
                                               "probe+colour+isp": 1.45}.items()}
    # 3 none + 1 isp + 2 swad; 6 probes, 3 colour probes (colour extra = 1.45 - 1.1 - 0.2 = 0.15)
    got = isolated_seconds({"none": 3, "isp": 1, "swad": 2}, 6, 3, med)
    assert got == pytest.approx(3 * 1.0 + 1.2 + 2 * 1.5 + 6 * 0.1 + 3 * 0.15)
