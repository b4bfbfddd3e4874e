"""The sbatch scripts of launch/ on a real single-node SLURM that launch/local_slurm.sh installs and starts.

Needs root and apt (or SLURM already installed); elsewhere the module is skipped with the reason. Only one slurmd
exists, so the multi-node script runs here with --nodes 1 (its srun/machine-rank path is the same; two machines are
tested in test_multinode.py). GPU requests in the scripts are overridden with --gpus-per-node=0, and the CPU runs
use gloo (ACCELERATE_USE_CPU=1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.dist_scripts.launching import LAUNCH, REPO_ROOT, TINY_TRAIN, checkpoint_steps, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running local cluster; stopped at the end of the module."""
    if os.geteuid() != 0 and not Path("/usr/sbin/slurmctld").exists():
        pytest.skip("SLURM tests need root to install and start slurmctld/slurmd/munge (launch/local_slurm.sh)")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(LAUNCH / "local_slurm.sh"), "start", str(state)], capture_output=True,
                             text=True, timeout=600)
    if started.returncode == 3:
        pytest.skip(f"SLURM cannot be installed here: {started.stderr.strip()}")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield str(state / "slurm.conf")
    finally:
        subprocess.run(["bash", str(LAUNCH / "local_slurm.sh"), "stop", str(state)], capture_output=True, timeout=60)


@pytest.mark.unit
def test_the_local_node_declares_every_online_core_even_from_a_pinned_shell(tmp_path):
    """A 2-CPU job stayed pending for ever when the cluster was started from a `taskset -c 0` shell: nproc
    honours the affinity (and OMP_NUM_THREADS), so the node was declared with 1 CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(["taskset", "-c", "0", "bash", str(LAUNCH / "local_slurm.sh"), "config", str(tmp_path)],
                   check=True, env=env, timeout=30)
    declared = re.search(r"^NodeName=localhost .*\bCPUs=(\d+)", (tmp_path / "slurm.conf").read_text(), re.M)
    assert declared and int(declared.group(1)) == os.cpu_count()


def slurm_env(conf: str, **extra) -> dict:
    env = dict(os.environ)
    env.update(SLURM_CONF=conf, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sbatch(script: str, tmp_path, *train_options, wait=True, output="%x-%j.out", cpus=2, sbatch_options=()):
    return ["sbatch", *(["--wait"] if wait else []), "--parsable", "--gpus-per-node=0", f"--cpus-per-task={cpus}",
            f"--output={tmp_path}/{output}", *sbatch_options, str(LAUNCH / script), *map(str, train_options)]


def job_state(job: str, env) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    found = re.search(r"JobState=(\S+)", shown)
    return found.group(1) if found else "UNKNOWN"


STEPS = 40


@pytest.fixture(scope="module")
def preempted_job(slurm, tmp_path_factory, omniglot_root):
    """One short 2-rank training submitted with `sbatch --wait` and signalled mid-run with USR1 (what
    --signal=USR1@120 sends before the time limit); shared by the two tests below to keep the suite short.
    It uses slurm_multi_node.sbatch with --nodes=1 (single-node and multi-node scripts share slurm_lib.sh and
    node_launch.sh, and differ in their #SBATCH lines) and the top-level accelerate_config.yaml, cut to 2 CPU
    processes."""
    tmp = tmp_path_factory.mktemp("preempted")
    name = f"signmaml-test-{uuid.uuid4().hex[:6]}"
    env = slurm_env(slurm, ACCELERATE_CONFIG="accelerate_config.yaml", PROCESSES_PER_NODE=2, RUNS_DIR=tmp / "runs")
    submit = subprocess.Popen(sbatch("slurm_multi_node.sbatch", tmp, *TINY_TRAIN, "--steps", STEPS, "--ckpt_every", 5,
                                     "--data", omniglot_root, sbatch_options=["--nodes=1", f"--job-name={name}"]),
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = None
    try:
        job = wait_for(lambda: subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], env=env, capture_output=True,
                                              text=True).stdout.strip(), 30, "the job id", interval=0.2, process=submit)
        run = tmp / "runs" / f"{name}-{job}"
        wait_for(lambda: 5 in checkpoint_steps(run), 240, "the step-5 checkpoint", process=submit)
        subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
        wait_for(lambda: (run / "PREEMPTED").exists(), 120, "the stop-on-signal checkpoint", process=submit)
        wait_for(lambda: job_state(job, env) == "PENDING", 60, "the job to be requeued", interval=0.2)
        # SLURM holds a requeued job back (BeginTime, ~2 min); a real cluster waits, the test waits 3 s: a restart
        # within the second of the requeue is refused ("Job credential revoked").
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], env=env, check=True)
        returncode = submit.wait(timeout=300)
    finally:
        if submit.poll() is None:
            if job:
                subprocess.run(["scancel", job], env=env)
            submit.kill()
    log = (tmp / f"{name}-{job}.out").read_text()
    print(f"\n--- {name}-{job}.out, launcher lines ---\n" + "\n".join(
        line for line in log.splitlines() if line.startswith("[20") or "resumed from" in line or "process(es)" in line))
    return SimpleNamespace(returncode=returncode, stderr=submit.stderr.read(), job=job, run=run, log=log)


def test_sbatch_wait_runs_two_ranks_and_fills_the_run_directory(preempted_job):
    job = preempted_job
    assert job.returncode == 0, (job.stderr, job.log[-4000:])  # sbatch --wait: the job's exit status, after requeues
    assert json.loads((job.run / "config.json").read_text())["steps"] == STEPS
    assert checkpoint_steps(job.run)[-1] == STEPS
    assert (job.run / "model.safetensors").is_file() and list((job.run / "tb").rglob("events.out.tfevents.*"))
    assert "2 process(es) on cpu" in job.log and "training step finished with status 0" in job.log


def test_preempted_job_checkpoints_requeues_and_resumes(preempted_job):
    """The ranks checkpoint the same step and exit, the script requeues the job, and the requeued job (same id,
    same run directory) resumes from that checkpoint."""
    job = preempted_job
    stopped = re.search(r'stopped on a signal after a checkpoint \(\{"step": (\d+), "signal": "SIGUSR1"', job.log)
    assert stopped, job.log[-4000:]
    step = int(stopped.group(1))
    assert 5 <= step < STEPS
    assert f"requeueing job {job.job}" in job.log and f"job {job.job} (restart 1)" in job.log
    assert f"resumed from step {step}" in job.log
    assert not (job.run / "PREEMPTED").exists()


def test_job_array_sweep_gives_each_element_its_options_and_run_directory(slurm, tmp_path, omniglot_root):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# two elements\n--algo sign\n\n--algo fo --inner_lr 0.3\n")
    env = slurm_env(slurm, ACCELERATE_CONFIG="launch/cpu_1proc.yaml", SWEEP=sweep, RUNS_DIR=tmp_path / "runs")
    command = sbatch("slurm_sweep.sbatch", tmp_path, *TINY_TRAIN, "--steps", 2, "--data", omniglot_root,
                     output="%x-%A_%a.out", cpus=1, sbatch_options=["--array=0-1"])
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stderr, [p.read_text()[-2000:] for p in tmp_path.glob("*.out")])
    array_job = result.stdout.strip().splitlines()[0]
    for index, (algo, inner_lr) in enumerate([("sign", 0.005), ("fo", 0.3)]):
        run = tmp_path / "runs" / f"signmaml-sweep-{array_job}_{index}"
        config = json.loads((run / "config.json").read_text())
        assert (config["algo"], config["inner_lr"], config["steps"]) == (algo, inner_lr, 2)
        assert (run / "model.safetensors").is_file()
        assert f"sweep element {index}: --algo {algo}" in (tmp_path / f"signmaml-sweep-{array_job}_{index}.out").read_text()
