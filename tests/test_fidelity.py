"""bench.protocol (test protocol chosen on validation) and bench.fidelity (the resumable Omniglot grid)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from bench.fidelity import FidelityError, parse_run, run_plan
from bench.common import reference_seconds
from bench.fidelity_summary import conditions_line, goals, group_rows, markdown, plateau_gain, summarize, time_to_target
from bench.protocol import PAPER_CELL, cell, choose_cell, grid_scores
from dist_signmaml.metatest import STEP_COUNTS
from tests.conftest import PYTHON, REPO_ROOT

pytestmark = pytest.mark.unit


def test_run_specs_name_setting_steps_variant_and_seed():
    run = parse_run("20w1s:m5:sign-lsl-msl:s1")
    assert (run["ways"], run["shots"], run["inner_steps"], run["algo"], run["seed"]) == (20, 1, 5, "sign", 1)
    assert run["learned"] and run["multi_step_loss"] and run["beta"] is None
    assert run["name"] == "20w1s_m5_sign-lsl-msl_s1" and run["variant"] == "sign-lsl-msl"
    assert parse_run("5w1s:m1:fo-b0.1:s0")["beta"] == 0.1
    for bad in ("20w1s:sign:s0", "20w1s:m1:adam:s0", "20w:m1:sign:s0"):
        with pytest.raises(FidelityError, match="--plan"):
            parse_run(bad)


def test_grid_scores_every_cell_from_one_curve_per_scale_and_the_choice_prefers_fewer_steps():
    # 4 episodes, accuracy after 0..20 steps: scale 1 peaks at 3 steps, scale 0.5 ties it at 5
    steps = torch.arange(21, dtype=torch.float64)
    peak_at_3 = (0.5 + 0.1 * torch.minimum(steps, torch.tensor(3.0)) - 0.01 * (steps > 3).double() * (steps - 3))
    curves = {1.0: peak_at_3.expand(4, -1), 0.5: (0.6 + 0.2 * (steps >= 5).double()).expand(4, -1),
              2.0: torch.full((4, 21), 0.3, dtype=torch.float64)}
    cells = grid_scores(curves)
    assert len(cells) == 3 * len(STEP_COUNTS)
    assert cell(cells, 3, 1.0)["accuracy"] == pytest.approx(0.8) and cell(cells, 3, 1.0)["ci95"] == 0.0
    assert cell(cells, *PAPER_CELL)["accuracy"] == pytest.approx(0.8 - 0.07)
    chosen = choose_cell(cells)
    assert (chosen["inner_steps"], chosen["lr_scale"]) == (3, 1.0)  # 0.8 at 3 steps beats 0.8 at 5
    # the same number of correct queries, told apart by float32 rounding alone, is a tie too
    noisy = [{"inner_steps": 5, "lr_scale": 1.0, "accuracy": 0.8255000036954879, "ci95": 0.02},
             {"inner_steps": 3, "lr_scale": 1.0, "accuracy": 0.8255000001192093, "ci95": 0.02}]
    assert choose_cell(noisy)["inner_steps"] == 3


def test_plateau_and_time_to_target_read_the_validation_history():
    history = [{"step": s, "accuracy": a} for s, a in ((100, 0.5), (200, 0.74), (300, 0.76), (400, 0.762),
                                                       (500, 0.765))]
    assert plateau_gain(history, 500) == pytest.approx(100 * (0.765 - 0.762))
    assert time_to_target(history, 0.75, 0.2) == {"step": 300, "seconds": pytest.approx(60.0)}
    assert time_to_target(history, 0.9, 0.2) == {"step": None, "seconds": None}


def test_a_run_whose_validation_fell_apart_is_marked_collapsed_beside_its_plateau_check():
    """A best validation early and a last one far under it pass the plateau check (+0.00): the table says why."""
    collapsed, steady = record(0, 0.8, 0.7), record(1, 0.8, 0.7)
    collapsed["results"]["val_history"] = [{"step": s, "accuracy": a} for s, a in ((20, 0.9), (90, 0.88), (100, 0.6))]
    steady["results"]["val_history"] = [{"step": s, "accuracy": a} for s, a in ((20, 0.8), (90, 0.86), (100, 0.83))]
    (row,) = group_rows([collapsed, steady])
    assert row["plateau_gain_points"] == [pytest.approx(0.0), pytest.approx(6.0)]
    assert row["final_val_drop_points"] == [pytest.approx(30.0), pytest.approx(3.0)]
    assert "| +0.00 (collapsed: last val -30.00)/+6.00 |" in markdown([row])


def test_a_history_ranked_over_step_counts_is_read_at_its_best_count():
    """--val_select any_steps: 'accuracy' stays at the test steps; the plateau and the target read best_steps."""
    def entry(step, at_ten, best):
        return {"step": step, "accuracy": at_ten, "best_steps": {"inner_steps": 1, "accuracy": best, "ci95": 0.01}}

    history = [entry(100, 0.40, 0.70), entry(200, 0.45, 0.78), entry(300, 0.50, 0.79)]
    assert time_to_target(history, 0.75, 0.5) == {"step": 200, "seconds": pytest.approx(100.0)}
    assert plateau_gain(history, 300) == pytest.approx(100 * (0.79 - 0.78))
    rows = group_rows([record(0, 0.8, 0.7, val_select="any_steps"), record(1, 0.8, 0.7)])
    assert sorted(r["val_ranking"] for r in rows) == ["10 steps", "best of 1–10 steps"], "rows are not mixed"


def record(seed, accuracy, paper, sizes=None, variant="sign-lsl", seconds=0.3, reach_step=100, setting="20w1s",
           val_select="test_steps", beta=0.005, m=1):
    return {"setting": setting, "inner_steps": m, "variant": variant, "seed": seed, "algo": variant.split("-")[0],
            "learned": "-lsl" in variant, "multi_step_loss": "-msl" in variant,
            "results": {"steps": 100, "config": {"inner_lr": beta, "test_inner_steps": 10, "val_select": val_select},
                        "best_val": {"accuracy": accuracy + 0.01},
                        "seconds_per_meta_iteration": {"mean": seconds},
                        "val_history": [{"step": 50, "accuracy": 0.7}, {"step": reach_step, "accuracy": 0.76}],
                        "inner_lr_learned": sizes},
            "protocol": {"test_chosen": {"accuracy": accuracy, "ci95": 0.006, "inner_steps": 1, "lr_scale": 1.0},
                         "chosen": {"inner_steps": 1, "lr_scale": 1.0},
                         "test_paper": {"accuracy": paper, "ci95": 0.007}, "test_curve_at_scale_1": [0.05, accuracy]}}


def test_seeds_are_averaged_with_their_spread_and_the_table_shows_the_learned_sizes():
    rows = group_rows([record(0, 0.78, 0.70, {"head.weight": [0.01]}), record(1, 0.80, 0.72)])
    (row,) = rows
    assert row["seeds"] == [0, 1] and row["test_chosen_mean"] == pytest.approx(0.79)
    assert row["test_chosen_seed_spread"] == pytest.approx(0.02) and row["test_paper_mean"] == pytest.approx(0.71)
    assert row["time_to_target"][0] == {"step": 100, "seconds": pytest.approx(30.0)}
    assert row["cpu_hours"] == pytest.approx(2 * 0.3 * 100 / 3600)
    table = markdown(rows)
    assert "**79.00%**; ±1.00; ±0.60/0.60" in table and "| 70.00% / 72.00%" not in table and "71.00%" in table
    assert "| head.weight | 0.01 | 2.00 |" in table
    assert table.startswith("Measuring conditions: runs one after another, each pinned to one core, NOT side by side")
    assert "20w1s m1 sign-lsl: load not recorded" in table


def test_the_budget_is_given_in_cpu_hours_with_the_grid_estimated_from_its_runs():
    with_grid = record(0, 0.8, 0.7, variant="sign", seconds=36.0)
    with_grid["protocol"]["beta_grid"] = [{"beta": b, "best_val": 0.7} for b in (0.0025, 0.005, 0.01, 0.02, 0.04)]
    (sign,) = group_rows([with_grid])
    (learned,) = group_rows([record(0, 0.8, 0.7, seconds=36.0), record(1, 0.8, 0.7, seconds=72.0)])
    assert sign["cpu_hours"] == pytest.approx(1.0)  # 100 meta-steps at 36 s
    assert sign["grid_cpu_hours_estimate"] == pytest.approx(5 * 25 * 36 / 3600)  # five runs of 25% of the budget
    assert learned["cpu_hours"] == pytest.approx(3.0) and learned["grid_cpu_hours_estimate"] == 0
    assert "| 36.000 | 1.00 (+≈1.25) |" in markdown([sign])
    assert "| 54.000 | 3.00 |" in markdown([learned])


def test_goals_are_reported_met_or_missed_with_their_figures():
    rows = group_rows([record(0, 0.85, 0.7), record(0, 0.84, 0.8, variant="sign-b0.005", seconds=0.2),
                       record(0, 0.80, 0.8, variant="fo-b0.1", seconds=0.25, reach_step=50),
                       record(0, 0.855, 0.85, variant="maml-b0.2", seconds=0.5),
                       record(0, 0.96, 0.9, variant="fo-b0.1", setting="5w1s")])
    lines = "\n".join(goals(rows))
    assert "best sign, sign-lsl (m=1, 1 seed(s)), minus best fo, fo-b0.1 (m=1, 1 seed(s)): +5.00 points vs the " \
           "goal ≥ +3: met" in lines
    assert "best sign, sign-lsl (m=1, 1 seed(s)), minus best maml, maml-b0.2 (m=1, 1 seed(s)): -0.50 points " \
           "(goal ≥ −1: met) at 0.60× its seconds per meta-step (goal ≤ 0.5×: MISSED)" in lines
    assert "learned step sizes from the default β, sign-lsl (m=1, 1 seed(s)), minus fixed β 0.005, sign-b0.005 " \
           "(m=1, 1 seed(s)): +1.00 points (goal ≥ −1: met)" in lines
    # sign-lsl needs 100 steps at 0.3 s, fo 50 at 0.25 s
    assert "sign-lsl (m=1, 1 seed(s)) reaches 75% validation in 2.40× the time of fo-b0.1" in lines
    assert "5w1s, 100 meta-steps: fo-b0.1 (m=1, 1 seed(s)) 96.00% vs the goal ≥ 97%: MISSED" in lines


def test_goals_also_compare_methods_trained_with_the_same_inner_steps():
    """Sign at m = 5 beats fo and maml at m = 1, but the same-m lines show what the rule alone gives."""
    rows = group_rows([record(0, 0.92, 0.9, variant="sign-lsl-msl", seconds=1.0, m=5),
                       record(0, 0.84, 0.8, variant="sign-lsl", seconds=0.3),
                       record(0, 0.84, 0.8, variant="fo-b0.1", seconds=0.3),
                       record(0, 0.90, 0.9, variant="maml-b0.2", seconds=0.5),
                       record(0, 0.93, 0.9, variant="maml-b0.2", seconds=2.5, m=5)])
    lines = "\n".join(goals(rows))
    assert "20w1s, 100 meta-steps: best sign, sign-lsl-msl (m=5, 1 seed(s)), minus best maml, maml-b0.2 (m=5, " \
           "1 seed(s)): -1.00 points (goal ≥ −1: met) at 0.40× its seconds per meta-step (goal ≤ 0.5×: met)" in lines
    assert "20w1s, 100 meta-steps, m=1 only: best sign, sign-lsl (m=1, 1 seed(s)), minus best fo, fo-b0.1 (m=1, " \
           "1 seed(s)): +0.00 points vs the goal ≥ +3: MISSED" in lines
    assert "m=5 only: best sign, sign-lsl-msl (m=5, 1 seed(s)), minus best maml, maml-b0.2 (m=5" in lines
    assert "m=5 only: sign vs fo: fo not run yet" in lines
    one_m = "\n".join(goals(group_rows([record(0, 0.84, 0.8), record(0, 0.84, 0.8, variant="fo-b0.1")])))
    assert "only" not in one_m, "with one m the per-m lines would repeat the overall ones"


def test_the_rule_alone_is_compared_between_runs_that_differ_in_nothing_else():
    """sign-lsl-msl at m = 5 against fo-lsl-msl at m = 5, not against fo with a fixed β: the learned sizes and the
    multi-step loss are credited to themselves, not to the sign rule."""
    rows = group_rows([record(0, 0.92, 0.9, variant="sign-lsl-msl", m=5),
                       record(0, 0.90, 0.9, variant="fo-lsl-msl", m=5),
                       record(0, 0.84, 0.8, variant="fo-b0.1", m=5),
                       record(0, 0.80, 0.8, variant="sign", m=1),
                       record(0, 0.85, 0.8, variant="fo-b0.1", m=1),
                       record(0, 0.88, 0.8, variant="maml-b0.2", m=1)])
    lines = [line for line in goals(rows) if "the rule alone" in line]
    assert lines == [
        "- 20w1s, 100 meta-steps: the rule alone (m=5, learned step sizes, multi-step loss): sign-lsl-msl (m=5, "
        "1 seed(s)) minus fo-lsl-msl (m=5, 1 seed(s)): +2.00 points",
        "- 20w1s, 100 meta-steps: the rule alone (m=1, fixed β): sign (m=1, 1 seed(s)) minus fo-b0.1 (m=1, "
        "1 seed(s)): -5.00 points",
        "- 20w1s, 100 meta-steps: the rule alone (m=1, fixed β): sign (m=1, 1 seed(s)) minus maml-b0.2 (m=1, "
        "1 seed(s)): -8.00 points"]


def test_learned_sizes_are_compared_with_the_fixed_beta_of_the_same_m_and_loss():
    """A learned m = 5 multi-step-loss run against a fixed-β m = 1 run would credit the sizes with m and the loss."""
    rows = group_rows([record(0, 0.92, 0.9, variant="sign-lsl-msl", m=5), record(0, 0.80, 0.8, variant="sign"),
                       record(0, 0.84, 0.8, variant="sign-lsl")])
    lines = [line for line in goals(rows) if "learned step sizes from the default β" in line]
    assert lines == ["- 20w1s, 100 meta-steps: learned step sizes from the default β, sign-lsl (m=1, 1 seed(s)), "
                     "minus fixed β 0.005, sign (m=1, 1 seed(s)): +4.00 points (goal ≥ −1: met)"]
    rows = group_rows([record(0, 0.92, 0.9, variant="sign-lsl-msl", m=5),
                       record(0, 0.935, 0.9, variant="sign-msl", m=5, beta=0.01)])
    assert "sign-lsl-msl (m=5, 1 seed(s)), minus fixed β 0.01, sign-msl (m=5, 1 seed(s)): -1.50 points (goal ≥ −1: " \
           "MISSED)" in "\n".join(goals(rows))


def test_summary_writes_the_table_and_every_figure_from_the_committed_records(tmp_path):
    for name, rec in (("20w1s_m1_sign-lsl_s0", record(0, 0.80, 0.7, {"head.weight": [0.01]})),
                      ("20w1s_m1_sign-lsl_s1", record(1, 0.84, 0.7, {"head.weight": [0.02]})),
                      ("5w1s_m1_fo-b0.1_s0", record(0, 0.95, 0.94, variant="fo-b0.1", setting="5w1s"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(rec["results"]))
        (tmp_path / name / "protocol.json").write_text(json.dumps(rec["protocol"]))
    rows = summarize(str(tmp_path))
    assert [r["test_chosen"] for r in rows] == [[0.80, 0.84], [0.95]]
    assert rows[0]["val_curves"][1] == {"steps": [50, 100], "minutes": pytest.approx([0.25, 0.5]),
                                        "accuracy": [0.7, 0.76]}
    for figure in ("fidelity.png", "time_to_accuracy.png", "step_sizes.png"):
        assert (tmp_path / figure).stat().st_size > 10_000, figure
    assert json.loads((tmp_path / "fidelity.json").read_text())[0]["seeds"] == [0, 1]


def write_record(root, name, rec, steps=100):
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(rec["results"] | {"steps": steps}))
    (root / name / "protocol.json").write_text(json.dumps(rec["protocol"]))


def test_several_records_give_one_table_of_each_run_at_its_longest_budget(tmp_path):
    """Records of one plan at 100 and 200 meta-steps: seed 0 went on to 200, seed 1 and fo stopped at 100. The
    variant keeps a row of both seeds at 100, beside seed 0's row at 200 (it showed seed 1 alone at 100)."""
    short, long, out = tmp_path / "fidelity", tmp_path / "fidelity_200", tmp_path / "longest"
    write_record(short, "20w1s_m1_sign-lsl_s0", record(0, 0.80, 0.7, {"head.weight": [0.01]}))
    write_record(short, "20w1s_m1_sign-lsl_s1", record(1, 0.82, 0.7, {"head.weight": [0.01]}))
    write_record(short, "20w1s_m1_fo-b0.1_s0", record(0, 0.78, 0.7, variant="fo-b0.1"))
    write_record(long, "20w1s_m1_sign-lsl_s0", record(0, 0.86, 0.7, {"head.weight": [0.02]}), steps=200)
    # fo's seed 1 has no record at 100, so fo has no row of both seeds: each stays at its own budget
    write_record(long, "20w1s_m1_fo-b0.1_s1", record(1, 0.83, 0.7, variant="fo-b0.1"), steps=200)
    rows = summarize(f"{short},{long}", out=str(out))
    assert sorted((r["variant"], r["steps"], tuple(r["seeds"]), tuple(r["test_chosen"])) for r in rows) == [
        ("fo-b0.1", 100, (0,), (0.78,)), ("fo-b0.1", 200, (1,), (0.83,)),
        ("sign-lsl", 100, (0, 1), (0.80, 0.82)), ("sign-lsl", 200, (0,), (0.86,))]
    table = (out / "fidelity.md").read_text()
    assert "| 20w1s | 1 | sign-lsl | 1 | 200 | **86.00%**" in table
    assert "| 20w1s | 1 | sign-lsl | 2 | 100 | **81.00%**; ±1.00" in table
    assert "| 20w1s | 1 | sign-lsl | 1 | 100 |" not in table, "seed 0's shorter record only in the row of both seeds"
    assert "20w1s, 100 meta-steps: best sign, sign-lsl (m=1, 2 seed(s)), minus best fo" in table, "equal budgets"
    assert (out / "time_to_accuracy.png").stat().st_size > 10_000
    assert not (short / "fidelity.md").exists() and not (long / "fidelity.md").exists(), "records left as they were"
    assert [r["steps"] for r in summarize((str(short), str(long)), out=str(out))] == [r["steps"] for r in rows], \
        "fire passes a,b as a tuple"


def test_a_method_left_at_a_shorter_budget_is_compared_where_both_methods_last_met(tmp_path):
    """Sign-MAML with learned sizes and fo went on to 200 meta-steps, maml and a fixed-β sign stopped at 100: the
    overall table keeps each goal, at the longest budget both methods reached, rather than calling one not run."""
    short, long, out = tmp_path / "fidelity", tmp_path / "fidelity_200", tmp_path / "longest"
    for seed, accuracy in ((0, 0.80), (1, 0.82)):
        write_record(short, f"20w1s_m1_sign-lsl_s{seed}", record(seed, accuracy, 0.7, seconds=0.2))
        write_record(long, f"20w1s_m1_sign-lsl_s{seed}", record(seed, accuracy + 0.06, 0.7, seconds=0.2), steps=200)
    write_record(short, "20w1s_m1_maml-b0.2_s0", record(0, 0.815, 0.8, variant="maml-b0.2", seconds=0.5))
    write_record(short, "20w1s_m1_fo-b0.1_s0", record(0, 0.78, 0.8, variant="fo-b0.1", seconds=0.2))
    write_record(long, "20w1s_m1_fo-b0.1_s0", record(0, 0.84, 0.8, variant="fo-b0.1", seconds=0.2), steps=200)
    write_record(short, "20w1s_m1_sign-b0.005_s0", record(0, 0.79, 0.8, variant="sign-b0.005", seconds=0.2))
    summarize(f"{short},{long}", out=str(out))
    table = (out / "fidelity.md").read_text()
    assert "| 20w1s | 1 | sign-lsl | 2 | 200 | **87.00%**" in table and "**81.00%**" not in table, "longest only"
    assert "20w1s, 200 meta-steps: best sign, sign-lsl (m=1, 2 seed(s)), minus best fo, fo-b0.1 (m=1, 1 seed(s)): " \
           "+3.00 points vs the goal ≥ +3: met" in table
    assert "20w1s, 200 meta-steps: no maml row here, at 100 meta-steps, the longest budget both reached (every run " \
           "that reached it): best sign, sign-lsl (m=1, 2 seed(s)), minus best maml, maml-b0.2 (m=1, 1 seed(s)): " \
           "-0.50 points (goal ≥ −1: met) at 0.40× its seconds per meta-step (goal ≤ 0.5×: met)" in table
    assert "maml not run yet" not in table
    # at 100 the table keeps sign-b0.005 and maml; fo and sign-lsl went on, so fo is compared at 100 from every record
    assert "20w1s, 100 meta-steps: no fo row here, its runs went on further; among every run that reached 100 " \
           "meta-steps: best sign, sign-lsl (m=1, 2 seed(s)), minus best fo, fo-b0.1 (m=1, 1 seed(s)): +3.00 points" \
           in table
    assert "20w1s, 100 meta-steps: best sign, sign-b0.005 (m=1, 1 seed(s)), minus best maml" in table
    # the learned sizes against the fixed β, both ways round, where the two last met: it used to be left out
    assert "20w1s, 200 meta-steps: no fixed-β row here, at 100 meta-steps, the longest budget both reached (every " \
           "run that reached it): learned step sizes from the default β, sign-lsl (m=1, 2 seed(s)), minus fixed β " \
           "0.005, sign-b0.005 (m=1, 1 seed(s)): +2.00 points (goal ≥ −1: met)" in table
    assert "20w1s, 100 meta-steps: no learned row here, its runs went on further; among every run that reached 100 " \
           "meta-steps: learned step sizes from the default β, sign-lsl (m=1, 2 seed(s)), minus fixed β 0.005" in table
    alone = tmp_path / "alone"
    write_record(alone, "20w1s_m1_sign-lsl_s0", record(0, 0.86, 0.7))
    summarize(str(alone))
    assert "20w1s, 100 meta-steps: sign vs maml: maml not run yet" in (alone / "fidelity.md").read_text()
    assert "learned step sizes from the default β" not in (alone / "fidelity.md").read_text(), "no fixed β to meet"


def test_a_summary_of_several_records_needs_out_and_existing_folders(tmp_path):
    write_record(tmp_path / "a", "20w1s_m1_fo-b0.1_s0", record(0, 0.78, 0.7, variant="fo-b0.1"))
    with pytest.raises(FidelityError, match=r"^summary --root: 2 record folders .* with --out$"):
        summarize(f"{tmp_path / 'a'},{tmp_path / 'a'}")
    with pytest.raises(FidelityError, match=r"^summary --root: .*missing is not a folder of fidelity records$"):
        summarize(f"{tmp_path / 'a'},{tmp_path / 'missing'}", out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists(), "refused before writing"


def test_the_learned_vs_grid_goal_names_the_beta_each_seed_was_given():
    """The grid chooses β per seed (5w1s sign: 0.015 for seed 0, 0.02 for seed 1): the line names both."""
    rows = group_rows([record(0, 0.95, 0.9, setting="5w1s"), record(1, 0.95, 0.9, setting="5w1s"),
                       record(0, 0.93, 0.9, variant="sign", setting="5w1s", beta=0.015),
                       record(1, 0.95, 0.9, variant="sign", setting="5w1s", beta=0.02)])
    assert "minus fixed β 0.015/0.02, sign (m=1, 2 seed(s)): +1.00 points (goal ≥ −1: met)" in "\n".join(goals(rows))


def test_a_run_recorded_at_another_budget_is_refused_before_any_work(tmp_path):
    """It used to print "done" and keep the 4000-step record for a plan asked at 8000 steps."""
    for name in ("20w1s_m1_fo-b0.1_s0", "20w1s_m1_fo-b0.1_s1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"steps": 4000}))
        (tmp_path / name / "protocol.json").write_text("{}")
    work = tmp_path / "work"
    with pytest.raises(FidelityError, match=r"^--steps 8000: .*20w1s_m1_fo-b0.1_s1 records this run at 4000 "
                                            r"meta-steps; give that budget, or another --record directory"):
        run_plan("20w1s:m1:fo-b0.1:s1,20w1s:m1:sign:s2", work=str(work), steps=8000, record=str(tmp_path))
    assert not work.exists(), "refused before any work"
    run_plan("20w1s:m1:fo-b0.1:s0,20w1s:m1:fo-b0.1:s1", work=str(work), steps=4000, record=str(tmp_path))  # done


@pytest.mark.integration
@pytest.mark.parametrize("argv,fragment", [
    (["bench.fidelity", "run", "--plan", "5w1s:m1:fo:s0", "--work", "WORK", "--stepz", "10"],
     "run: unknown option(s) --stepz; known: --plan"),
    (["bench.fidelity", "summary", "--bogus", "1"], "summary: unknown option(s) --bogus; known: --root"),
    (["bench.fidelity", "run", "--plan", "5w1s:m1:fo:s0", "--work", "WORK", "--grid_jobs", "0"],
     "--grid_jobs=0 is invalid: expected a positive integer"),
    (["bench.fidelity", "train"], "give a command: run --plan ... | summary | park (got 'train'"),
    (["bench.protocol", "RUN", "--val_episode", "3"], "unknown option(s) --val_episode; known: --run_dir, --val_episodes"),
])
def test_a_bad_command_line_gets_one_line_before_any_work(argv, fragment, tmp_path, subprocess_env):
    """An unknown flag once ended in fire's TypeError traceback; now one line names it and what is known."""
    argv = [{"RUN": str(tmp_path), "WORK": str(tmp_path / "work")}.get(token, token) for token in argv]
    result = subprocess.run([PYTHON, "-m", *argv], capture_output=True, text=True, env=subprocess_env, timeout=120,
                            cwd=REPO_ROOT)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "work").exists()


@pytest.mark.integration
def test_help_prints_the_usage(subprocess_env):
    result = subprocess.run([PYTHON, "-m", "bench.fidelity", "--help"], capture_output=True, text=True,
                            env=subprocess_env, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0 and "SETTING:mM:VARIANT:sSEED" in result.stdout, result.stderr[-2000:]


def fake_checkpoint(folder, step: int, damaged: bool = False):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 10)
    files = {"model.safetensors": {"bytes": 99 if damaged else 10, "sha256": ""}} if damaged else {}
    (folder / "train_state.json").write_text(json.dumps({"step": step, "files": files}))


def test_park_carries_an_unfinished_run_to_a_later_checkout_which_continues_it(tmp_path, monkeypatch, capsys):
    """A run's checkpoints lived only in the work directory, so a new checkout lost hours of training. `park`
    copies what continuing needs into the record (newest good checkpoint, best weights, logs, finished grid runs'
    results, no lock); `run` in a fresh work directory continues from it and removes it once the record exists."""
    import bench.fidelity as fidelity

    work, record, name = tmp_path / "work", tmp_path / "record", "20w1s_m5_maml-b0.2_s0"
    final = work / name / "final"
    fake_checkpoint(final / "checkpoints" / "step_00000200", 200)
    fake_checkpoint(final / "checkpoints" / "step_00000400", 400)
    fake_checkpoint(final / "checkpoints" / "step_00000600", 600, damaged=True)  # a bad newest falls back
    for file in ("config.json", "run.lock", "model_best.safetensors", "tb/events.out"):
        (final / file).parent.mkdir(parents=True, exist_ok=True)
        (final / file).write_text("{}")
    grid_run = work / name / "beta_maml" / "beta0.1"
    fake_checkpoint(grid_run / "checkpoints" / "step_00000100", 100)
    (grid_run / "results.json").write_text("{}")  # finished: its checkpoint is not needed
    finished = work / "20w1s_m1_fo-b0.1_s0"
    finished.mkdir()
    (record / finished.name).mkdir(parents=True)
    (record / finished.name / "protocol.json").write_text("{}")

    fidelity.park(work=str(work), record=str(record))
    parked = record / "unfinished" / name
    assert sorted(str(p.relative_to(parked)) for p in parked.rglob("*") if p.is_file()) == [
        "beta_maml/beta0.1/results.json", "final/checkpoints/step_00000400/model.safetensors",
        "final/checkpoints/step_00000400/train_state.json", "final/config.json", "final/model_best.safetensors",
        "final/tb/events.out"]
    assert not (record / "unfinished" / finished.name).exists(), "a run with a record is not parked"
    assert f"{name}: parked step 400, 6 files" in capsys.readouterr().out

    later = tmp_path / "later"
    seen = []

    def train_final(run_dir, *args):
        seen.append(sorted(p.name for p in (run_dir / "checkpoints").iterdir()))
        (run_dir / "results.json").write_text(json.dumps({"steps": 4000, "best_val": {"accuracy": 0.9}}))

    protocol = {"test_chosen": {"accuracy": 0.9, "inner_steps": 5, "lr_scale": 1.0}, "test_paper": {"accuracy": 0.9}}
    monkeypatch.setattr(fidelity, "train_final", train_final)
    monkeypatch.setattr(fidelity, "test_final", lambda *args: protocol)
    run_plan("20w1s:m5:maml-b0.2:s0", work=str(later), steps=4000, record=str(record))
    assert seen == [["step_00000400"]], "the later checkout trained from the parked checkpoint"
    assert (record / name / "protocol.json").is_file() and not parked.exists(), "the record supersedes the parking"


def test_a_grid_shares_out_the_plans_cores_and_the_timed_run_after_it_keeps_one(tmp_path, monkeypatch):
    import bench.fidelity as fidelity

    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, "this test needs 2 cores: the grid's runs take one each"
    seen = {}

    def choose_beta(work, algo, grid, grid_steps, common, launcher, env, jobs):
        seen["grid"] = (sorted(os.sched_getaffinity(0)), jobs)
        (work / f"beta_{algo}").mkdir(parents=True)
        (work / f"beta_{algo}" / "sweep.json").write_text(json.dumps({"runs": [{"beta": 0.005, "val_accuracy": 0.8}]}))
        return 0.005

    def train_final(run_dir, *args):
        seen["train"] = sorted(os.sched_getaffinity(0))
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({"steps": 400, "best_val": {"accuracy": 0.8}}))

    protocol = {"test_chosen": {"accuracy": 0.8, "inner_steps": 5, "lr_scale": 1.0}, "test_paper": {"accuracy": 0.8}}
    monkeypatch.setattr(fidelity, "choose_beta", choose_beta)
    monkeypatch.setattr(fidelity, "train_final", train_final)
    monkeypatch.setattr(fidelity, "test_final", lambda *args: protocol)
    try:
        run_plan("20w1s:m5:sign-msl:s0", work=str(tmp_path / "work"), steps=400, record=str(tmp_path / "record"),
                 grid_jobs=2)
        recorded = json.loads((tmp_path / "record" / "20w1s_m5_sign-msl_s0" / "protocol.json").read_text())
    finally:
        os.sched_setaffinity(0, cores)
    assert seen == {"grid": (cores, 2), "train": cores[:1]}
    assert recorded["conditions"]["pinned_cores"] == cores[:1], "the record names the core the timed run had"
    with pytest.raises(FidelityError, match=rf"--grid_jobs={len(cores) + 1} is invalid: .* up to the "
                                                     rf"{len(cores)} cores"):
        run_plan("20w1s:m5:sign-msl:s1", work=str(tmp_path / "work"), steps=400, record=str(tmp_path / "record"),
                 grid_jobs=len(cores) + 1)


def test_the_recorded_load_before_is_read_after_the_grid_just_before_the_timed_run(tmp_path, monkeypatch):
    """The record's load describes the run whose seconds per meta-step it keeps; read before the grid, it described
    the grid's start, an hour or more earlier."""
    import bench.fidelity as fidelity

    events = []

    def machine_load():
        events.append("load")
        return {"read": len(events)}

    def choose_beta(work, algo, grid, grid_steps, common, launcher, env, jobs):
        events.append("grid")
        (work / f"beta_{algo}").mkdir(parents=True)
        (work / f"beta_{algo}" / "sweep.json").write_text(json.dumps({"runs": [{"beta": 0.005, "val_accuracy": 0.8}]}))
        return 0.005

    def train_final(run_dir, *args):
        events.append("train")
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({"steps": 400, "best_val": {"accuracy": 0.8}}))

    protocol = {"test_chosen": {"accuracy": 0.8, "inner_steps": 5, "lr_scale": 1.0}, "test_paper": {"accuracy": 0.8}}
    monkeypatch.setattr(fidelity, "machine_load", machine_load)
    monkeypatch.setattr(fidelity, "choose_beta", choose_beta)
    monkeypatch.setattr(fidelity, "train_final", train_final)
    monkeypatch.setattr(fidelity, "test_final", lambda *args: protocol)
    run_plan("20w1s:m5:sign-msl:s0", work=str(tmp_path / "work"), steps=400, record=str(tmp_path / "record"))
    conditions = json.loads((tmp_path / "record" / "20w1s_m5_sign-msl_s0" / "protocol.json").read_text())["conditions"]
    assert events == ["grid", "load", "train", "load"]
    assert conditions["load_before"] == {"read": 2} and conditions["load_after"] == {"read": 4}


def test_a_finished_run_keeps_its_final_state_and_a_longer_budget_goes_on_from_it(tmp_path, monkeypatch, capsys):
    """An 8000-step record of a run that already has a 4000-step one trained 8000 steps from 0; `--extend` goes on
    from the 4000-step run's last checkpoint (kept with its record, or by `park` for a run recorded by older code)
    and says so in the record. A grid-beta run, or one without a kept state, is refused before any work."""
    import bench.fidelity as fidelity

    work, short, long = tmp_path / "work", tmp_path / "record", tmp_path / "record_8000"
    name = "20w1s_m5_maml-b0.2_s0"
    final = work / name / "final"
    fake_checkpoint(final / "checkpoints" / "step_00003800", 3800)
    fake_checkpoint(final / "checkpoints" / "step_00004000", 4000)
    for file in ("results.json", "results.md", "protocol.json", "run.lock", "model_best.safetensors", "config.json",
                 "model.safetensors", "tb/events.out"):
        (final / file).parent.mkdir(parents=True, exist_ok=True)
        (final / file).write_text(json.dumps({"steps": 4000}))
    (short / name).mkdir(parents=True)
    for file in ("results.json", "protocol.json"):
        (short / name / file).write_text(json.dumps({"steps": 4000}))
    fidelity.park(work=str(work), record=str(short))
    kept = short / name / "resumable"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        "final/checkpoints/step_00004000/model.safetensors", "final/checkpoints/step_00004000/train_state.json",
        "final/config.json", "final/model_best.safetensors"], "the last checkpoint, no summaries or scores"
    assert f"{name}: kept its final state (4 files" in capsys.readouterr().out

    seen = []

    def train_final(run_dir, algo, beta, steps, *args):
        seen.append((steps, sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
                     (run_dir / "results.json").exists()))
        (run_dir / "results.json").write_text(json.dumps({"steps": steps, "best_val": {"accuracy": 0.9}}))

    protocol = {"test_chosen": {"accuracy": 0.9, "inner_steps": 5, "lr_scale": 1.0}, "test_paper": {"accuracy": 0.9}}
    monkeypatch.setattr(fidelity, "train_final", train_final)
    monkeypatch.setattr(fidelity, "test_final", lambda *args: protocol)
    later = tmp_path / "later"
    for plan, message in (("20w1s:m5:sign:s0", "takes its beta from a grid sized to its budget"),
                          ("20w1s:m5:maml-b0.2:s1", "never finished there"),
                          (f"{name.replace('_', ':')}", "not fewer than --steps 4000")):
        with pytest.raises(FidelityError, match=f"^--extend: .*{message}"):
            run_plan(plan, work=str(later), steps=8000 if "s1" in plan or "sign" in plan else 4000,
                     record=str(long), extend=str(short))
    assert not later.exists() and seen == [], "refused before any work"
    run_plan(name.replace("_", ":"), work=str(later), steps=8000, record=str(long), extend=str(short))
    assert seen == [(8000, ["step_00004000"], False)], "went on from step 4000, not a finished run's summary"
    assert not (later / name / "final" / "protocol.json").exists(), "the 4000-step scores are not the 8000-step's"
    conditions = json.loads((long / name / "protocol.json").read_text())["conditions"]
    assert conditions["extended_from"] == {"record": str(short), "steps": 4000}
    assert (long / name / "resumable").is_dir(), "the longer record keeps its own final state in turn"


def test_a_work_directory_with_its_own_copy_of_the_run_is_not_replaced_by_the_parked_one(tmp_path):
    from bench.fidelity import unpark

    (tmp_path / "parked" / "final").mkdir(parents=True)
    (tmp_path / "parked" / "final" / "config.json").write_text("parked")
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("own")
    unpark(tmp_path / "run", tmp_path / "parked")
    assert (tmp_path / "run" / "final" / "config.json").read_text() == "own"
    unpark(tmp_path / "fresh", tmp_path / "parked")
    assert (tmp_path / "fresh" / "final" / "config.json").read_text() == "parked"


def test_the_conditions_give_each_runs_core_speed_when_it_was_measured():
    """Load averages said the cores were busy but not that one day's runs took 2.5x longer per meta-step than the
    day before's; the reference workload's seconds, before and after each run, show it."""
    import torch

    threads = torch.get_num_threads()
    seconds = reference_seconds(repeats=3)
    assert 0 < seconds < 5 and torch.get_num_threads() == threads
    timed = {"pinned_cores": [1], "load_before": {"load_average_1_5_15min": [1.0, 1.0, 1.0], "reference_seconds": 0.012},
             "load_after": {"reference_seconds": 0.0305}}
    rows = [{"setting": "20w1s", "inner_steps": 5, "variant": "fo-b0.1", "conditions": [timed, {"pinned_cores": [0]}]}]
    line = conditions_line(rows)
    assert "20w1s m5 fo-b0.1: pinned to core(s) [1], load [1.0, 1.0, 1.0], reference workload 12.0/30.5 ms " \
           "before/after" in line and "the reference workload: one thread, a 3x3 convolution" in line, line
    assert line.endswith("20w1s m5 fo-b0.1: pinned to core(s) [0], load not recorded.")  # older records: no figure
    assert "reference workload" not in conditions_line([rows[0] | {"conditions": [{"pinned_cores": [0]}]}])
    # the load at the end shows a neighbour that started after this run did
    loaded = timed | {"load_after": {"load_average_1_5_15min": [2.0, 1.5, 1.2]}, "side_by_side": True}
    line = conditions_line([rows[0] | {"conditions": [loaded]}])
    assert "pinned to core(s) [1], load [1.0, 1.0, 1.0] (1-minute 2.0 at the end), reference workload 12.0 ms" in line
    assert line.startswith("Measuring conditions: every run side by side (separate processes, one core each, the "
                           "neighbour named per run: those were not measured alone, and not in one interleaved "
                           "benchmark);"), line
    # a table whose runs were all paired must not claim some ran one after another, nor the reverse
    mixed = conditions_line([rows[0] | {"conditions": [loaded, {"pinned_cores": [0]}]}])
    assert mixed.startswith("Measuring conditions: some runs side by side (") and \
        "benchmark), others one after another;" in mixed, mixed


def test_an_extended_runs_conditions_name_the_record_its_first_steps_were_measured_in():
    """An extended run's seconds per meta-step average over the shorter run's steps too, which ran
    earlier under the conditions of the shorter record; the header has to say so."""
    extended = {"pinned_cores": [1], "side_by_side": True, "note": "beside: core 0: another run",
                "extended_from": {"record": "bench/results/fidelity", "steps": 4000}}
    line = conditions_line([{"setting": "20w1s", "inner_steps": 5, "variant": "fo-lsl-msl",
                             "conditions": [extended, {"pinned_cores": [0]}]}])
    assert ("20w1s m5 fo-lsl-msl: pinned to core(s) [1], load not recorded (beside: core 0: another run); its first "
            "4000 meta-steps went on from bench/results/fidelity, measured under the conditions recorded there;") in line
    assert line.endswith("20w1s m5 fo-lsl-msl: pinned to core(s) [0], load not recorded.")  # not extended: no claim
