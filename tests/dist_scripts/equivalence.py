"""N ranks vs one process on the same episodes: launched by tests/test_distributed.py and test_deepspeed.py.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/cpu_2proc.yaml tests/dist_scripts/equivalence.py --data D --out O
    accelerate launch --config_file launch/deepspeed_zero2.yaml --num_processes 2 tests/dist_scripts/equivalence.py --zero_stage 2 ...

Every rank draws the same global meta-batches and trains on its share through the engine's production meta-step
(prepared module forward, averaged backward, optimizer step). The optimizer is SGD, not Adam, on purpose: Adam is
invariant to the scale of the gradient, so it would hide a gradient summed over ranks instead of averaged.

Two comparisons, both against a plain single-process run on the whole meta-batch:
  * step by step: before each distributed step the reference copies the current parameters and takes the same
    step on the whole batch; the two results must agree to float32 rounding (STEP_TOLERANCE);
  * end to end: k steps of the reference from the same initialisation. fo and maml must agree within
    STEP_TOLERANCE. sign gets SIGN_DRIFT: its inner step sign(g) is discontinuous, so when float32 summation order
    (mean of rank means vs mean of all tasks) changes a near-zero gradient component's sign, the trajectories part
    by far more than rounding (measured 1.5e-4 after 3 steps against a movement of 0.2).
DDP (--zero_stage 0): all of --algos, plus two deliberately broken reductions that must *fail* the step check (the
gradient summed over ranks, and the meta-loss through the unwrapped module: no all-reduce at all), plus the
refusal of a meta-batch that does not split evenly, plus --meta_grad_clip: the ranks clip the averaged
meta-gradient as one process clips the whole batch's (clipping each rank's own share first would differ).
DeepSpeed (--zero_stage 1|2): one algorithm (one model per DeepSpeed engine); the reference steps are torch DDP
steps in the same processes, so the check is "ZeRO matches DDP" (and DDP matches one process, checked as well);
with --meta_grad_clip, DeepSpeed's own clipping against the same clipping in torch DDP and in one process.
"""

from __future__ import annotations

import argparse
import copy
import functools

import torch
from torch.nn.parallel import DistributedDataParallel

from dist_signmaml.algorithms.learner import LOG_STEP_SIZES
from dist_signmaml.engine import DistributedSetupError, Engine
from meta_harness import (flat_parameters, global_batches, make_learner, max_difference, report, share,
                          train_reference)

STEP_TOLERANCE = 1e-5  # float32 summation order; measured 3e-8 .. 3e-7
SIGN_DRIFT = 0.05  # end-to-end sign runs: at most this fraction of the parameters' movement (measured < 1e-3)
BROKEN_MINIMUM = 1e-3  # a broken reduction moves parameters by about lr * |gradient| (measured > 0.1)
CLIP_NORM = 1e-2  # far under the meta-gradients' norm here, so every step is clipped


def one_process_step(module, batch, lr: float, max_norm: float = 0.0) -> torch.Tensor:
    """Parameters after one plain SGD step of a copy of `module` on the whole meta-batch (its meta-gradient first
    clipped to `max_norm` when that is set)."""
    module = copy.deepcopy(module)
    module(*batch).loss.backward()
    if max_norm:
        torch.nn.utils.clip_grad_norm_(list(module.parameters()), max_norm)
    with torch.no_grad():
        for p in module.parameters():
            p -= lr * p.grad
    return flat_parameters(module)


def assert_clipping_changes_a_step(algo: str, module, batch, lr: float, max_norm: float) -> None:
    """A clipped step that equals the unclipped one would make the clipped comparison void."""
    bites = max_difference(one_process_step(module, batch, lr, max_norm), one_process_step(module, batch, lr))
    assert bites > BROKEN_MINIMUM, f"{algo}: clipping at {max_norm} hardly changed a step ({bites:.2e})"


class TorchDDPStep:
    """One torch-DDP step from given parameters, in the processes of the run (the DeepSpeed comparison's side)."""

    def __init__(self, learner, rank: int, world: int, lr: float, max_norm: float = 0.0):
        self.ddp = DistributedDataParallel(copy.deepcopy(learner), broadcast_buffers=False)
        self.optimizer = torch.optim.SGD(self.ddp.parameters(), lr=lr)
        self.rank, self.world, self.max_norm = rank, world, max_norm

    def __call__(self, module, batch, lr: float) -> torch.Tensor:
        self.ddp.module.load_state_dict(module.state_dict())
        self.ddp(*share(batch, self.rank, self.world)).loss.backward()
        if self.max_norm:
            torch.nn.utils.clip_grad_norm_(list(self.ddp.parameters()), self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return flat_parameters(self.ddp.module)


def train_torch_ddp(initial, batches, lr: float, ddp_step: TorchDDPStep):
    """k torch-DDP steps from `initial` (the DeepSpeed run's end-to-end partner), and the worst per-step difference
    from one process (clipped as the DDP step clips)."""
    module, worst = copy.deepcopy(initial), 0.0
    for batch in batches:
        expected = one_process_step(module, batch, lr, ddp_step.max_norm)
        worst = max(worst, max_difference(ddp_step(module, batch, lr), expected))
        module.load_state_dict(ddp_step.ddp.module.state_dict())
    return module, worst


def train_through_engine(engine: Engine, learner, batches, lr: float, expected_step=one_process_step, *,
                         loss_scale: float = 1.0, bypass_ddp: bool = False):
    """Train a copy of `learner` on this rank's shares; return it and the worst per-step difference from
    `expected_step` taken from the same parameters. loss_scale / bypass_ddp inject the two known bugs."""
    learner = copy.deepcopy(learner)
    optimizer = torch.optim.SGD(learner.parameters(), lr=lr)
    prepared, optimizer = engine.prepare(learner, optimizer, len(batches[0].support_x) // engine.world_size)
    worst = 0.0
    for batch in batches:
        expected = expected_step(engine.unwrap(prepared), batch, lr)
        mine = share(batch, engine.rank, engine.world_size)
        if loss_scale == 1.0 and not bypass_ddp:
            engine.meta_step(prepared, optimizer, mine)  # the production step
        else:
            module = engine.unwrap(prepared) if bypass_ddp else prepared  # .module: DDP's reducer never fires
            engine.backward(module(*mine).loss * loss_scale)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        worst = max(worst, max_difference(flat_parameters(engine.unwrap(prepared)), expected))
    return engine.unwrap(prepared), worst


def spread_over_ranks(engine: Engine, params: torch.Tensor) -> float:
    rows = engine.gather(params[None])
    return float((rows - rows[0]).abs().max())


def check_algorithm(engine: Engine, algo: str, batches, lr: float) -> dict:
    initial = make_learner(algo, seed=0)
    reference = flat_parameters(train_reference(initial, batches, lr))
    moved = max_difference(reference, flat_parameters(initial))
    assert moved > 10 * BROKEN_MINIMUM, f"{algo}: the reference hardly trained ({moved:.2e}); the check would be void"
    end_tolerance = SIGN_DRIFT * moved if algo.startswith("sign") else STEP_TOLERANCE
    name = f"ZeRO-{engine.zero_stage}" if engine.zero_stage else "DDP"
    result = {"moved": moved, "end_tolerance": end_tolerance}

    if engine.zero_stage:  # DeepSpeed vs torch DDP, step by step and end to end, clipped alike (--meta_grad_clip)
        if engine.meta_grad_clip:
            assert_clipping_changes_a_step(algo, initial, batches[0], lr, engine.meta_grad_clip)
        ddp_step = TorchDDPStep(initial, engine.rank, engine.world_size, lr, engine.meta_grad_clip)
        ddp_run, ddp_vs_one = train_torch_ddp(initial, batches, lr, ddp_step)
        trained, step_error = train_through_engine(engine, initial, batches, lr, ddp_step)
        end_error = max_difference(flat_parameters(trained), flat_parameters(ddp_run))
        assert ddp_vs_one <= STEP_TOLERANCE, f"{algo}: torch DDP vs one process per step: {ddp_vs_one:.3e}"
        result |= {"ddp_vs_one_process_step": ddp_vs_one}
    else:
        trained, step_error = train_through_engine(engine, initial, batches, lr)
        end_error = max_difference(flat_parameters(trained), reference)
        for bug, options in {"summed": {"loss_scale": float(engine.world_size)}, "unreduced": {"bypass_ddp": True}}.items():
            _, broken = train_through_engine(engine, initial, batches[:1], lr, **options)
            assert broken > BROKEN_MINIMUM, f"{algo}: a {bug} gradient went unnoticed (step difference {broken:.2e})"
            result[f"broken_{bug}_step_error"] = broken
        assert_clipping_changes_a_step(algo, initial, batches[0], lr, CLIP_NORM)
        engine.meta_grad_clip = CLIP_NORM
        _, result["clipped_step_error"] = train_through_engine(
            engine, initial, batches, lr, functools.partial(one_process_step, max_norm=CLIP_NORM))
        engine.meta_grad_clip = 0.0
    spread = spread_over_ranks(engine, flat_parameters(trained))
    assert spread == 0.0, f"{algo}: {name} ranks disagree by {spread:.3e}"
    assert step_error <= STEP_TOLERANCE, f"{algo}: {name} per-step difference {step_error:.3e} > {STEP_TOLERANCE}"
    assert end_error <= end_tolerance, f"{algo}: {name} after {len(batches)} steps differs by {end_error:.3e} > {end_tolerance:.1e}"
    if hasattr(initial, LOG_STEP_SIZES):  # learned step sizes: the same check covers them; say how far they moved
        result["step_sizes_moved"] = max_difference(getattr(trained, LOG_STEP_SIZES).detach().reshape(-1).cpu(),
                                                    getattr(initial, LOG_STEP_SIZES).detach().reshape(-1))
    return result | {"step_error": step_error, "end_error": end_error, "rank_spread": spread}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--zero_stage", type=int, default=0)
    parser.add_argument("--algos", default="sign,fo,maml")
    parser.add_argument("--meta_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--meta_grad_clip", type=float, default=0.0, help="DeepSpeed runs: clip as the trainer would")
    args = parser.parse_args()
    torch.set_num_threads(1)

    engine = Engine(args.out, seed=0, log_with=None, zero_stage=args.zero_stage, meta_grad_clip=args.meta_grad_clip)
    assert engine.world_size > 1, f"launch under several processes, got world size {engine.world_size}"
    batches = global_batches(args.data, args.meta_batch, args.steps, seed=0)
    results = {"world_size": engine.world_size, "zero_stage": engine.zero_stage, "steps": args.steps}
    for algo in args.algos.split(","):
        results[algo] = check_algorithm(engine, algo, batches, args.lr)
    if engine.zero_stage == 0:
        try:
            engine.tasks_per_rank(engine.world_size + 1)
            raise AssertionError("an uneven meta-batch was accepted")
        except DistributedSetupError as error:
            assert f"--meta_batch={engine.world_size + 1} is not divisible" in str(error), error
    report(f"{args.out}/equivalence_zero{engine.zero_stage}.json", results, engine.is_main)
    engine.wait()
    engine.end()


if __name__ == "__main__":
    main()
