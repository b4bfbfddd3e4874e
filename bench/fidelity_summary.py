"""The fidelity table and figures from the committed per-run records (bench/results/fidelity/<run>/).

    python -m bench.fidelity summary    # -> bench/results/fidelity/fidelity.md, fidelity.json, fidelity.png,
                                        #    time_to_accuracy.png, step_sizes.png
    python -m bench.fidelity summary --root bench/results/fidelity,bench/results/fidelity_8000 \
        --out bench/results/fidelity_longest   # each run at the longest budget any of those records holds

Per (setting, inner steps m, variant), over seeds: test accuracy with the protocol chosen on validation (mean, the
spread over seeds, and each run's 95% interval over episodes), the paper's protocol (10 steps at the training beta),
the best validation accuracy, whether validation had plateaued, the budget in CPU-hours, time to a validation
target, and the learned step sizes per tensor; then each of the reproduction's goals met or missed with its figures.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.common import REFERENCE_WORK
from bench.protocol import PROTOCOL_JSON
from dist_signmaml.artifacts import RESULTS_JSON
from dist_signmaml.metatest import selected_score
from dist_signmaml.monitor import COLLAPSE_POINTS, points_under

PLATEAU_SHARE = 0.2  # validation has plateaued when the last 20% of steps raised the best accuracy by
PLATEAU_POINTS = 0.5  # less than this many points
# A run whose last validation lies COLLAPSE_POINTS under its best fell apart; the plateau check alone would read such
# a run, whose best came early, as plateaued.
# The reproduction's goals (reported against, never tuned to): 20w1s sign >= fo + 3 points and >= maml - 1 point at
# <= 0.5x maml's time per meta-step; 5w1s every method >= 97%; learned step sizes within 1 point of the grid's beta.
SIGN_OVER_FO_POINTS = 3.0
SIGN_UNDER_MAML_POINTS = 1.0
SIGN_OVER_MAML_TIME = 0.5
EASY_SETTING_ACCURACY = {"5w1s": 0.97}
LEARNED_VS_GRID_POINTS = 1.0


def load_records(root: Path) -> list[dict]:
    from bench.fidelity import parse_run

    records = []
    for directory in sorted(p for p in root.iterdir() if (p / PROTOCOL_JSON).is_file()):
        run = parse_run(directory.name.replace("_", ":"))
        records.append(run | {"results": json.loads((directory / RESULTS_JSON).read_text()),
                              "protocol": json.loads((directory / PROTOCOL_JSON).read_text())})
    return records


def longest_records(records: list[dict]) -> list[dict]:
    """Each run's record at the longest budget among `records` (of one plan at several budgets, e.g. the folders
    fidelity, fidelity_8000, fidelity_16000): the figures a reader wants first, with every run as far as it went.
    Runs left at different budgets stay in rows of their own (group_rows keys on the budget); where the seeds of one
    variant stopped at different budgets, each seed's record at the longest budget all of them reached is kept too,
    so that the variant keeps a row of all its seeds, since one seed alone has no spread to read its mean against."""
    longest: dict[str, dict] = {}
    for record in records:
        kept = longest.get(record["name"])
        if kept is None or record["results"]["steps"] > kept["results"]["steps"]:
            longest[record["name"]] = record
    chosen = list(longest.values())
    for seeds in group_by(chosen, variant_key).values():
        common = min(r["results"]["steps"] for r in seeds)
        if len(seeds) < 2 or all(r["results"]["steps"] == common for r in seeds):
            continue
        at_common = {r["name"]: r for r in records if variant_key(r) == variant_key(seeds[0])
                     and r["results"]["steps"] == common}
        if len(at_common) == len(seeds):
            chosen += [r for r in at_common.values() if r is not longest[r["name"]]]
    return sorted(chosen, key=lambda r: (r["name"], r["results"]["steps"]))


def variant_key(record: dict) -> tuple:
    """What makes records seeds of one variant: the setting, the inner steps m and the variant."""
    return record["setting"], record["inner_steps"], record["variant"]


def group_by(records: list[dict], key) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


def plateau_gain(history: list[dict], steps: int) -> float:
    """Points of best validation accuracy gained over the last PLATEAU_SHARE of the run (each validation ranked as
    its run ranked it: see val_ranking)."""
    cut = steps * (1 - PLATEAU_SHARE)
    before = [selected_score(h)["accuracy"] for h in history if h["step"] <= cut]
    if not before:
        return float("nan")
    return 100 * (max(selected_score(h)["accuracy"] for h in history) - max(before))


def final_drop(history: list[dict]) -> float:
    """Points the last validation lies under the run's best (each ranked as its run ranked it)."""
    best = max(history, key=lambda h: selected_score(h)["accuracy"])
    return points_under(best, history[-1])


def plateau_cell(gain: float, drop: float) -> str:
    """A run's last-20% gain, and how far its last validation fell when it fell apart."""
    return f"{gain:+.2f}" + (f" (collapsed: last val {-drop:.2f})" if drop >= COLLAPSE_POINTS else "")


def time_to_target(history: list[dict], target: float, seconds_per_step: float) -> dict:
    """First validation at or above `target` (ranked as its run ranked it): its meta-step and the training seconds to
    reach it."""
    for h in history:
        if selected_score(h)["accuracy"] >= target:
            return {"step": h["step"], "seconds": h["step"] * seconds_per_step}
    return {"step": None, "seconds": None}


def val_curve(history: list[dict], seconds_per_step: float) -> dict:
    """Validation accuracy (ranked as its run ranked it) against meta-step and training minutes, for the
    time-to-accuracy figure."""
    return {"steps": [h["step"] for h in history],
            "minutes": [h["step"] * seconds_per_step / 60 for h in history],
            "accuracy": [selected_score(h)["accuracy"] for h in history]}


def val_ranking(results: dict) -> str:
    """How a run's validation ranked the weights it kept: at its test steps (runs from before --val_select ran that)
    or the best over the step counts up to them."""
    config = results["config"]
    if config.get("val_select", "test_steps") == "any_steps":
        return f"best of 1–{config['test_inner_steps']} steps"
    return f"{config['test_inner_steps']} steps"


def group_rows(records: list[dict]) -> list[dict]:
    from bench.fidelity import TARGETS
    from bench.reproduce import grid_steps_for

    # seeds of one budget and validation ranking only: the others get rows of their own
    groups = group_by(records, lambda r: variant_key(r) + (r["results"]["steps"], val_ranking(r["results"])))
    rows = []
    for (setting, m, variant, steps, ranking), runs in groups.items():
        chosen = [r["protocol"]["test_chosen"] for r in runs]
        paper = [r["protocol"]["test_paper"] for r in runs]
        seconds = [r["results"]["seconds_per_meta_iteration"]["mean"] for r in runs]
        reach = [time_to_target(r["results"]["val_history"], TARGETS[setting], s) for r, s in zip(runs, seconds)]
        grid_runs = [len(r["protocol"].get("beta_grid") or []) for r in runs]
        rows.append({
            "setting": setting, "inner_steps": m, "variant": variant, "algo": runs[0]["algo"],
            "learned": runs[0]["learned"], "multi_step_loss": runs[0]["multi_step_loss"],
            "seeds": [r["seed"] for r in runs],
            "steps": steps,
            "betas": [r["results"]["config"]["inner_lr"] for r in runs],  # a grid may choose another β per seed
            "test_chosen": [c["accuracy"] for c in chosen],
            "test_chosen_mean": statistics.fmean(c["accuracy"] for c in chosen),
            "test_chosen_seed_spread": (max(c["accuracy"] for c in chosen) - min(c["accuracy"] for c in chosen)),
            "test_chosen_ci95": [c["ci95"] for c in chosen],
            "chosen_cells": [r["protocol"]["chosen"] for r in runs],
            "test_paper_mean": statistics.fmean(p["accuracy"] for p in paper),
            "test_paper_ci95": [p["ci95"] for p in paper],
            "best_val_mean": statistics.fmean(selected_score(r["results"]["best_val"])["accuracy"] for r in runs),
            "val_ranking": ranking,
            "plateau_gain_points": [plateau_gain(r["results"]["val_history"], steps) for r in runs],
            "final_val_drop_points": [final_drop(r["results"]["val_history"]) for r in runs],
            "seconds_per_meta_step": statistics.fmean(seconds),
            "cpu_hours": sum(s * steps for s in seconds) / 3600,  # the final runs, one core each
            # a record does not time its grid's runs: each lasted GRID_FRACTION of the budget, at about its final pace
            "grid_cpu_hours_estimate": sum(n * grid_steps_for(steps) * s for n, s in zip(grid_runs, seconds)) / 3600,
            "time_to_target": reach, "target": TARGETS[setting],
            "val_curves": [val_curve(r["results"]["val_history"], s) for r, s in zip(runs, seconds)],
            "step_sizes": [r["results"].get("inner_lr_learned") or {} for r in runs],
            "test_curve": runs[0]["protocol"]["test_curve_at_scale_1"],
            "conditions": [r["protocol"].get("conditions") for r in runs]})
    return rows


def conditions_line(rows: list[dict]) -> str:
    """How the runs were measured, for the table's header: accuracy does not depend on it, seconds do."""
    parts = []
    for r in rows:
        for c in r["conditions"]:
            if not c:
                parts.append(f"{r['setting']} m{r['inner_steps']} {r['variant']}: load not recorded")
                continue
            before = c.get("load_before") or {}
            load = before.get("load_average_1_5_15min", "not recorded")
            # a neighbour that starts or ends mid-run shows only in the load read at the end
            after = ((c.get("load_after") or {}).get("load_average_1_5_15min") or [None])[0]
            speed = [f"{1000 * (c.get(k) or {}).get('reference_seconds'):.1f}" for k in ("load_before", "load_after")
                     if (c.get(k) or {}).get("reference_seconds")]
            parts.append(f"{r['setting']} m{r['inner_steps']} {r['variant']}: pinned to core(s) "
                         f"{c.get('pinned_cores')}, load {load}"
                         + (f" (1-minute {after} at the end)" if after is not None else "")
                         + (f", reference workload {'/'.join(speed)} ms before/after" if speed else "")
                         + (f" ({c['note']})" if c.get("note") else "")
                         # an extended run's seconds per meta-step average over its shorter run's steps too
                         + (f"; its first {c['extended_from']['steps']} meta-steps went on from "
                            f"{c['extended_from']['record']}, measured under the conditions recorded there"
                            if c.get("extended_from") else ""))
    beside = [bool(c and c.get("side_by_side")) for r in rows for c in r["conditions"]]
    paired = ("side by side (separate processes, one core each, the neighbour named per run: those were not measured "
              "alone, and not in one interleaved benchmark)")
    how = (f"every run {paired}" if beside and all(beside) else f"some runs {paired}, others one after another"
           if any(beside) else "runs one after another, each pinned to one core, NOT side by side")
    calibrated = any("reference workload" in part for part in parts)
    return (f"Measuring conditions: {how}; seconds per meta-step and time to target are only as good as the load "
            f"recorded per run" + (f" and the core's speed (the reference workload: {REFERENCE_WORK}; a slower core "
                                    f"shows a higher figure)" if calibrated else "") + ". " + "; ".join(parts) + ".")


def best_of(rows: list[dict], algo: str, learned: bool | None = None) -> dict | None:
    """The row of `algo` (any m, any variant; learned step sizes or not when given) with the best chosen test."""
    found = [r for r in rows if r["algo"] == algo and (learned is None or r["learned"] == learned)]
    return max(found, key=lambda r: r["test_chosen_mean"]) if found else None


def label(row: dict) -> str:
    return f"{row['variant']} (m={row['inner_steps']}, {len(row['seeds'])} seed(s))"


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def at_least(value: float, floor: float) -> bool:
    """value >= floor, where a figure equal to the goal after float rounding (0.92 - 0.93 is -1.0000000000000009
    points) meets it, as its printed value says."""
    return value >= floor - 1e-9


def goals(rows: list[dict], every_budget: list[dict] | None = None) -> list[str]:
    """Each goal met or missed, with its figures, per (setting, budget): compared at the same number of meta-steps,
    first between the best variant of each method at any m, then between methods trained with the same m (a
    sign run at m = 5 against fo and maml at m = 1 mixes the rule with the budget of inner steps). `every_budget`
    holds the rows of every record behind `rows` (a table of each run at its longest budget leaves out the shorter
    budgets of runs that went on): a method with no row at a budget is compared where both methods last met."""
    every_budget = rows if every_budget is None else every_budget
    lines = []
    for setting, steps in dict.fromkeys((r["setting"], r["steps"]) for r in rows):
        group = [r for r in rows if r["setting"] == setting and r["steps"] == steps]
        earlier = [r for r in every_budget if r["setting"] == setting and r["steps"] <= steps]
        head = f"{setting}, {steps} meta-steps"
        if setting in EASY_SETTING_ACCURACY:
            floor = EASY_SETTING_ACCURACY[setting]
            for r in group:
                lines.append(f"- {head}: {label(r)} {100 * r['test_chosen_mean']:.2f}% vs the goal "
                             f"≥ {100 * floor:.0f}%: {verdict(at_least(r['test_chosen_mean'], floor))}")
        else:
            lines += method_goals(head, group, earlier)
            for m in sorted({r["inner_steps"] for r in group}):
                same_m = [r for r in group if r["inner_steps"] == m]
                if len({r["algo"] for r in same_m}) > 1 and len({r["inner_steps"] for r in group}) > 1:
                    lines += method_goals(f"{head}, m={m} only", same_m,
                                          [r for r in earlier if r["inner_steps"] == m])
        lines += rule_goals(head, group) + learned_goal(head, group, earlier) + time_to_target_lines(head, group)
    return lines


def last_met(earlier: list[dict], steps: int, *pickers) -> tuple[list[dict], str] | None:
    """The rows of the longest budget in `earlier` (at most `steps`) where every picker (rows -> a row or None)
    finds its row, with the words that say where that is; None where they never met. A table of each run at its
    longest budget leaves a run that stopped early apart from one that went on, and this finds where they last
    met."""
    for budget in sorted({r["steps"] for r in earlier}, reverse=True):
        there = [r for r in earlier if r["steps"] == budget]
        if all(pick(there) for pick in pickers):
            return there, (f"its runs went on further; among every run that reached {budget} meta-steps"
                           if budget == steps
                           else f"at {budget} meta-steps, the longest budget both reached (every run that reached it)")
    return None


def method_goals(head: str, group: list[dict], earlier: list[dict] = ()) -> list[str]:
    """The hard setting's goals: best sign >= best fo + 3 points, and >= best maml - 1 point at <= 0.5x its time.
    A method with no row in `group` is compared at the longest budget in `earlier` (rows of the same setting at
    this budget or shorter, from every record) where both it and sign have rows."""
    sign = best_of(group, "sign")
    if not sign:
        return []
    lines = []
    for algo in ("fo", "maml"):
        other = best_of(group, algo)
        if other:
            lines.append(f"- {head}: {versus(sign, other)}")
            continue
        met = last_met(earlier, sign["steps"], lambda there: best_of(there, "sign"),
                       lambda there, algo=algo: best_of(there, algo))
        if not met:
            lines.append(f"- {head}: sign vs {algo}: {algo} not run yet")
            continue
        there, where = met
        lines.append(f"- {head}: no {algo} row here, {where}: "
                     f"{versus(best_of(there, 'sign'), best_of(there, algo))}")
    return lines


def versus(sign: dict, other: dict) -> str:
    """The goal against fo (+3 points) or maml (within 1 point at <= 0.5x its time), with its figures."""
    gap = 100 * (sign["test_chosen_mean"] - other["test_chosen_mean"])
    if other["algo"] == "fo":
        return (f"best sign, {label(sign)}, minus best fo, {label(other)}: {gap:+.2f} points vs the goal "
                f"≥ +{SIGN_OVER_FO_POINTS:g}: {verdict(at_least(gap, SIGN_OVER_FO_POINTS))}")
    time = sign["seconds_per_meta_step"] / other["seconds_per_meta_step"]
    return (f"best sign, {label(sign)}, minus best maml, {label(other)}: {gap:+.2f} points "
            f"(goal ≥ −{SIGN_UNDER_MAML_POINTS:g}: {verdict(at_least(gap, -SIGN_UNDER_MAML_POINTS))}) at "
            f"{time:.2f}× its seconds per meta-step (goal ≤ {SIGN_OVER_MAML_TIME:g}×: "
            f"{verdict(at_least(SIGN_OVER_MAML_TIME, time))})")


def recipe(row: dict) -> str:
    """What a run trained with besides its rule: inner steps, learned or fixed step sizes, final or multi-step loss."""
    return (f"m={row['inner_steps']}, " + ("learned step sizes" if row["learned"] else "fixed β") +
            (", multi-step loss" if row["multi_step_loss"] else ""))


def same_recipe(group: list[dict]) -> dict[str, list[dict]]:
    """The rows of `group` by recipe, in the order they first appear."""
    recipes: dict[str, list[dict]] = {}
    for r in group:
        recipes.setdefault(recipe(r), []).append(r)
    return recipes


def rule_goals(head: str, group: list[dict]) -> list[str]:
    """The sign rule against fo and maml with everything else equal (same m, step sizes and loss): what the rule
    itself gives, apart from the learned sizes and the multi-step loss that sign's exact meta-gradient makes cheap."""
    lines = []
    for name, rows in same_recipe(group).items():
        sign = best_of(rows, "sign")
        for other in filter(None, (best_of(rows, "fo"), best_of(rows, "maml"))):
            if sign:
                gap = 100 * (sign["test_chosen_mean"] - other["test_chosen_mean"])
                lines.append(f"- {head}: the rule alone ({name}): {label(sign)} minus {label(other)}: "
                             f"{gap:+.2f} points")
    return lines


def learned_goal(head: str, group: list[dict], earlier: list[dict] = ()) -> list[str]:
    """Learned step sizes from the default beta, with no sweep, within 1 point of the grid's fixed beta, each
    compared with the fixed-beta run of the same m and loss (against a fixed m = 1 run, a learned m = 5 run would
    credit the sizes with what the extra inner steps gave). Where `group` holds only one of the two, they are
    compared at the longest budget in `earlier` (rows of the same setting at this budget or shorter, from every
    record) that both reached."""
    lines = []
    for m, multi_step in dict.fromkeys((r["inner_steps"], r["multi_step_loss"]) for r in group if r["algo"] == "sign"):
        def pick(rows, learned, m=m, multi_step=multi_step):
            return best_of([r for r in rows if (r["inner_steps"], r["multi_step_loss"]) == (m, multi_step)], "sign",
                           learned=learned)
        learned, fixed, where = pick(group, True), pick(group, False), ""
        if not (learned and fixed):
            met = last_met(earlier, group[0]["steps"], lambda rows: pick(rows, True), lambda rows: pick(rows, False))
            if not met:
                continue
            there, words = met
            where = f"no {'learned' if fixed else 'fixed-β'} row here, {words}: "
            learned, fixed = pick(there, True), pick(there, False)
        gap = 100 * (learned["test_chosen_mean"] - fixed["test_chosen_mean"])
        lines.append(f"- {head}: {where}learned step sizes from the default β, {label(learned)}, minus fixed β "
                     f"{'/'.join(f'{b:g}' for b in fixed['betas'])}, {label(fixed)}: {gap:+.2f} points (goal "
                     f"≥ −{LEARNED_VS_GRID_POINTS:g}: {verdict(at_least(gap, -LEARNED_VS_GRID_POINTS))})")
    return lines


def time_to_target_lines(head: str, group: list[dict]) -> list[str]:
    """Each run's time to the validation target as a ratio to fo's (maml's when fo is missing)."""
    reference = best_of(group, "fo") or best_of(group, "maml")
    lines = []
    for r in group:
        reach, base = r["time_to_target"][0], reference["time_to_target"][0] if reference else None
        if r is not reference and reach["seconds"] and base and base["seconds"]:
            lines.append(f"- {head}: {label(r)} reaches {100 * r['target']:.0f}% validation in "
                         f"{reach['seconds'] / base['seconds']:.2f}× the time of {label(reference)} "
                         f"({reach['step']} vs {base['step']} meta-steps)")
    return lines


def markdown(rows: list[dict], every_budget: list[dict] | None = None) -> str:
    lines = [conditions_line(rows), "",
             "| setting | m | variant | seeds | meta-steps | test, protocol chosen on val (mean; spread over seeds; "
             "95% CI) | chosen (steps × β scale) | test, paper's protocol (10 × 1) | val ranked at | best val | "
             "last-20% gain | s / meta-step | CPU-hours: final runs (+ β grid, estimated) | to val target |",
             "|" + " --- |" * 14]
    for r in rows:
        cells = ", ".join(f"{c['inner_steps']}×{c['lr_scale']:g}" for c in r["chosen_cells"])
        reach = ", ".join("—" if t["step"] is None else f"{t['step']} ({t['seconds'] / 60:.1f} min)"
                          for t in r["time_to_target"])
        ci = "/".join(f"{100 * c:.2f}" for c in r["test_chosen_ci95"])
        gain = "/".join(plateau_cell(g, d) for g, d in zip(r["plateau_gain_points"], r["final_val_drop_points"]))
        hours = f"{r['cpu_hours']:.2f}" + (f" (+≈{r['grid_cpu_hours_estimate']:.2f})"
                                           if r["grid_cpu_hours_estimate"] else "")
        lines.append(f"| {r['setting']} | {r['inner_steps']} | {r['variant']} | {len(r['seeds'])} | {r['steps']} | "
                     f"**{100 * r['test_chosen_mean']:.2f}%**; ±{100 * r['test_chosen_seed_spread'] / 2:.2f}; "
                     f"±{ci} | {cells} | {100 * r['test_paper_mean']:.2f}% | {r['val_ranking']} | "
                     f"{100 * r['best_val_mean']:.2f}% | "
                     f"{gain} | {r['seconds_per_meta_step']:.3f} | {hours} | {reach} (≥{100 * r['target']:.0f}%) |")
    lines.append("")
    if rows:
        lines += ["Goals (best variant of each method at the same budget; seconds per meta-step as measured, so "
                  "read time ratios with the conditions above; a run whose validation was ranked at the paper's "
                  "10 test steps reaches the target later when its chosen protocol is shorter, so compare times "
                  "between rows ranked alike; a method with no row at a budget is compared at the longest budget "
                  "up to it where both methods have runs, among every record):", ""]
        lines += goals(rows, every_budget) + [""]
    learned = [r for r in rows if r["step_sizes"] and r["step_sizes"][0]]
    for r in learned:
        lines += [f"Learned step sizes, {r['setting']} m={r['inner_steps']} {r['variant']} (seed {r['seeds'][0]}; "
                  f"initial β = {r['betas'][0]:g}; value per trained step and × initial):", "",
                  "| tensor | β per step | × initial |", "| --- | --- | --- |"]
        initial = r["betas"][0]  # every seed of a learned variant starts from the same β
        for name, sizes in r["step_sizes"][0].items():
            sizes = sizes if isinstance(sizes, list) else [sizes]
            values = ", ".join(f"{s:.4g}" for s in sizes)
            ratios = ", ".join(f"{s / initial:.2f}" for s in sizes)
            lines.append(f"| {name} | {values} | {ratios} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_label(row: dict) -> str:
    """A row's name in the figures: with its budget, since one variant may hold rows at several (longest_records)."""
    return f"{row['setting']} m{row['inner_steps']} {row['variant']}, {row['steps']} steps"


def line_style(index: int) -> dict:
    """Ten colours, then the next line style: a figure of more than ten rows names each line once."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[(index // 10) % 4]}


def plot(rows: list[dict], out: Path) -> None:
    from dist_signmaml.plot import plt, save

    figure, (left, right) = plt.subplots(1, 2, figsize=(14, max(4.5, 1.5 + 0.28 * len(rows))))
    labels = [plot_label(r) for r in rows]
    left.barh(range(len(rows)), [100 * r["test_chosen_mean"] for r in rows],
              xerr=[100 * max(r["test_chosen_ci95"]) for r in rows], color="C0", label="protocol chosen on val")
    left.scatter([100 * r["test_paper_mean"] for r in rows], range(len(rows)), color="C3", zorder=3,
                 label="paper's protocol (10 steps)")
    seeds = [(100 * a, i) for i, r in enumerate(rows) for a in r["test_chosen"]]
    left.scatter(*zip(*seeds), color="k", marker="|", s=120, zorder=4, label="each seed (chosen protocol)")
    lowest = min(min(100 * a for a in r["test_chosen"] + [r["test_paper_mean"]]) for r in rows)
    left.set_xlim(max(0.0, 5 * (lowest // 5) - 5), 100)  # from 0 the seeds' spread would be invisible
    left.set_yticks(range(len(rows)), labels, fontsize=8)
    left.set(xlabel="test accuracy (%)", title="Omniglot test accuracy")
    left.legend(fontsize=8)
    for i, (r, label) in enumerate(zip(rows, labels)):
        right.plot(range(len(r["test_curve"])), [100 * a for a in r["test_curve"]], marker=".", label=label,
                   **line_style(i))
    right.set(xlabel="inner steps at test (training β)", ylabel="test accuracy (%)",
              title="Accuracy after each test-time inner step")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not over them
    save(figure, out / "fidelity.png")
    plot_time_to_accuracy(rows, out)
    learned = [r for r in rows if r["step_sizes"] and r["step_sizes"][0]]
    if learned:
        figure, axes = plt.subplots(figsize=(10, 4.5))
        names = list(learned[0]["step_sizes"][0])
        width = 0.8 / len(learned)
        for i, r in enumerate(learned):
            sizes = r["step_sizes"][0]
            ratios = [(sizes[n] if isinstance(sizes[n], list) else [sizes[n]])[0] / r["betas"][0] for n in names]
            axes.bar([x + (i - (len(learned) - 1) / 2) * width for x in range(len(names))], ratios, width,
                     label=f"{r['setting']} m{r['inner_steps']} {r['variant']} (seed {r['seeds'][0]})")
        axes.set_yscale("log")
        axes.axhline(1.0, color="k", lw=0.8)
        axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        axes.set(ylabel="learned β / initial β (first trained step)", title="Learned inner step sizes per tensor")
        axes.legend(fontsize=7)
        save(figure, out / "step_sizes.png")


def plot_time_to_accuracy(rows: list[dict], out: Path) -> None:
    """Validation accuracy against training minutes (meta-steps × the run's mean seconds per meta-step), one panel
    per setting, one above the other, every seed, with the setting's target dashed."""
    from dist_signmaml.plot import plt, save

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    figure, axes = plt.subplots(len(settings), 1, figsize=(13, 5 * len(settings)), squeeze=False)
    for axis, setting in zip(axes[:, 0], settings):
        group = [r for r in rows if r["setting"] == setting]
        for index, r in enumerate(group):
            for i, curve in enumerate(r["val_curves"]):
                axis.plot(curve["minutes"], [100 * a for a in curve["accuracy"]], **line_style(index),
                          alpha=1.0 if i == 0 else 0.5, label=None if i else
                          f"m{r['inner_steps']} {r['variant']}, {r['steps']} steps ({len(r['seeds'])} seed(s), "
                          f"val at {r['val_ranking']})")
        axis.axhline(100 * group[0]["target"], color="k", ls="--", lw=0.8)
        axis.set_xscale("log")
        axis.set(xlabel="training minutes, one core (log)", ylabel="validation accuracy (%)",
                 title=f"Omniglot {setting}: time to accuracy (target dashed)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not over them
    save(figure, out / "time_to_accuracy.png")


def summarize(root: str | tuple = "", out: str = "") -> list[dict]:
    """The table and figures of the records in `root` (written there), or, given several record folders (a comma
    list) and `out`, of each run at the longest budget among them (written to `out`)."""
    from bench.fidelity import RESULTS, FidelityError

    names = root.split(",") if isinstance(root, str) else list(root)  # fire reads a,b as a tuple
    roots = [Path(str(r).strip()) for r in names if str(r).strip()] or [RESULTS]
    for folder in roots:
        if not folder.is_dir():
            raise FidelityError(f"summary --root: {folder} is not a folder of fidelity records")
    if len(roots) > 1 and not out:
        raise FidelityError(f"summary --root: {len(roots)} record folders give one table of each run at its "
                            "longest budget; name the folder to write it to with --out")
    target = Path(out) if out else roots[0]
    target.mkdir(parents=True, exist_ok=True)
    records = [record for folder in roots for record in load_records(folder)]
    rows = group_rows(longest_records(records) if len(roots) > 1 else records)
    every_budget = group_rows(records) if len(roots) > 1 else rows
    (target / "fidelity.json").write_text(json.dumps(rows, indent=1) + "\n")
    (target / "fidelity.md").write_text(markdown(rows, every_budget))
    if rows:
        plot(rows, target)
    print((target / "fidelity.md").read_text())
    return rows
