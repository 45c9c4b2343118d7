"""slurm/: the submitit submission (fake sbatch, LocalExecutor) and the sbatch template.

No cluster: ``sbatch``, ``srun`` and ``scontrol`` are small scripts on PATH that record what
they were asked to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

pytestmark = pytest.mark.timeout(240)  # tests here start processes: a hang must fail, not stall

REPO = Path(__file__).resolve().parent.parent
SBATCH_TEMPLATE = REPO / "slurm" / "train.sbatch"
sys.path.insert(0, str(REPO / "launch"))
sys.path.insert(0, str(REPO / "slurm"))

import submit  # noqa: E402  (slurm/submit.py)
import train  # noqa: E402  (launch/train.py)

TINY = ["--seq-len", "64", "--batch-size", "2", "--dim", "32", "--layers", "2", "--heads", "2",
        "--kv-heads", "1", "--recall-pairs", "4", "--log-every", "1", "--ckpt-every", "0", "--no-plot"]


def fake_bin(tmp_path: Path, **scripts: str) -> dict:
    """A bin/ of executable scripts ``name -> body`` and an environment with it first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


# Records its arguments, one per line, then does nothing.
RECORD_ARGS = 'printf "%s\\n" "$@" > "{path}"\n'


# -- submitit ---------------------------------------------------------------------------------


def test_submit_writes_a_requeueable_job_script(tmp_path):
    record = tmp_path / "sbatch"
    env = fake_bin(
        tmp_path,
        sbatch=f'echo "$@" > {record}.args\ncp "${{@: -1}}" {record}.script\necho "Submitted batch job 123"\n',
        srun="exit 0\n",
    )
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "slurm" / "submit.py"), "--nodes", "2", "--gpus-per-node", "4",
           "--partition", "gpu", "--account", "proj", "--time", "90", "--signal-delay", "120",
           "--cpus-per-task", "12", "--", "--out", str(out), "--cp-size", "4", "--seq-len", "131072"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "submitted job 123" in proc.stdout

    script = (tmp_path / "sbatch.script").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, flags=re.M))
    assert sbatch["nodes"] == "2"
    assert sbatch["ntasks-per-node"] == "4"  # one task (rank) per GPU
    assert sbatch["gpus-per-node"] == "4"
    assert sbatch["partition"] == "gpu" and sbatch["account"] == "proj"
    assert sbatch["time"] == "90"
    assert "requeue" in sbatch  # node failures and preemptions requeue too
    assert sbatch["signal"] == "USR2@120"  # the time-limit warning that makes the job checkpoint
    assert sbatch["cpus-per-task"] == "12"
    (srun,) = re.findall(r"^srun .*submitit.*$", script, flags=re.M)
    # and to srun itself: Slurm 22.05-23.02's srun does not take the job's --cpus-per-task
    srun_argv = shlex.split(srun)
    assert srun_argv[srun_argv.index("--cpus-per-task") + 1] == "12"

    # The submitted callable: launch/train.py's flags, always resuming from OUT/ckpt.
    (pickle,) = (out / "submitit").glob("123_submitted.pkl")
    trainer = submitit.helpers.DelayedSubmission.load(pickle).function
    cfg = train.parse_args(trainer.train_args)
    assert cfg.resume and cfg.cp_size == 4 and cfg.seq_len == 131072 and cfg.out == str(out)
    requeued = trainer.checkpoint()
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert train.parse_args(requeued.function.train_args).resume


def test_submit_cpu_nodes(tmp_path):
    """--gpus-per-node 0: --tasks-per-node ranks per node, no GPU asked for, the training on the
    CPU; the config is checked for the job's world of nodes x tasks."""
    record = tmp_path / "sbatch"
    env = fake_bin(tmp_path, sbatch=f'cp "${{@: -1}}" {record}.script\necho "Submitted batch job 77"\n',
                   srun="exit 0\n")
    out = tmp_path / "run"
    submit_py = [sys.executable, str(REPO / "slurm" / "submit.py"), "--nodes", "2", "--gpus-per-node", "0",
                 "--tasks-per-node", "3", "--cpus-per-task", "2"]
    proc = subprocess.run([*submit_py, "--", "--out", str(out), "--cp-size", "4"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--cp-size 4 does not divide the world size 6" in proc.stderr, proc.stderr
    proc = subprocess.run([*submit_py, "--", "--out", str(out), "--cp-size", "3", "--seq-len", "96"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "submitted job 77: 2 node(s) x 3 CPU tasks" in proc.stdout
    script = (tmp_path / "sbatch.script").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, flags=re.M))
    assert sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "3" and sbatch["cpus-per-task"] == "2"
    assert not any("gpu" in key for key in sbatch) and "gres" not in sbatch
    trainer = submitit.helpers.DelayedSubmission.load(out / "submitit" / "77_submitted.pkl").function
    cfg = train.parse_args(trainer.train_args)
    assert cfg.device == "cpu" and cfg.resume and cfg.cp_size == 3
    assert train.config_problems(cfg, 6) == []  # gloo and the reference attention, resolved


def test_submit_refuses_a_bad_config_before_submitting(tmp_path):
    env = fake_bin(tmp_path, sbatch=f"touch {tmp_path}/called\n", srun="exit 0\n")
    cmd = [sys.executable, str(REPO / "slurm" / "submit.py"), "--nodes", "1", "--gpus-per-node", "4",
           "--", "--out", str(tmp_path / "run"), "--cp-size", "3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--cp-size 3 does not divide the world size 4" in proc.stderr
    assert not (tmp_path / "called").exists()


def test_submit_refuses_a_resume_conflict_before_submitting(tmp_path):
    """The job always resumes: settings that clash with OUT/ckpt fail the submission, not the job."""
    out = tmp_path / "run"
    (out / "ckpt").mkdir(parents=True)
    saved = train.parse_args(["--out", str(out), "--dim", "128"])
    (out / "ckpt" / "meta.json").write_text(json.dumps({"step": 100, "config": dataclasses.asdict(saved)}))
    env = fake_bin(tmp_path, sbatch=f'touch {tmp_path}/called\necho "Submitted batch job 7"\n', srun="exit 0\n")
    submit_py = [sys.executable, str(REPO / "slurm" / "submit.py"), "--nodes", "1", "--gpus-per-node", "2"]
    proc = subprocess.run([*submit_py, "--", "--out", str(out), "--dim", "256"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"submit.py: error: --resume from {out / 'ckpt'}" in proc.stderr
    assert "--dim 128 -> 256" in proc.stderr and "another --out" in proc.stderr
    assert not (tmp_path / "called").exists()
    # The checkpoint's own settings (a resubmitted run) go through.
    proc = subprocess.run([*submit_py, "--", "--out", str(out), "--dim", "128"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "called").exists()


@pytest.mark.parametrize("flags,message", [
    (["--nodes", "0"], "--nodes must be at least 1"),  # was a traceback, after sbatch had run
    (["--gpus-per-node", "-1"], "--gpus-per-node cannot be negative"),
    (["--tasks-per-node", "2"], "--tasks-per-node 2 with --gpus-per-node 8: with GPUs each task is the rank of one"),
    (["--gpus-per-node", "0", "--tasks-per-node", "-1"], "--tasks-per-node cannot be negative"),
    (["--max-requeues", "-1"], "--max-requeues cannot be negative"),
    (["--time", "2", "--signal-delay", "120"], "--signal-delay 120 s does not fit in a --time 2 min"),
    (["--local", "--tasks", "0"], "--tasks must be at least 1"),
])
def test_submit_refuses_bad_own_flags_before_submitting(tmp_path, monkeypatch, capsys, flags, message):
    """A job that cannot run, or one whose time-limit signal would come at its start (it would
    checkpoint and requeue at once, every allocation), is refused before anything is submitted."""
    env = fake_bin(tmp_path, sbatch=f'touch {tmp_path}/called\necho "Submitted batch job 7"\n', srun="exit 0\n")
    monkeypatch.setenv("PATH", env["PATH"])
    assert submit.main([*flags, "--", "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    assert f"submit.py: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "called").exists()


def test_submit_passes_sparsity_and_checks_it_before_submitting(tmp_path, monkeypatch, capsys):
    """--sparsity reaches launch/train.py in the job; a spec that cannot run is refused on the
    submission host. The job spans 2 nodes, where --ulysses-size 0 takes a node's ranks, with
    --sparsity too."""
    env = fake_bin(tmp_path, sbatch=f'touch {tmp_path}/called\necho "Submitted batch job 9"\n', srun="exit 0\n")
    monkeypatch.setenv("PATH", env["PATH"])
    out = tmp_path / "run"
    submit_py = ["--nodes", "2", "--gpus-per-node", "4", "--"]
    spec = "block:size=1024,local=4,global=1"
    assert submit.main([*submit_py, "--out", str(out), "--seq-len", "131072", "--sparsity", spec]) == 0
    trainer = submitit.helpers.DelayedSubmission.load(out / "submitit" / "9_submitted.pkl").function
    cfg = train.parse_args(trainer.train_args)
    assert cfg.sparsity == spec and cfg.resume and cfg.seq_len == 131072
    assert train.resolve_ulysses(cfg.resolved(), 8, 4).ulysses_size == 4
    assert train.parse_args(trainer.checkpoint().function.train_args).sparsity == spec  # a requeued job too
    (tmp_path / "called").unlink()
    capsys.readouterr()
    for args, message in [
        (["--sparsity", "hash:0"], "--sparsity 'hash:0': hash:BUCKETS needs a bucket count >= 1"),
        (["--seq-len", "1000", "--sparsity", "block:size=64"], "--seq-len 1000 is not a multiple of its block size 64"),
        (["--sparsity", "hash:8", "--backend", "cudnn", "--dtype", "bfloat16"], "--sparsity hash:8 needs --backend triton"),
    ]:
        assert submit.main([*submit_py, "--out", str(out), *args]) == 2, args
        assert "submit.py: error: " in (err := capsys.readouterr().err) and message in err, err
        assert not (tmp_path / "called").exists()


def test_resubmitting_with_a_relative_data_path_resumes(tmp_path, monkeypatch):
    """The job gets --data as an absolute path; the same command submitted again (a relative
    path) must resume from its checkpoint, not be refused as a change of data."""
    env = fake_bin(tmp_path, sbatch='echo "Submitted batch job 7"\n', srun="exit 0\n")
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_bytes(bytes(range(256)) * 2)
    argv = ["--nodes", "1", "--gpus-per-node", "2", "--", "--out", "run", "--data", "text.txt"]
    assert submit.main(argv) == 0
    # The checkpoint that job writes: its config, as launch/train.py saves it.
    trainer = submitit.helpers.DelayedSubmission.load(tmp_path / "run" / "submitit" / "7_submitted.pkl").function
    saved = train.parse_args(trainer.train_args).resolved()
    assert saved.data == str(tmp_path / "text.txt")
    (tmp_path / "run" / "ckpt").mkdir()
    (tmp_path / "run" / "ckpt" / "meta.json").write_text(json.dumps({"step": 5, "config": dataclasses.asdict(saved)}))
    assert submit.main(argv) == 0


def test_local_keeps_the_users_device(tmp_path, monkeypatch):
    """--local adds --device cpu only where the flags do not choose a device (--device=cuda too)."""
    from types import SimpleNamespace

    submitted = []

    class FakeExecutor:  # submitit.LocalExecutor, without starting the job
        def __init__(self, folder):
            pass

        def update_parameters(self, **kwargs):
            pass

        def submit(self, fn):
            submitted.append(fn)
            return SimpleNamespace(job_id="1", results=lambda: [])

    monkeypatch.setattr(submitit, "LocalExecutor", FakeExecutor)
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train.torch.cuda, "device_count", lambda: 2)
    for flags, device in (([], "cpu"), (["--device=cuda"], "cuda"), (["--device", "cuda"], "cuda")):
        assert submit.main(["--local", "--", *flags, "--out", str(tmp_path)]) == 0
        assert train.parse_args(submitted.pop().train_args).device == device, flags


def test_submitit_local_executor_runs_two_tasks(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "slurm" / "submit.py"), "--local", "--tasks", "2",
           "--", *TINY, "--steps", "4", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [eval(line) for line in proc.stdout.splitlines() if line.startswith("{")]  # noqa: S307
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["finished"] and r["step"] == 4 for r in results)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_tasks_keep_the_gpus_slurm_shows_them(monkeypatch):
    """A task keeps the CUDA_VISIBLE_DEVICES Slurm gave it (submitit's default would replace it
    with the local rank: the wrong GPU where the job's GPUs are numbered physically)."""
    from types import SimpleNamespace

    asked = {}

    class FakeEnvironment:  # submitit.helpers.TorchDistributedEnvironment, as submitit's export acts
        rank, world_size, local_rank = 0, 1, 2

        def export(self, set_cuda_visible_devices=True, overwrite=False):
            asked.update(set_cuda_visible_devices=set_cuda_visible_devices, overwrite=overwrite)
            if set_cuda_visible_devices:
                os.environ["CUDA_VISIBLE_DEVICES"] = str(self.local_rank)
            return self

    trained = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", FakeEnvironment)
    monkeypatch.setattr(submit._import_train(), "train", lambda cfg: trained.append(
        os.environ["CUDA_VISIBLE_DEVICES"]) or SimpleNamespace(stop_signal=None, step=0, finished=True, last_loss=None))
    result = submit.Trainer(["--out", "/tmp/x", "--steps", "1"])()
    assert trained == ["4,5,6,7"] and asked == {"set_cuda_visible_devices": False, "overwrite": True}
    assert result["rank"] == 0 and result["finished"]


def test_tasks_rendezvous_on_a_port_of_their_job(monkeypatch):
    """MASTER_PORT: 20000 + the Slurm job id mod 12000, below Linux's ephemeral ports (as
    train.sbatch's rendezvous), whatever the submitting shell had set; submitit's own draw
    without a Slurm job (--local)."""
    from types import SimpleNamespace

    ports = []
    monkeypatch.setattr(submit._import_train(), "train", lambda cfg: SimpleNamespace(
        stop_signal=None, step=0, finished=True, last_loss=None))

    class FakeEnvironment:  # reads MASTER_PORT as submitit's does
        rank, world_size, local_rank = 0, 1, 0

        def export(self, set_cuda_visible_devices=True, overwrite=False):
            ports.append(os.environ.get("MASTER_PORT"))
            return self

    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", FakeEnvironment)
    monkeypatch.setenv("MASTER_PORT", "29500")
    for job_id, port in (("4242", "24242"), ("12345", "20345")):
        monkeypatch.setenv("SLURM_JOB_ID", job_id)
        submit.Trainer(["--out", "/tmp/x", "--steps", "1"])()
        assert ports.pop() == port
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("MASTER_PORT")
    submit.Trainer(["--out", "/tmp/x", "--steps", "1"])()
    assert ports.pop() is None


def _fake_task_env(monkeypatch, rank=0):
    """submitit's torch environment, as submitit's export sets it, without a job."""

    class FakeEnvironment:
        world_size, local_rank = 2, rank

        def __init__(self):
            self.rank = rank

        def export(self, set_cuda_visible_devices=True, overwrite=False):
            return self

    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", FakeEnvironment)


def test_tasks_train_with_the_cpus_slurm_gave_them(monkeypatch):
    """A task runs SLURM_CPUS_PER_TASK threads unless OMP_NUM_THREADS is set."""
    from types import SimpleNamespace

    _fake_task_env(monkeypatch)
    train_module = submit._import_train()
    monkeypatch.setattr(train_module, "train", lambda cfg: SimpleNamespace(
        stop_signal=None, step=1, finished=True, last_loss=None))
    threads = []
    monkeypatch.setattr(train_module.torch, "set_num_threads", threads.append)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    submit.Trainer(["--out", "/tmp/x", "--steps", "1"])()
    assert threads == [3] and os.environ["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    submit.Trainer(["--out", "/tmp/x", "--steps", "1"])()
    assert threads == [3] and os.environ["OMP_NUM_THREADS"] == "5"


def test_a_time_limit_past_max_requeues_fails_the_job_with_a_message(monkeypatch, capsys):
    """After --max-requeues, submitit's handler refuses to requeue: rank 0 says so (the
    checkpoint is kept) and the job fails."""
    from types import SimpleNamespace

    _fake_task_env(monkeypatch)
    monkeypatch.setattr(submit._import_train(), "train", lambda cfg: SimpleNamespace(
        stop_signal=signal.SIGUSR2, step=40, finished=False, last_loss=2.0))

    def refuse(signum, frame):  # what submitit's checkpoint_and_try_requeue does past its countdown
        raise submitit.core.utils.UncompletedJobError("Job not requeued because: timed-out too many times.")

    previous = signal.signal(signal.SIGUSR2, refuse)
    try:
        with pytest.raises(submitit.core.utils.UncompletedJobError):
            submit.Trainer(["--out", "/tmp/x", "--steps", "100"])()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    err = capsys.readouterr().err
    assert "submit.py: job not requeued: the time limit came again after --max-requeues requeues" in err
    assert "the checkpoint of step 40 is in /tmp/x/ckpt" in err


# -- the sbatch template ----------------------------------------------------------------------


def test_sbatch_template_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH_TEMPLATE)], check=True, timeout=30)


def test_sbatch_template_settings():
    lines = SBATCH_TEMPLATE.read_text().splitlines()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", "\n".join(lines), flags=re.M))
    assert sbatch["ntasks-per-node"] == "1"  # one torchrun per node
    assert "requeue" in sbatch
    assert sbatch["signal"].startswith("B:USR2@")  # to the batch script, which forwards it


def _run_template(tmp_path, srun_body: str, *train_args: str, **slurm_env: str):
    """The template under fake Slurm commands, on 2 nodes of 4 GPUs unless ``slurm_env`` says
    otherwise (a value of None unsets the variable)."""
    env = fake_bin(
        tmp_path,
        srun=srun_body,
        scontrol=(f'if [ "$1" = show ]; then printf "node07\\nnode08\\n"; '
                  f'else echo "$@" >> {tmp_path}/scontrol.log; fi\n'),
        # Records its arguments, then signals the (fake) tasks: srun, here.
        scancel=f'echo "$@" >> {tmp_path}/scancel.log\nkill -TERM "$(cat {tmp_path}/srun.pid)"\n',
    )
    for name in ("SLURM_CPUS_PER_TASK", "SRUN_CPUS_PER_TASK", "SLURM_NTASKS_PER_NODE", "SLURM_RESTART_COUNT",
                 "OMP_NUM_THREADS"):
        env.pop(name, None)
    env.update(SLURM_JOB_NODELIST="node[07-08]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
               SLURM_GPUS_ON_NODE="4", SLURM_NTASKS_PER_NODE="1")
    for name, value in slurm_env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.Popen(["bash", str(SBATCH_TEMPLATE), *train_args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Records its arguments, and the SRUN_CPUS_PER_TASK and OMP_NUM_THREADS it was started with.
RECORD_ARGS_AND_CPUS = (RECORD_ARGS + 'echo "${{SRUN_CPUS_PER_TASK-unset}}" > "{path}.cpus"\n'
                        'echo "${{OMP_NUM_THREADS-unset}}" > "{path}.threads"\n')


def _torchrun_line(path: Path):
    """srun's own flags, and torchrun's arguments parsed by torchrun's parser, from a recorded srun line."""
    from torch.distributed.run import get_args_parser

    argv = path.read_text().splitlines()
    i = argv.index("torchrun")
    return argv[:i], get_args_parser().parse_args(argv[i + 1:])


def test_sbatch_template_torchrun_line(tmp_path):
    proc = _run_template(tmp_path, RECORD_ARGS_AND_CPUS.format(path=tmp_path / "srun.args"),
                         "--out", "runs/x", "--cp-size", "4", "--seq-len", "131072", SLURM_CPUS_PER_TASK="64")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    # Slurm 22.05-23.02's srun takes the job's --cpus-per-task only from SRUN_CPUS_PER_TASK.
    assert (tmp_path / "srun.args.cpus").read_text().strip() == "64"
    srun_flags, args = _torchrun_line(tmp_path / "srun.args")
    # One torchrun per node, whatever the job's task count; a failed node ends the step.
    assert set(srun_flags) == {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"}
    assert args.nnodes == "2"
    assert args.nproc_per_node == "4"  # a rank per GPU
    assert args.rdzv_backend == "c10d"
    assert args.rdzv_endpoint == f"node07:{20000 + 4242 % 12000}"  # the first node, a port of the job's own
    assert args.rdzv_id == "4242"
    assert args.training_script == "launch/train.py"
    cfg = train.parse_args(args.training_script_args)
    assert cfg.resume and cfg.cp_size == 4 and cfg.seq_len == 131072 and cfg.out == "runs/x"
    assert train.config_problems(cfg, 8, hardware=False) == []


def test_sbatch_template_passes_sparsity(tmp_path):
    proc = _run_template(tmp_path, RECORD_ARGS.format(path=tmp_path / "srun.args"), "--out", "runs/x",
                         "--sparsity", "qkdrop:0.25", "--max-requeues", "3")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    _, args = _torchrun_line(tmp_path / "srun.args")
    cfg = train.parse_args(args.training_script_args)
    assert cfg.sparsity == "qkdrop:0.25" and cfg.resume


def test_sbatch_template_without_cpus_per_task(tmp_path):
    """A job without --cpus-per-task (SLURM_CPUS_PER_TASK unset) leaves srun's default alone."""
    proc = _run_template(tmp_path, RECORD_ARGS_AND_CPUS.format(path=tmp_path / "srun.args"), "--out", "runs/x")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr  # set -u: the unset variable is not an error
    assert (tmp_path / "srun.args.cpus").read_text().strip() == "unset"


def test_sbatch_template_on_cpu_nodes(tmp_path):
    """Without GPUs: a rank per task, torchrun holding the CPUs of the node's tasks, a thread per
    CPU of a task, the training on the CPU unless the arguments name a device."""
    proc = _run_template(tmp_path, RECORD_ARGS_AND_CPUS.format(path=tmp_path / "srun.args"), "--out", "runs/x",
                         "--cp-size", "3", "--seq-len", "96", SLURM_GPUS_ON_NODE=None, SLURM_NTASKS_PER_NODE="3",
                         SLURM_CPUS_PER_TASK="2")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert (tmp_path / "srun.args.cpus").read_text().strip() == "6"  # 3 tasks x 2 CPUs, for one torchrun
    assert (tmp_path / "srun.args.threads").read_text().strip() == "2"
    srun_flags, args = _torchrun_line(tmp_path / "srun.args")
    assert "--ntasks-per-node=1" in srun_flags
    assert args.nnodes == "2" and args.nproc_per_node == "3"
    cfg = train.parse_args(args.training_script_args)
    assert cfg.device == "cpu" and cfg.resume and cfg.cp_size == 3
    assert train.config_problems(cfg.resolved(), 6) == []

    proc = _run_template(tmp_path, RECORD_ARGS_AND_CPUS.format(path=tmp_path / "srun.args"), "--out", "runs/x",
                         "--device", "cuda", SLURM_GPUS_ON_NODE="0", SLURM_NTASKS_PER_NODE="2")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert (tmp_path / "srun.args.cpus").read_text().strip() == "2"  # 1 CPU per task without --cpus-per-task
    assert (tmp_path / "srun.args.threads").read_text().strip() == "1"
    _, args = _torchrun_line(tmp_path / "srun.args")
    assert args.nproc_per_node == "2" and train.parse_args(args.training_script_args).device == "cuda"


def test_sbatch_template_refuses_tasks_next_to_gpus(tmp_path):
    proc = _run_template(tmp_path, f"touch {tmp_path}/srun.called\n", "--out", "runs/x", SLURM_NTASKS_PER_NODE="4")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "with GPUs, one task per node" in stderr and "--ntasks-per-node=4" in stderr
    assert not (tmp_path / "srun.called").exists()


def test_sbatch_template_takes_max_requeues(tmp_path):
    """--max-requeues is the template's own: it never reaches launch/train.py, and takes a count."""
    proc = _run_template(tmp_path, RECORD_ARGS.format(path=tmp_path / "srun.args"), "--max-requeues", "3",
                         "--out", "runs/x", "--max-requeues=4", "--steps", "9")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    _, args = _torchrun_line(tmp_path / "srun.args")
    assert "--max-requeues" not in " ".join(args.training_script_args)
    assert train.parse_args(args.training_script_args).steps == 9
    proc = _run_template(tmp_path, f"touch {tmp_path}/srun.called\n", "--out", "runs/x", "--max-requeues", "x")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--max-requeues takes a count; got 'x'" in stderr
    assert not (tmp_path / "srun.called").exists()


def _usr2_during_srun(tmp_path, *train_args, **slurm_env):
    """Run the template, send it SIGUSR2 once srun runs; (returncode, stderr, the signal srun got)."""
    # srun stands in for the ranks: it waits, and records the SIGTERM that scancel sends it.
    started, got = tmp_path / "srun.started", tmp_path / "srun.signal"
    srun = (f"trap 'echo TERM > {got}; exit 0' TERM\necho $$ > {tmp_path}/srun.pid\ntouch {started}\n"
            "for i in $(seq 300); do sleep 0.1; done\n")
    proc = _run_template(tmp_path, srun, *train_args, **slurm_env)
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)  # Slurm's warning before the time limit
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr, got.read_text().strip() if got.exists() else None


def test_sbatch_template_checkpoints_and_requeues_on_usr2(tmp_path):
    returncode, stderr, got = _usr2_during_srun(tmp_path, "--out", "runs/x")
    assert returncode == 0, stderr
    # SIGTERM to the job's tasks through Slurm (srun itself would kill them on a SIGTERM).
    assert (tmp_path / "scancel.log").read_text().split() == ["--signal=TERM", "4242"]
    assert got == "TERM"
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


def test_sbatch_template_stops_requeueing_at_max_requeues(tmp_path):
    returncode, stderr, got = _usr2_during_srun(tmp_path, "--max-requeues", "2", "--out", "runs/x",
                                                SLURM_RESTART_COUNT="2")
    assert returncode == 1
    assert got == "TERM"  # the ranks still checkpoint
    assert "job 4242 not requeued: it was restarted 2 times (--max-requeues 2)" in stderr
    assert not (tmp_path / "scontrol.log").exists()


def test_checkpoint_resubmits_with_resume():
    trainer = submit.Trainer(["--out", "/tmp/x", "--steps", "10"])
    assert trainer.train_args.count("--resume") == 1
    again = trainer.checkpoint().function
    assert again.train_args == trainer.train_args
    resumed = train.parse_args(again.train_args)
    assert resumed.resume and resumed.out == "/tmp/x" and resumed.steps == 10
