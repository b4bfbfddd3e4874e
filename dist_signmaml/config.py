"""The training configuration: one typed dataclass, one comment per field, checked before any work starts.

The CLI (`python -m dist_signmaml.train --help`) is generated from this class, so defaults and help live here only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from dist_signmaml.algorithms.inner import MULTI_STEP_ANNEAL_FRACTION, multi_step_anneal
from dist_signmaml.algorithms.learner import LEARNED_STEP_SIZES, TASK_PARALLEL_MODES
from dist_signmaml.algorithms.rules import ALGORITHMS
from dist_signmaml.metatest import STEP_COUNTS, VAL_SELECTS
from dist_signmaml.optim import OUTER_LR_SCHEDULES
from dist_signmaml.profiling import normalize_profile_steps, parse_profile_steps
from dist_signmaml.trackers import check_log_with, normalize_log_with

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout; every other module takes it from here
DEFAULT_DATA = REPO_ROOT / "data" / "shards" / "omniglot-28"
PAPER_META_BATCH = 4  # P, tasks per meta-step (paper section 5.1)


@dataclass(frozen=True)
class AlgorithmFacts:
    """What the CLIs, the sweep and the benchmarks need to know about one inner rule (the rule itself is
    algorithms.make_rule). `default_inner_lr` is beta for Omniglot 28 px conv4-64, picked on the Omniglot
    *validation* split by the Appendix-A grid (docs: "Choosing beta"); a user-given --inner_lr always wins."""

    default_inner_lr: float
    paper_grid: tuple[float, ...]  # Appendix A's search range for beta
    help: str


# signum takes Sign-MAML's grid (both step by beta * sign(.)).
ALGORITHM_FACTS = {
    "sign": AlgorithmFacts(0.005, (0.0035, 0.005, 0.0065, 0.0075, 0.01), "Sign-MAML: signSGD inner step (eq. 14)"),
    "fo": AlgorithmFacts(0.1, (0.06, 0.08, 0.1, 0.12, 0.14, 0.16), "FO-MAML: SGD inner step, first-order"),
    "maml": AlgorithmFacts(0.2, (0.06, 0.08, 0.1, 0.12, 0.14, 0.16), "MAML: SGD inner step, second-order (eq. 5)"),
    "signum": AlgorithmFacts(0.005, (0.0035, 0.005, 0.0065, 0.0075, 0.01), "Signum-MAML: sign of the momentum"),
}
assert set(ALGORITHM_FACTS) == set(ALGORITHMS), "every inner rule needs its facts"
DEFAULT_INNER_LR = {algo: facts.default_inner_lr for algo, facts in ALGORITHM_FACTS.items()}
PAPER_GRIDS = {algo: facts.paper_grid for algo, facts in ALGORITHM_FACTS.items()}

# Options that may differ between a run and its resume: they change how long, how often or how fast it runs, not the
# model or the algorithm (docs/run_lifecycle.md). Every other option must equal the checkpoint's.
MAY_CHANGE_ON_RESUME = frozenset({
    "steps", "log_every", "ckpt_every", "keep_checkpoints", "eval_every", "eval_episodes", "test_episodes",
    "test_inner_steps", "workers", "window_shards", "resume", "overwrite", "out", "data", "dist_timeout",
    "on_bad_sample", "on_nonfinite", "task_parallel", "cpu_affinity", "compile", "compile_backend", "activation_checkpointing",
    "log_with", "project", "profile_steps",
    "schedule_steps",  # checked by what it changes: the span of the schedules (TrainConfig.resume_differences)
})
NONFINITE_POLICIES = ("stop", "skip_step")


class ConfigError(ValueError):
    """A bad option: the message names the flag, the value and what is allowed."""


def _field(default, help_text: str, **kw):
    return field(default=default, metadata={"help": help_text}, **kw)


@dataclass
class TrainConfig:
    ways: int = _field(5, "classes per task (N-way)")
    shots: int = _field(1, "support images per class (K-shot)")
    queries: int = _field(15, "query images per class")
    algo: str = _field("sign", f"inner-loop rule: {' | '.join(ALGORITHMS)}")
    inner_steps: int = _field(1, "inner steps during meta-training (paper: 1)")
    test_inner_steps: int = _field(10, "inner steps at validation/test time (paper: 10)")
    inner_lr: float = _field(0.0, "inner learning rate beta; 0 = the Omniglot-validated default of the algo")
    inner_momentum: float = _field(0.9, "momentum of the signum rule")
    outer_lr: float = _field(1e-3, "Adam learning rate alpha of the meta-update (paper: 0.001)")
    outer_lr_schedule: str = _field("constant", f"outer learning rate over the run: {' | '.join(OUTER_LR_SCHEDULES)} "
                                                "(cosine: from --outer_lr towards 0 at --steps, as MAML++)")
    schedule_steps: int = _field(0, "meta-steps that the outer learning-rate schedule and the multi-step loss's "
                                    "annealing span; 0 = --steps. Give a longer run's budget to train its first "
                                    "--steps exactly as that run would (the sweep's --halving does)")
    learn_inner_lr: str = _field("none", "learned inner step sizes: none (fixed --inner_lr) | layer (one beta per "
                                         "adapted tensor) | layer_step (per tensor and inner step; test steps past "
                                         "the last trained one reuse its sizes); initialised from --inner_lr")
    inner_lr_lr: float = _field(0.01, "Adam learning rate of the learned log step sizes (--learn_inner_lr)")
    meta_grad_clip: float = _field(0.0, "clip the meta-gradient of all meta-parameters together to this L2 norm "
                                        "before the outer update (0 = off, as in the paper)")
    multi_step_loss: bool = _field(False, "train on the query loss after every inner step, MAML++'s annealed weights "
                                          "(memory stays flat in --inner_steps for sign/fo/signum)")
    meta_batch: int = _field(0, "tasks per meta-step over all ranks; 0 = the paper's P = 4 rounded up to a multiple of "
                                "the processes (8 processes: 8)")
    steps: int = _field(300, "meta-steps to train")
    backbone: str = _field("conv4", "backbone: conv4 | resnet12 | resnet18 | resnet34 (README: Backbones and precision)")
    hidden: int = _field(0, "width: conv4 filters (0 = 64 below 64 px, 32 from 64 px, paper); resnet12 base width "
                            "(0 = 64, i.e. 64-160-320-640); must be 0 for resnet18/34")
    stem: str = _field("auto", "resnet18/34 stem: small (3x3 conv, no max-pool) | imagenet (7x7/2 + max-pool) | auto (small below 64 px)")
    weights: str = _field("", "local state dict (.pth/.pt/.safetensors) to start from, e.g. torchvision ResNet weights; never downloaded")
    adapt: str = _field("all", "parameters the inner loop adapts: all | head (ANIL-style) | last:K (last K blocks + head)")
    precision: str = _field("fp32", "fp32 | bf16 (torch.autocast in the backbone's forward, CPU and CUDA; weights stay fp32)")
    channels_last: bool | str = _field("auto", "NHWC end to end (weights, images, gradients): true | false | auto "
                                                "(channels-last on CPU, where it measured faster or level; the choice is logged)")
    compile: bool = _field(False, "torch.compile the per-task inner loop + query loss (first steps are slow: compilation)")
    compile_backend: str = _field("inductor", "torch.compile backend for --compile")
    activation_checkpointing: bool = _field(False, "recompute block activations in backward (query forwards in the task loop)")
    data: str = _field(str(DEFAULT_DATA), "shard root with train/ val/ test/ (default: the bundled Omniglot, built on first use)")
    out: str = _field("runs/latest", "run directory: TensorBoard events, checkpoints, model.safetensors, config.json")
    seed: int = _field(0, "seed for the initialisation and the episode stream")
    log_every: int = _field(10, "meta-steps between TensorBoard/progress updates")
    ckpt_every: int = _field(100, "meta-steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = _field(2, "newest checkpoints kept in OUT/checkpoints")
    resume: bool | str = _field(False, "continue from the newest good checkpoint in --out (starts fresh, saying so, "
                                       "when there is none); 'must': an error when there is none")
    overwrite: bool = _field(False, "start fresh in an --out that holds another run's checkpoints, deleting that run's files")
    cpu_affinity: str = _field("auto", "auto: CPU runs with several processes on a node pin each to its own share "
                                       "of the cores they may use (a synchronous step waits for the slowest rank) "
                                       "| none")
    task_parallel: str = _field("auto", f"run a rank's tasks with {' | '.join(TASK_PARALLEL_MODES)} (auto: loop on CPU, vmap on GPU)")
    workers: int = _field(0, "DataLoader worker processes per rank for the episode stream")
    window_shards: int = _field(8, "shards each stream keeps in memory")
    class_sampling: str = _field("balanced", "episode classes: balanced (each class equally likely) | proportional (to its image count)")
    on_bad_sample: str = _field("error", "unreadable shard sample: error (stop, naming shard and member) | skip (warn, "
                                         "count in TensorBoard data/bad_samples_skipped)")
    eval_episodes: int = _field(100, "fixed val-split episodes per validation; the best weights by val accuracy are kept (0 = no validation)")
    eval_every: int = _field(100, "meta-steps between validations (one also runs at the last step; 0 = only then)")
    val_select: str = _field("test_steps", "what ranks validations for the kept weights: test_steps (accuracy after "
                                           "--test_inner_steps steps) | any_steps (the best after any of "
                                           f"{', '.join(map(str, STEP_COUNTS))} steps up to --test_inner_steps, from "
                                           "one pass; for runs whose test protocol is chosen afterwards)")
    test_episodes: int = _field(200, "fixed test-split episodes scored at the end with the best weights (0 = skip; paper: 1000)")
    zero_stage: int = _field(0, "0 = DDP; 1 or 2 = DeepSpeed ZeRO stage (launch with `accelerate launch --use_deepspeed`)")
    dist_timeout: float = _field(300.0, "seconds a collective waits for a dead or hung rank before the run fails")
    on_nonfinite: str = _field("stop", "non-finite loss or meta-gradient on any rank: stop (error naming step and rank; "
                                       "the last good checkpoint is kept) | skip_step (skip that update, count it)")
    # Trackers, the run record and profiling (docs/cluster.md)
    log_with: str = _field("tensorboard", "trackers, comma-separated: any of tensorboard, wandb, mlflow ('' = none)")
    project: str = _field("dist_signmaml", "wandb project and MLflow experiment of the run (the run is named after --out)")
    profile_steps: str = _field("", "A:B = record a torch.profiler trace of meta-steps A to B on every rank into "
                                    "OUT/profile ('' = off)")
    # Object storage (docs/data.md)
    cache_dir: str = _field("", "with --data on object storage: keep verified copies of the shards here ('' = stream each read)")
    cache_gb: float = _field(0.0, "size bound of --cache_dir in GB; least recently used shards go first (0 = no bound)")

    def __post_init__(self):
        if self.inner_lr == 0.0 and self.algo in DEFAULT_INNER_LR:
            self.inner_lr = DEFAULT_INNER_LR[self.algo]
        self.log_with = normalize_log_with(self.log_with)
        self.profile_steps = normalize_profile_steps(self.profile_steps)

    @classmethod
    def from_options(cls, **options) -> "TrainConfig":
        """The config of the flags in `options`; `config=FILE` (--config) reads a YAML/TOML file first, and the
        other flags override its values."""
        from dist_signmaml.config_files import CONFIG_FLAG, blame_config_file, read_config_file

        config_file = options.pop(CONFIG_FLAG, None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join('--' + u for u in unknown)}; known: {', '.join(sorted(known))}")
        from_file = read_config_file(config_file, cls) if config_file else {}
        with blame_config_file(config_file, set(from_file) - set(options)):
            config = cls(**(from_file | options))
            config.validate()
        # Every option as given (defaults included, before 0 = "auto" is resolved), for config.json; not a field.
        config.given_options = {f.name: (from_file | options).get(f.name, f.default) for f in fields(cls)}
        return config

    def validate(self) -> None:
        """Checks that need no data. Data-dependent checks (ways vs classes) run when the split index is read."""
        from dist_signmaml.models import BACKBONES

        def need(ok: bool, flag: str, allowed: str):
            if not ok:
                raise ConfigError(f"--{flag}={getattr(self, flag)!r} is invalid: expected {allowed}")

        for flag in ("ways", "shots", "queries", "inner_steps", "test_inner_steps", "steps",
                     "log_every", "ckpt_every", "keep_checkpoints", "window_shards"):
            need(isinstance(getattr(self, flag), int) and not isinstance(getattr(self, flag), bool)
                 and getattr(self, flag) > 0, flag, "a positive integer")
        need(self.ways >= 2, "ways", "at least 2 classes per task")
        need(self.algo in ALGORITHMS, "algo", f"one of {', '.join(ALGORITHMS)}")  # before inner_lr: it sets its default
        for flag in ("inner_lr", "outer_lr", "inner_lr_lr"):  # 1e400 parses as inf: overflowing rates are refused too
            value = getattr(self, flag)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                 and 0 < value < 1e6, flag, "a finite positive number below 1e6")
        need(isinstance(self.meta_grad_clip, (int, float)) and not isinstance(self.meta_grad_clip, bool)
             and math.isfinite(self.meta_grad_clip) and self.meta_grad_clip >= 0, "meta_grad_clip",
             "a finite number >= 0 (0 = no clipping)")
        need(self.outer_lr_schedule in OUTER_LR_SCHEDULES, "outer_lr_schedule", f"one of {', '.join(OUTER_LR_SCHEDULES)}")
        need(self.learn_inner_lr in LEARNED_STEP_SIZES, "learn_inner_lr", f"one of {', '.join(LEARNED_STEP_SIZES)}")
        need(isinstance(self.multi_step_loss, bool), "multi_step_loss", "True or False")
        need(0 <= self.inner_momentum < 1, "inner_momentum", "a number in [0, 1)")
        need(self.backbone in BACKBONES, "backbone", f"one of {', '.join(sorted(BACKBONES))}")
        need(self.task_parallel in TASK_PARALLEL_MODES, "task_parallel", f"one of {', '.join(TASK_PARALLEL_MODES)}")
        need(isinstance(self.schedule_steps, int) and (self.schedule_steps == 0 or self.schedule_steps >= self.steps),
             "schedule_steps", f"0 (= --steps) or an integer >= --steps ({self.steps})")
        for flag in ("hidden", "workers", "eval_episodes", "eval_every", "test_episodes", "seed", "meta_batch"):
            need(isinstance(getattr(self, flag), int) and getattr(self, flag) >= 0, flag, "an integer >= 0")
        need(isinstance(self.resume, bool) or self.resume == "must", "resume", "True, False or must")
        need(isinstance(self.overwrite, bool), "overwrite", "True or False")
        need(not (self.overwrite and self.resume), "overwrite", "False with --resume (resume keeps the run, "
             "--overwrite deletes it)")
        need(self.on_nonfinite in NONFINITE_POLICIES, "on_nonfinite", " or ".join(NONFINITE_POLICIES))
        need(self.val_select in VAL_SELECTS, "val_select", " or ".join(VAL_SELECTS))
        need(self.cpu_affinity in ("auto", "none"), "cpu_affinity", "auto or none")
        need(isinstance(self.out, str) and self.out.strip() != "", "out", "a run directory path")
        need(self.class_sampling in ("balanced", "proportional"), "class_sampling", "balanced or proportional")
        need(self.on_bad_sample in ("error", "skip"), "on_bad_sample", "error or skip")
        need(self.zero_stage in (0, 1, 2), "zero_stage", "0 (DDP), 1 or 2; ZeRO-3 partitions the parameters, which "
             "the functional inner loop needs whole")
        need(isinstance(self.dist_timeout, (int, float)) and self.dist_timeout > 0, "dist_timeout", "a positive number of seconds")
        need(isinstance(self.cache_dir, str), "cache_dir", "'' or a local folder")
        need(isinstance(self.cache_gb, (int, float)) and not isinstance(self.cache_gb, bool) and self.cache_gb >= 0
             and math.isfinite(self.cache_gb), "cache_gb", "a number of GB >= 0")
        self._validate_cluster_options()
        self._validate_backbone_options(need)

    def _validate_backbone_options(self, need) -> None:
        from dist_signmaml.models import check_adapt_spec
        from dist_signmaml.models.blocks import PRECISIONS
        from dist_signmaml.models.registry import FIXED_WIDTH
        from dist_signmaml.models.torchvision_resnet import STEMS

        need(not (self.hidden and self.backbone in FIXED_WIDTH), "hidden", f"0 with --backbone {self.backbone} "
             "(torchvision's widths are fixed)")
        need(self.stem in STEMS, "stem", f"one of {', '.join(STEMS)}")
        need(isinstance(self.weights, str), "weights", "'' or the path of a local file")  # read (and checked) by train
        try:
            check_adapt_spec(self.adapt)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        for flag in ("compile", "activation_checkpointing"):
            need(isinstance(getattr(self, flag), bool), flag, "True or False")
        if isinstance(self.channels_last, str) and self.channels_last.lower() in ("true", "false"):
            self.channels_last = self.channels_last.lower() == "true"  # the CLI passes lower-case words as text
        need(self.channels_last in (True, False, "auto"), "channels_last", "true, false or auto")
        need(isinstance(self.compile_backend, str) and self.compile_backend, "compile_backend", "a torch.compile backend name")
        need(not (self.activation_checkpointing and self.task_parallel == "vmap"), "task_parallel",
             "loop or auto with --activation_checkpointing (checkpointing needs plain autograd, which vmap is not)")

    @property
    def schedule_span(self) -> int:
        """The meta-steps the outer learning-rate schedule and the multi-step loss's annealing run over."""
        return self.schedule_steps or self.steps

    def resume_differences(self, saved: dict, step: int | None = None) -> list[str]:
        """`--flag: saved -> now` for every option that differs from a checkpoint's config and may not change on
        resume (anything outside MAY_CHANGE_ON_RESUME alters the model, the data order or the algorithm), and a
        change of the schedules' span where it would change the steps still to come (`step`: the checkpoint's)."""
        differences = []
        for f in fields(self):
            if f.name in MAY_CHANGE_ON_RESUME:
                continue
            now = getattr(self, f.name)
            before = saved.get(f.name, f.default)  # a checkpoint written before an option existed ran its default
            if before != now:
                differences.append(f"--{f.name}: {before!r} -> {now!r}")
        span_before = saved.get("schedule_steps") or saved.get("steps", self.steps)
        if span_before == self.schedule_span:
            return differences
        keep = f"give --schedule_steps={span_before} to keep it"
        changed = (f"--steps: {saved['steps']!r} -> {self.steps!r}" if saved.get("steps", self.steps) != self.steps
                   else f"--schedule_steps: {saved.get('schedule_steps', 0)!r} -> {self.schedule_steps!r}")
        if self.outer_lr_schedule != "constant":
            # the rate is a function of the step and the span: a longer span would jump back to a higher rate
            differences.append(f"{changed} (the {self.outer_lr_schedule} outer learning-rate schedule spans "
                               f"{span_before} meta-steps, now {self.schedule_span}; {keep})")
        elif self.multi_step_loss and not (step is not None and all(
                multi_step_anneal((step + 1) / span) == 1.0 for span in (span_before, self.schedule_span))):
            # inside the annealing window the weights would jump; past it both spans give the final weights
            differences.append(f"{changed} (the multi-step loss anneals its weights over the first "
                               f"{MULTI_STEP_ANNEAL_FRACTION:.0%} of {span_before} meta-steps, now of "
                               f"{self.schedule_span}, and step {step} is inside that; {keep})")
        return differences

    def _validate_cluster_options(self) -> None:
        try:
            check_log_with(self.log_with)
            parse_profile_steps(self.profile_steps, self.steps)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if not (isinstance(self.project, str) and self.project):
            raise ConfigError(f"--project={self.project!r} is invalid: expected a non-empty name")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @staticmethod
    def help_lines() -> str:
        return "\n".join(f"  --{f.name}  {f.metadata['help']} (default: {f.default!r})" for f in fields(TrainConfig))
