"""Submit launch/train.py to Slurm with submitit: one task per GPU, requeued on timeout.

    # 2 nodes x 8 GPUs; everything after "--" goes to launch/train.py
    python slurm/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --account myproj --time 240 \
        -- --out runs/512k --cp-size 8 --seq-len 524288 --batch-size 1 --dim 1024 --layers 8 \
           --heads 16 --kv-heads 4 --steps 2000 --ckpt-every 100

    # CPU nodes: 2 tasks (ranks) per node on gloo with the reference attention, one core each
    python slurm/submit.py --gpus-per-node 0 --tasks-per-node 2 --cpus-per-task 1 --time 10 \
        --signal-delay 60 -- --out runs/cpu --steps 200

    # the same job on this machine, 2 CPU processes on gloo (submitit's LocalExecutor)
    python slurm/submit.py --local --tasks 2 -- --out runs/local --steps 50

Each task is one rank: ``submitit.helpers.TorchDistributedEnvironment().export()`` sets
MASTER_ADDR/PORT (port 20000 + the job id mod 12000), RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (leaving the GPUs that
Slurm shows the task as they are), then launch/train.py runs in the task's process on GPU
``LOCAL_RANK`` of those it sees (or its only one, where Slurm binds a GPU per task). The
training always runs with ``--resume``, so a requeued job (after a timeout, a preemption or a
node failure) continues from ``OUT/ckpt``; a new run needs a new ``--out``. Each rank runs
``SLURM_CPUS_PER_TASK`` threads (``--cpus-per-task``) unless OMP_NUM_THREADS is set.

``--gpus-per-node 0`` submits to CPU nodes: ``--tasks-per-node`` ranks per node, no GPU asked
for, and ``--device cpu`` (gloo, the reference attention) unless the training flags name a device.

Timeouts: Slurm sends SIGUSR2 ``--signal-delay`` seconds before the time limit
(``#SBATCH --signal=USR2@90``). launch/train.py finishes its step, checkpoints on every rank
and returns; then submitit's handler on rank 0 calls :meth:`Trainer.checkpoint` (the same job
with ``--resume``) and requeues the job (``scontrol requeue``), at most ``--max-requeues``
times: after that the job ends failed, its checkpoint kept (submit the same command again to
go on). SIGTERM (scancel, ``scontrol requeue``, preemption) also checkpoints before the
process exits; Slurm requeues a preempted job itself (``#SBATCH --requeue``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _import_train():
    """launch/train.py as a module (it is a script directory, not a package)."""
    for path in (str(REPO), str(REPO / "launch")):
        if path not in sys.path:
            sys.path.insert(0, path)
    import train  # noqa: PLC0415

    return train


class Trainer:
    """The submitted callable: runs launch/train.py in each task with submitit's torch env."""

    def __init__(self, train_args: list[str]):
        args = list(train_args)
        if "--resume" not in args:
            args.append("--resume")  # a requeued or restarted job continues from OUT/ckpt
        self.train_args = args

    def __call__(self) -> dict:
        import submitit

        # Keep the GPUs that Slurm shows the task (submitit would set CUDA_VISIBLE_DEVICES to the
        # local rank: the wrong GPU where Slurm numbers the job's GPUs physically, e.g. 4,5,6,7 on a
        # shared node, and no peers for the copy-engine transport to map). launch/train.py takes
        # GPU local_rank % device_count, right both where each task sees all of the node's GPUs of
        # the job and where Slurm binds one GPU per task.
        # The rendezvous port: the job's own (two jobs may share a first node), and below Linux's
        # ephemeral range (32768-60999), where another job's outgoing or gloo connection on the
        # node may already hold it; submitit would draw one in 20000-60000. train.sbatch uses
        # the same rule. (--local jobs have no Slurm job id and keep submitit's port.)
        job_id = os.environ.get("SLURM_JOB_ID", "")
        if job_id.isdigit():
            os.environ["MASTER_PORT"] = str(20000 + int(job_id) % 12000)
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # The CPUs Slurm gave the task, as the rank's threads (torch would take every core of the
        # node, as many times as there are ranks on it).
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        threads = int(cpus) if cpus and cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ else 0
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
        train = _import_train()
        if threads:
            train.torch.set_num_threads(threads)
        cfg = train.parse_args(self.train_args)
        # submitit's handler (checkpoint() + requeue) for the time-limit signal, installed
        # before this call; launch/train.py replaces it while it trains.
        requeue = signal.getsignal(signal.SIGUSR2)
        result = train.train(cfg)
        if result.stop_signal == signal.SIGUSR2 and env.rank == 0 and callable(requeue):
            # Every rank has checkpointed: now let submitit requeue the job (it exits here), or,
            # after --max-requeues requeues, end it failed.
            try:
                requeue(signal.SIGUSR2, None)
            except submitit.core.utils.UncompletedJobError as e:
                print(f"submit.py: job not requeued: the time limit came again after --max-requeues "
                      f"requeues ({e}); the checkpoint of step {result.step} is in {cfg.out}/ckpt: "
                      f"submit the same command again to continue", file=sys.stderr, flush=True)
                raise
        return {"rank": env.rank, "world_size": env.world_size, "step": result.step,
                "finished": result.finished, "loss": result.last_loss}

    def checkpoint(self, *args, **kwargs):
        """What submitit requeues on a timeout or preemption: this job, resuming from OUT/ckpt."""
        import submitit

        return submitit.helpers.DelayedSubmission(Trainer(self.train_args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Submit launch/train.py with submitit (flags after '--' go to launch/train.py).",
        usage="%(prog)s [options] -- [train.py flags]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node, one task (rank) per GPU; 0: CPU nodes (gloo, reference attention), "
                        "--tasks-per-node ranks per node")
    p.add_argument("--tasks-per-node", type=int, default=0,
                   help="tasks (ranks) per node; 0: one per GPU, or 1 with --gpus-per-node 0")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--account", default=None, help="Slurm account")
    p.add_argument("--qos", default=None, help="Slurm quality of service")
    p.add_argument("--constraint", default=None, help="Slurm node constraint (e.g. h100)")
    p.add_argument("--time", type=int, default=240, help="time limit of one allocation, in minutes")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task")
    p.add_argument("--mem-gb", type=int, default=0, help="memory per node in GB (0: the partition's default)")
    p.add_argument("--job-name", default="ringflash", help="Slurm job name")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SIGUSR2 asks the job to checkpoint")
    p.add_argument("--max-requeues", type=int, default=10, help="requeues after a timeout before giving up")
    p.add_argument("--setup", action="append", default=[],
                   help="a shell line to run before the tasks start (repeatable), e.g. 'source venv/bin/activate'")
    p.add_argument("--folder", default=None, help="submitit's logs and pickles (default: OUT/submitit)")
    p.add_argument("--local", action="store_true",
                   help="run here through submitit's LocalExecutor (CPU, gloo) instead of Slurm, and wait")
    p.add_argument("--tasks", type=int, default=2, help="with --local: processes (ranks) to start")
    return p


def own_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with submit.py's own flags (messages), before anything is submitted."""
    if args.local:
        return [] if args.tasks >= 1 else [f"--tasks must be at least 1; got {args.tasks}"]
    problems = [
        f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}"
        for name in ("nodes", "cpus_per_task", "signal_delay")
        if getattr(args, name) < 1
    ]
    problems += [
        f"--{name.replace('_', '-')} cannot be negative; got {getattr(args, name)}"
        for name in ("gpus_per_node", "time", "mem_gb", "max_requeues")
        if getattr(args, name) < 0
    ]
    if args.tasks_per_node < 0:
        problems.append(f"--tasks-per-node cannot be negative; got {args.tasks_per_node}")
    elif args.tasks_per_node and args.gpus_per_node > 0 and args.tasks_per_node != args.gpus_per_node:
        problems.append(
            f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: with GPUs "
            f"each task is the rank of one GPU; drop --tasks-per-node (or use --gpus-per-node 0 for CPU ranks)"
        )
    if args.time > 0 and args.signal_delay >= args.time * 60:
        problems.append(
            f"--signal-delay {args.signal_delay} s does not fit in a --time {args.time} min allocation: "
            f"the signal would come at its start, and every allocation would checkpoint and requeue at "
            f"once; lower --signal-delay or raise --time"
        )
    return problems


def tasks_per_node(args: argparse.Namespace) -> int:
    """Ranks per node: one per GPU, or --tasks-per-node (0: 1) on CPU nodes."""
    if args.gpus_per_node > 0:
        return args.gpus_per_node
    return args.tasks_per_node or 1


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _absolute(train_args: list[str], cfg) -> list[str]:
    """``--out`` and ``--data`` as absolute paths: the job may start in another directory."""
    out = ["--out", str(Path(cfg.out).resolve())]
    if cfg.data:
        out += ["--data", str(Path(cfg.data).resolve())]
    return train_args + out  # argparse keeps the last value of a repeated flag


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, train_args = _split_argv(argv)
    args = build_parser().parse_args(own)
    problems = own_problems(args)
    if problems:
        for p in problems:
            print(f"submit.py: error: {p}", file=sys.stderr)
        return 2
    train = _import_train()

    cpu_job = args.local or args.gpus_per_node == 0
    if cpu_job and train.parse_args(train_args).device == "auto":  # a --device of the user's, in any spelling, stays
        train_args = train_args + ["--device", "cpu"]
    world_size = args.tasks if args.local else args.nodes * tasks_per_node(args)
    cfg = train.parse_args(train_args)
    if not args.local and cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device="cuda")  # what the compute nodes get
    # The job always runs with --resume (Trainer), so check the config with it: a changed --dim
    # or --seq-len for an existing --out fails here, not once the job starts on the cluster.
    resumed = dataclasses.replace(cfg.resolved(), resume=True)
    # What the job's ranks will decide for --ulysses-size 0: the ranks of a node trade heads when a
    # sequence spans several nodes.
    resumed = train.resolve_ulysses(resumed, world_size, args.tasks if args.local else tasks_per_node(args))
    problems = train.config_problems(resumed, world_size, hardware=args.local)
    if problems:
        for p in problems:
            print(f"submit.py: error: {p}", file=sys.stderr)
        return 2
    train_args = _absolute(train_args, cfg)
    folder = Path(args.folder or Path(cfg.out) / "submitit").resolve()

    import submitit

    trainer = Trainer(train_args)
    if args.local:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(nodes=1, tasks_per_node=args.tasks, gpus_per_node=0, timeout_min=args.time)
        job = executor.submit(trainer)
        print(f"local job {job.job_id}: {args.tasks} tasks, logs in {folder}", file=sys.stderr)
        try:
            results = job.results()
        except Exception as e:  # noqa: BLE001 - show the task's error, not submitit's frames
            print(f"submit.py: the local job failed:\n{e}", file=sys.stderr)
            return 1
        for r in results:
            print(r)
        return 0

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_requeues)
    params = dict(
        job_name=args.job_name,
        nodes=args.nodes,
        ntasks_per_node=tasks_per_node(args),  # one task per GPU, or --tasks-per-node on CPU nodes
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        signal_delay_s=args.signal_delay,
        setup=args.setup,
        # Slurm 22.05-23.02's srun does not take the job's --cpus-per-task: pass it to the srun
        # that starts the tasks, or each task gets one core.
        srun_args=["--cpus-per-task", str(args.cpus_per_task)],
        # Requeue after a node failure or preemption too; submitit requeues on timeouts itself.
        additional_parameters={"requeue": True},
    )
    if args.gpus_per_node > 0:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    if args.mem_gb:
        params["mem"] = f"{args.mem_gb}G"
    executor.update_parameters(**params)
    job = executor.submit(trainer)
    n = tasks_per_node(args)
    per_node = f"{args.gpus_per_node} GPUs" if args.gpus_per_node else f"{n} CPU task{'s' * (n != 1)}"
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {per_node}, "
          f"training output in {cfg.out and Path(cfg.out).resolve()}, logs in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
