"""Markdown tables from bench.cost JSON files, each figure checked against the targets of the cost benchmark.

    python -m bench.table bench/results/cost_algos_p4_cpu.json bench/results/cost_implementations_cpu.json

Three tables, each only when the inputs have what it needs:
  step time      per setting: median ms of sign / fo / maml (ours), sign/fo and sign/maml
  peak memory    per (ways, queries, meta-batch, algo): MiB at each inner-step count, and m=10 / m=1
  implementations  per setting: ms of every implementation, and its ratio to the clone-loop reference
A ✓ or ✗ follows every ratio that has a target (README "Benchmarks"); a ratio without a target is printed plain.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire

# Targets of the cost benchmark (issue "Benchmarks and paper reproduction"), all measured with 1 query per class
# unless the key says otherwise.
TARGETS = {"sign/fo": 1.02, "sign/maml@m1": 0.40, "sign/maml@m5": 0.30, "memory m10/m1": 1.2,
           "reference@1q": 0.7, "reference@15q": 0.9}


IMPLEMENTATION_ORDER = ["ours", "nchw", "channels_last", "compile", "compile_nchw", "vmap", "reference"]
# A file counts as measured on an idle machine when its load was recorded before and after, no other process was
# busy, and the 1-minute load average (which includes the benchmark's own core) stayed below this.
IDLE_LOAD_1MIN = 1.5


def other_busy(load: dict | None) -> list[str]:
    """The busy processes a load record lists, less the sampler's own `ps` (records before it excluded itself)."""
    return [p for p in (load or {}).get("busy_processes", []) if not p.startswith("ps (")]


def measured_idle(before: dict | None, after: dict | None) -> bool:
    return (before is not None and after is not None and not other_busy(before) and not other_busy(after)
            and max(before["load_average_1_5_15min"][0], after["load_average_1_5_15min"][0]) < IDLE_LOAD_1MIN)


def mark(value: float, target: float | None) -> str:
    if target is None:
        return f"{value:.3f}"
    return f"{value:.3f} {'✓' if value <= target else '✗'}"


def settings_of(paths) -> list[dict]:
    found = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for entry in data["settings"]:
            found.append(entry | {"machine": data["machine"], "file": Path(path).name,
                                  "load": (data.get("load_before"), data.get("load_after"))})
    return found


def milliseconds(entry: dict, name: str) -> float | None:
    timing = entry["step_s"].get(name)
    return None if timing is None else 1000 * timing["median_s"]


def step_time_table(entries: list[dict]) -> list[str]:
    rows = [e for e in entries if all(f"{a}@ours" in e["step_s"] for a in ("sign", "fo", "maml"))]
    if not rows:
        return []
    lines = ["| ways | queries | inner steps m | meta-batch | sign ms | fo ms | maml ms | sign/fo | sign/maml |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in sorted(rows, key=lambda e: (e["meta_batch"], e["ways"], e["queries"], e["inner_steps"])):
        sign, fo, maml = (milliseconds(e, f"{a}@ours") for a in ("sign", "fo", "maml"))
        one_query = e["queries"] == 1
        maml_target = TARGETS.get(f"sign/maml@m{e['inner_steps']}") if one_query else None
        lines.append(f"| {e['ways']} | {e['queries']} | {e['inner_steps']} | {e['meta_batch']} | {sign:.0f} | {fo:.0f} | "
                     f"{maml:.0f} | {mark(sign / fo, TARGETS['sign/fo'] if one_query else None)} | "
                     f"{mark(sign / maml, maml_target)} |")
    return lines


def memory_table(entries: list[dict]) -> list[str]:
    groups: dict[tuple, dict[int, dict]] = {}
    for e in entries:
        if "peak_memory_mib" in e:
            groups.setdefault((e["meta_batch"], e["ways"], e["queries"]), {})[e["inner_steps"]] = e["peak_memory_mib"]
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return []
    steps = sorted({m for by_m in groups.values() for m in by_m})
    lines = ["| meta-batch | ways | queries | algo | " + " | ".join(f"MiB at m={m}" for m in steps)
             + " | largest m / smallest m |", "| --- " * (5 + len(steps)) + "|"]
    for (p, w, q), by_m in sorted(groups.items()):
        for algo in ("sign", "fo", "maml"):
            name = f"{algo}@ours"
            if not all(name in by_m[m] for m in by_m):
                continue
            cells = [f"{by_m[m][name]:.1f}" if m in by_m else "" for m in steps]
            low, high = min(by_m), max(by_m)
            ratio = by_m[high][name] / by_m[low][name]
            target = TARGETS["memory m10/m1"] if algo == "sign" and (low, high) == (1, 10) else None
            lines.append(f"| {p} | {w} | {q} | {algo} | " + " | ".join(cells) + f" | {mark(ratio, target)} |")
    return lines


def implementation_table(entries: list[dict]) -> list[str]:
    rows = [e for e in entries if any(name.endswith("@reference") for name in e["step_s"])]
    if not rows:
        return []
    lines = ["| ways | queries | m | meta-batch | algo | implementation | ms | / reference | / ours |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in sorted(rows, key=lambda e: (e["meta_batch"], e["ways"], e["queries"], e["inner_steps"])):
        algos = sorted({name.split("@")[0] for name in e["step_s"]}, key=["sign", "fo", "maml"].index)
        for algo in algos:
            reference = milliseconds(e, f"{algo}@reference")
            ours = milliseconds(e, f"{algo}@ours")
            present = [n.split("@")[1] for n in e["step_s"] if n.startswith(algo + "@")]
            for impl in sorted(present, key=lambda i: IMPLEMENTATION_ORDER.index(i) if i in IMPLEMENTATION_ORDER else 99):
                ms = milliseconds(e, f"{algo}@{impl}")
                target = None
                if impl != "reference" and e["meta_batch"] >= 32:
                    target = TARGETS.get(f"reference@{e['queries']}q")
                versus_reference = mark(ms / reference, target) if reference and impl != "reference" else ""
                versus_ours = f"{ms / ours:.2f}" if ours and impl != "ours" else ""
                lines.append(f"| {e['ways']} | {e['queries']} | {e['inner_steps']} | {e['meta_batch']} | {algo} | "
                             f"{impl} | {ms:.0f} | {versus_reference} | {versus_ours} |")
    return lines


def tables(*paths: str) -> str:
    if not paths:
        raise SystemExit("error: give bench.cost JSON files: python -m bench.table bench/results/cost_*.json")
    entries = settings_of(paths)
    machines = {json.dumps(e["machine"], sort_keys=True) for e in entries}
    out = [f"Machine: {', '.join(sorted(machines))}. Median of the timed steps; ✓/✗ against the targets. Within one "
           f"file every configuration ran side by side, in interleaved rounds on the same pinned core(s).", ""]
    loads = dict(sorted({e["file"]: e["load"] for e in entries}.items()))
    idle = [name for name, (before, after) in loads.items() if measured_idle(before, after)]
    not_idle = [name for name in loads if name not in idle]
    out.append(f"Measured on an idle machine (nothing else busy, 1-min load < {IDLE_LOAD_1MIN:g}): "
               f"{', '.join(idle) or 'none'}. " + (
                   f"NOT measured on an idle machine (load not recorded, or other work running): "
                   f"{', '.join(not_idle)}; their absolute times are not idle figures, and they compare with the "
                   f"other files only through ratios." if not_idle else ""))
    out += ["", "Machine load while measured (1/5/15-min load averages before -> after; other busy processes):", ""]
    for name, (before, after) in loads.items():
        if before is None:
            out.append(f"- {name}: not recorded (measured before load was recorded)")
            continue
        busy = sorted(set(other_busy(before)) | set(other_busy(after)))
        out.append(f"- {name}: {before['load_average_1_5_15min']} -> {after['load_average_1_5_15min'] if after else '?'}"
                   f" on {before['cpu_cores']} cores, pinned to {before['pinned_to_cores']}; busy: "
                   f"{', '.join(busy) if busy else 'nothing else'}")
    out.append("")
    for title, lines in (("Step time (ours, per-task loop)", step_time_table(entries)),
                         ("Peak memory of one meta-step (tensors alive above the start)", memory_table(entries)),
                         ("Implementations side by side", implementation_table(entries))):
        if lines:
            out += [f"#### {title}", ""] + lines + [""]
    return "\n".join(out)


def main(*paths: str, out: str = "") -> None:
    text = tables(*paths)
    print(text)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    fire.Fire(main)
