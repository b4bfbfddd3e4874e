"""The benchmarks' own arithmetic and plumbing: the FLOP count behind the kernel-efficiency figure, the one bench
meta-step, the CPU allocator setting, and the dry runs of bench/gpu.sh and the scaling bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_signmaml.config import REPO_ROOT
from bench import cost
from bench.common import bench_learner, meta_step
from bench.efficiency import layer_forward_flops, meta_step_flops
from dist_signmaml.cpu_allocator import keep_freed_memory

from tests.test_backbones import episode_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_conv4_layer_flops_follow_the_formula():
    learner, _ = bench_learner((28, 28, 1), "cpu", ways=5, channels_last=False)
    counts = layer_forward_flops(learner.model, (1, 28, 28), images=5)
    # 2 n C_out H W C_in k^2 per conv (maps 28, 14, 7, 3 px), then the 64 -> 5 head on a 1x1 map
    expected = [2 * 5 * 64 * 28 * 28 * 1 * 9] + [2 * 5 * 64 * side * side * 64 * 9 for side in (14, 7, 3)] + [2 * 5 * 64 * 5]
    assert counts == expected


@pytest.mark.parametrize("queries,inner_steps", [(1, 1), (3, 2)])
def test_meta_step_flop_count_equals_torchs_flop_counter(queries, inner_steps):
    """FlopCounterMode counts every matmul/convolution (forward and each backward) the meta-step dispatches."""
    torch.manual_seed(0)
    learner, optimizer = bench_learner((28, 28, 1), "cpu", ways=5, queries=queries, inner_steps=inner_steps)
    batch = episode_batch(2, 5, 1, queries, 28, channels=1)
    with FlopCounterMode(display=False) as counter:
        meta_step(learner, optimizer, batch)
    assert counter.get_total_flops() == meta_step_flops(learner.model, (1, 28, 28), tasks=2, ways=5, shots=1,
                                                        queries=queries, inner_steps=inner_steps)


def test_bench_meta_step_uses_the_trainers_defaults_and_updates_the_weights():
    learner, optimizer = bench_learner((28, 28, 1), "cpu", algo="fo", ways=5, queries=2)
    assert learner.inner_lr == 0.1  # config.DEFAULT_INNER_LR["fo"], not a bench constant
    before = [p.detach().clone() for p in learner.parameters()]
    meta_step(learner, optimizer, episode_batch(2, 5, 1, 2, 28, channels=1))
    assert all(p.grad is None for p in learner.parameters())  # released, as the engine does
    assert any(not torch.equal(a, p) for a, p in zip(before, learner.parameters()))


def test_cost_times_fidelity_variants_with_their_options_and_gives_each_one_over_maml(tmp_path, omniglot_root, capsys):
    """bench.cost --algos takes bench.fidelity's variants: each builds the trainer's learner with the variant's
    options, and the ratios put each variant over FO-MAML and MAML, from medians of the same interleaved rounds."""
    built = {}
    real_build_step = cost.build_step

    def spying_build_step(variant, implementation, inner_steps, batch, ways):
        step = real_build_step(variant, implementation, inner_steps, batch, ways)
        built[variant] = step.__closure__  # the closure holds the learner it steps
        return step

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cost, "build_step", spying_build_step)
        cost.main(ways="3", queries="1", inner_steps="2", meta_batch="2", algos="sign-lsl-msl,fo,maml", repeats=1,
                  warmup=0, threads=1, memory=False, data=str(omniglot_root), out=str(tmp_path / "cost.json"))
    capsys.readouterr()
    learners = {v: next(c.cell_contents for c in cells if isinstance(c.cell_contents, torch.nn.Module))
                for v, cells in built.items()}
    assert learners["sign-lsl-msl"].rule.name == "sign" and learners["sign-lsl-msl"].multi_step_loss
    assert learners["sign-lsl-msl"].learn_inner_lr == "layer_step" and learners["maml"].learn_inner_lr == "none"
    assert not learners["fo"].multi_step_loss and learners["maml"].rule.name == "maml"
    setting = json.loads((tmp_path / "cost.json").read_text())["settings"][0]
    median = {name: timing["median_s"] for name, timing in setting["step_s"].items()}
    assert set(median) == {"sign-lsl-msl@ours", "fo@ours", "maml@ours"}
    assert setting["ratios"]["sign-lsl-msl/maml"] == pytest.approx(median["sign-lsl-msl@ours"] / median["maml@ours"])
    assert setting["ratios"]["sign-lsl-msl/fo"] == pytest.approx(median["sign-lsl-msl@ours"] / median["fo@ours"])
    assert setting["ratios"]["fo/maml"] == pytest.approx(median["fo@ours"] / median["maml@ours"])
    assert "maml/maml" not in setting["ratios"] and "maml/fo" in setting["ratios"]


@pytest.mark.parametrize("algos,implementations,says", [
    ("sign-adam", "ours", "'sign-adam' is not a variant"),
    ("adam", "ours", "'adam' is not a variant"),
    ("sign-lsl", "ours,reference", "the clone-loop reference has fixed step sizes"),
])
def test_cost_refuses_a_variant_it_cannot_time_before_any_work(algos, implementations, says, tmp_path):
    with pytest.raises(SystemExit, match=says) as refused:
        cost.main(algos=algos, implementations=implementations, data=str(tmp_path / "never read"))
    assert str(refused.value).startswith("error: --algos")


PAGE_FAULTS_OF_A_META_STEP = """
import resource, sys, torch
from dist_signmaml.algorithms import MetaLearner, make_rule
from dist_signmaml.cpu_allocator import keep_freed_memory
from dist_signmaml.models import build_backbone
from tests.test_backbones import episode_batch
torch.set_num_threads(1)
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
learner = MetaLearner(build_backbone("conv4", in_channels=1, ways=5, image_size=28), make_rule("sign"), 0.005, 1)
batch = episode_batch(2, 5, 1, 15, 28, channels=1)
faults = []
for step in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    learner(*batch).loss.backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[2:]))  # the steady state: the heap has reached its size after the first steps
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_meta_step_reuses_freed_memory_without_page_faults_once_kept():
    """Meta-steps 3-6 of conv4 at 15 queries, 2 tasks (the fewest faults among them). Negative control first: by
    default glibc maps each large activation afresh and every step faults in thousands of pages."""
    results = {}
    for mode in ("default", "keep"):
        run = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_A_META_STEP, mode], capture_output=True,
                             text=True, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), check=True)
        applied, faults = run.stdout.split()
        results[mode] = (applied == "True", int(faults))
    assert results["default"][1] > 2_000, results
    assert results["keep"][0] is True and results["keep"][1] < results["default"][1] / 20, results
    assert keep_freed_memory() is True  # idempotent in this process


def test_gpu_script_cpu_dry_run_writes_every_part_as_json(tmp_path):
    """bench/gpu.sh --cpu-dry-run: the same parts as on the GPU machine at tiny sizes, one JSON folder."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu.sh"), "--cpu-dry-run", str(tmp_path)], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:] + "".join(p.read_text()[-2000:] for p in tmp_path.glob("*.log"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert {name: part["status"] for name, part in summary["parts"].items()} == {
        "cost_grid": "ok", "backbones": "ok", "scaling": "ok"}
    cost = json.loads((tmp_path / "cost_grid.json").read_text())
    assert set(cost["settings"][0]["step_s"]) == {f"sign@{i}" for i in ("nchw", "channels_last", "vmap", "reference")}
    assert cost["machine"]["device"] != "cuda" and "load_average_1_5_15min" in cost["load_before"]
    backbones = json.loads((tmp_path / "backbones.json").read_text())
    assert {row["variant"] for row in backbones["rows"]} == {"fp32", "channels_last"} and not backbones["failures"]
    scaling = json.loads((tmp_path / "scaling.json").read_text())
    assert scaling["two_ranks"]["world_size"] == 2 and len(scaling["independent_copies"]) == 2
    # Recomputed from the unrounded rates: the ratio of the two 3-decimal figures can be off by more than their
    # rounding when the bound is small (a dry run's tiny steps on a loaded machine).
    one_rate, two_rate = scaling["one_rank"]["tasks_per_second"], scaling["two_ranks"]["tasks_per_second"]
    slower_copy_rate = min(copy["tasks_per_second"] for copy in scaling["independent_copies"])
    assert scaling["speedup"] == pytest.approx(two_rate / one_rate, abs=6e-4)
    assert scaling["bound_speedup"] == pytest.approx(2 * slower_copy_rate / one_rate, abs=6e-4)
    assert scaling["efficiency_vs_bound"] == pytest.approx(two_rate / (2 * slower_copy_rate), abs=6e-4)
    for two in (scaling["two_ranks"], scaling["two_ranks_pinned_one_core_each"]):  # compute alone vs with DDP's sync
        assert 0 < two["seconds_per_step_without_allreduce"] and two["allreduce_buckets_per_step"] >= 1
