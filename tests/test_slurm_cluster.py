"""slurm/ against a running Slurm cluster: the launchers as users run them.

``slurm/local_cluster.sh`` starts a Slurm cluster on this machine (munged, slurmctld, and two
slurmds as two emulated nodes where the host allows it), and the training job goes through
``slurm/submit.py`` (submitit's SlurmExecutor) and ``sbatch slurm/train.sbatch`` on CPU ranks
(gloo, the reference attention). The jobs train on 2 tasks; they are requeued in mid-run
(``scontrol requeue``) and warned by Slurm itself before a short time limit (SIGUSR2), come
back and end with the losses of an uninterrupted run, bit for bit; requeues stop at
``--max-requeues``; a job whose training fails ends failed. After every test the queue is
empty and no process of a job is left; after the last one the daemons are gone too.

Needs Slurm's daemons and munge (Debian: ``apt-get install slurm-wlm munge``, which .ci/run
does) and root; the tests skip otherwise. Each test runs one job of each launcher at the same
time, so the emulated nodes claim twice this host's cores (``--cpus``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
SUBMIT = REPO / "slurm" / "submit.py"
SBATCH_SCRIPT = REPO / "slurm" / "train.sbatch"

# What the cluster needs, and what the tests run.
PROGRAMS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue",
            "sinfo", "scancel")
SBIN_PATH = os.pathsep.join([p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
                           + ["/usr/local/sbin", "/usr/sbin", "/sbin"])

# A tiny model and few steps: a job trains for a few seconds. Every job of this module trains
# the same run, so that every one's losses can be compared with the uninterrupted run's.
STEPS = 160
TRAIN = ["--seq-len", "64", "--batch-size", "2", "--dim", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1",
         "--recall-pairs", "4", "--log-every", "1", "--ckpt-every", "0", "--no-plot", "--steps", str(STEPS)]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
TIME_LIMIT_CHECK_S = 30  # slurmctld looks at time limits (and sends their warnings) this often

pytestmark = pytest.mark.timeout(240)  # every wait below has its own, shorter, limit


def why_no_cluster() -> str | None:
    """Why a local cluster cannot start here, or None."""
    missing = [p for p in PROGRAMS if shutil.which(p, path=SBIN_PATH) is None]
    if missing:
        return (f"Slurm and munge are not installed here (no {', '.join(missing)}): "
                "apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        return "the local Slurm cluster's daemons run as root (SlurmUser=root): run these tests as root"
    return None


def _free_ports(n: int) -> int:
    """A port p with p, ..., p + n - 1 free here (below the ephemeral range and the jobs' rendezvous ports)."""
    for _ in range(200):
        base = random.randrange(17000, 19900)
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("", p))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports for slurmctld and the slurmds")


def _environ(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not readable
        return b""


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class Cluster:
    dir: Path
    nodes: int
    env: dict  # what a user's shell has after `export SLURM_CONF=...`

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def run(self, *cmd, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def queue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i %T %r").stdout.split("\n")[:-1]

    def daemon_pids(self) -> set[str]:
        pids = set()
        for f in (self.dir / "run").glob("*.pid"):
            pids.add(f.read_text().strip())
        return pids

    def processes(self) -> dict[str, str]:
        """Every process started by this cluster (its environment names this cluster's
        slurm.conf: the daemons, slurmstepd, the jobs' scripts and ranks): pid -> command line."""
        mark = f"SLURM_CONF={self.conf}\0".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and entry.name != str(os.getpid()) and mark in _environ(entry.name):
                found[entry.name] = _cmdline(entry.name)
        return found

    def job_processes(self) -> dict[str, str]:
        """Processes of this cluster other than its daemons (and slurmctld's slurmscriptd): what
        jobs leave behind."""
        daemons = self.daemon_pids()
        return {p: c for p, c in self.processes().items() if p not in daemons and "slurmscriptd" not in c}

    def time_limit_checks(self) -> list[float]:
        """When slurmctld looked at the jobs' time limits (its debug2 log), as epoch seconds."""
        stamps = re.findall(r"^\[(\S+)\] debug2: Testing job time limits",
                            (self.dir / "log" / "slurmctld.log").read_text(), flags=re.M)
        return [datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%f").timestamp() for s in stamps]

    def next_time_limit_check(self) -> float:
        # The first check comes a period after slurmctld starts (its log's first line).
        log = (self.dir / "log" / "slurmctld.log").read_text()
        started = datetime.strptime(re.match(r"\[(\S+)\]", log).group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp()
        last = max([started, *self.time_limit_checks()])
        periods = max(1, int((time.time() - last) // TIME_LIMIT_CHECK_S) + 1)
        return last + periods * TIME_LIMIT_CHECK_S


@pytest.fixture(scope="module")
def cluster():
    reason = why_no_cluster()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("submitit", reason="slurm/submit.py needs submitit (pip install -e '.[test]')")
    # Not under pytest's tmp_path: munged wants every directory above its socket open to all.
    root = Path(tempfile.mkdtemp(prefix="ringflash-slurm-"))
    root.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "OMP_NUM_THREADS")}
    # torchrun and this Python first (the jobs run with the submitter's environment).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), SBIN_PATH])
    env["SLURM_CONF"] = str(root / "slurm.conf")
    cpus = max(4, 2 * (os.cpu_count() or 1))  # two 2-task jobs at once, whatever this host's cores
    nodes, out = 2, None
    for nodes in (2, 1):  # two emulated nodes where this host's name tells them apart
        proc = subprocess.run(["bash", str(LOCAL_CLUSTER), "start", "--dir", str(root), "--nodes", str(nodes),
                               "--cpus", str(cpus), "--port", str(_free_ports(3)), "--debug", "debug2"],
                              env=env, capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        if proc.returncode != 5:
            break
    if proc.returncode in (3, 4):
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(out.strip())
    c = Cluster(root, nodes, env)
    try:
        assert proc.returncode == 0, f"slurm/local_cluster.sh start failed:\n{out}"
        # A first step on every node, so that the first job meets a cluster like the later ones.
        c.run("srun", f"--nodes={nodes}", f"--ntasks={nodes}", "true", timeout=60)
        deadline = time.monotonic() + 30
        while c.queue() and time.monotonic() < deadline:
            time.sleep(0.1)
        yield c
    finally:
        stop = subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", "--dir", str(root)], env=env,
                              capture_output=True, text=True, timeout=120)
        left = {}
        for _ in range(100):
            left = c.processes()
            if not left:
                break
            time.sleep(0.1)
        for pid in left:  # ours (this cluster's SLURM_CONF), and they should not be there
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass
        shutil.rmtree(root, ignore_errors=True)
        assert stop.returncode == 0, f"slurm/local_cluster.sh stop failed:\n{stop.stdout}{stop.stderr}"
        assert not left, f"processes left after the cluster stopped: {left}"


@pytest.fixture
def idle_cluster(cluster):
    """The cluster, and after the test: no job in the queue, no process of a job left."""
    assert cluster.queue() == [], "a job of an earlier test is still queued"
    yield cluster
    deadline = time.monotonic() + 60
    while cluster.queue() and time.monotonic() < deadline:
        time.sleep(0.2)
    queued = cluster.queue()
    if queued:
        cluster.run("scancel", "--full", *[q.split()[0] for q in queued], check=False)
    assert queued == [], f"jobs still in the queue after the test: {queued}"
    deadline = time.monotonic() + 30
    while cluster.job_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.job_processes() == {}, "processes of the test's jobs are left"


# -- jobs -------------------------------------------------------------------------------------


@dataclass
class Job:
    launcher: str  # "submit.py" or "sbatch"
    id: str
    out: Path  # launch/train.py's --out
    logs: Path  # the folder of the job's logs
    info: dict = field(default_factory=dict)  # scontrol show job, last seen
    first_step_at: float | None = None  # time.monotonic() when metrics.jsonl got its first record

    def metrics(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line being written
                break
        return records

    def losses(self) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in self.metrics()]

    def log(self) -> str:
        """Every log of the job (submitit's per-task logs, or the sbatch output), progress bars cut."""
        pattern = "*_log.*" if self.launcher == "submit.py" else "slurm-*.out"
        files = sorted(self.logs.glob(pattern))
        return "\n".join(f.read_text(errors="replace").replace("\r", "\n") for f in files)

    def lines(self, pattern: str) -> list[str]:
        return re.findall(pattern, self.log(), flags=re.M)

    @property
    def state(self) -> str:
        return self.info.get("JobState", "")

    @property
    def restarts(self) -> int:
        return int(self.info.get("Restarts", 0))

    def checkpoint_step(self) -> int | None:
        meta = self.out / "ckpt" / "meta.json"
        return json.loads(meta.read_text())["step"] if meta.exists() else None

    def describe(self) -> str:
        lines = self.log().splitlines()[-40:]
        tail = "\n".join(line for line in lines if line.strip() and not line.startswith("train:"))
        return (f"{self.launcher} job {self.id}: {self.state}, restarts {self.restarts}, "
                f"{len(self.metrics())} records; log:\n{tail}")


def poll(cluster: Cluster, jobs: list[Job]) -> None:
    for job in jobs:
        if job.state in FINAL_STATES:
            continue
        proc = cluster.run("scontrol", "-o", "show", "job", job.id, check=False)
        if proc.returncode == 0:
            job.info = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
        if job.first_step_at is None and job.metrics():
            job.first_step_at = time.monotonic()


def wait_until(cluster: Cluster, jobs: list[Job], done, what: str, timeout: float = 90) -> None:
    """Poll the jobs until ``done()``; fail with their logs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        poll(cluster, jobs)
        if done():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}:\n" + "\n\n".join(j.describe() for j in jobs))
        time.sleep(0.2)  # the jobs share 2 cores with this loop


def wait_done(cluster: Cluster, jobs: list[Job], timeout: float = 90) -> None:
    wait_until(cluster, jobs, lambda: all(j.state in FINAL_STATES for j in jobs), "the jobs to end", timeout)


def training_past(job: Job, step: int) -> bool:
    """Whether ``job`` runs and has logged ``step`` (a resumed run's records past its checkpoint)."""
    return job.state == "RUNNING" and any(r["step"] >= step for r in job.metrics())


def act_when(cluster: Cluster, jobs: list[Job], ready, act, what: str, timeout: float = 60) -> None:
    """``act(job)`` on each job as soon as ``ready(job)``, the jobs watched together (one may
    finish its training while the test waits for another)."""
    pending = list(jobs)
    deadline = time.monotonic() + timeout
    while pending:
        poll(cluster, pending)
        for job in list(pending):
            if ready(job):
                act(job)
                pending.remove(job)
            elif job.state in FINAL_STATES:
                pytest.fail(f"the job ended before {what}:\n{job.describe()}")
        if pending and time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}:\n" + "\n\n".join(j.describe() for j in pending))
        time.sleep(0.2)


def submit(cluster: Cluster, out: Path, *flags: str, train: tuple[str, ...] = ()) -> Job:
    """``python slurm/submit.py --gpus-per-node 0 ... -- TRAIN``: a CPU job of submitit's SlurmExecutor."""
    proc = cluster.run(sys.executable, SUBMIT, "--gpus-per-node", "0", "--cpus-per-task", "1", *flags,
                       "--", *TRAIN, "--out", out, *train, timeout=120, cwd=out.parent)
    m = re.search(r"^submitted job (\d+): .* CPU task", proc.stdout, flags=re.M)
    assert m, proc.stdout + proc.stderr
    return Job("submit.py", m.group(1), out, out / "submitit")


def sbatch(cluster: Cluster, out: Path, *flags: str, train: tuple[str, ...] = ()) -> Job:
    """``sbatch --gpus-per-node=0 ... slurm/train.sbatch TRAIN``, from the repository root."""
    logs = out.parent / f"{out.name}-logs"
    logs.mkdir(parents=True)
    proc = cluster.run("sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1",
                       f"--output={logs}/slurm-%j.out", *flags, SBATCH_SCRIPT, *TRAIN, "--out", out, *train,
                       cwd=REPO, timeout=60)
    return Job("sbatch", proc.stdout.strip().split(";")[0], out, logs)


def submit_both(cluster: Cluster, base: Path, submit_flags=(), sbatch_flags=(), submit_train=(), sbatch_train=(),
                hold: bool = False) -> tuple[Job, Job]:
    """One job of each launcher, 2 tasks each: submit.py's on one node, sbatch's on two (one task
    per node) where the cluster has two. ``hold``: both wait in the queue (JobHeldAdmin)."""
    if hold:  # nothing starts until the jobs are held
        cluster.run("scontrol", "update", "PartitionName=debug", "State=DOWN")
    try:
        a = submit(cluster, base / "submit", "--tasks-per-node", "2", *submit_flags, train=tuple(submit_train))
        b = sbatch(cluster, base / "sbatch", f"--nodes={cluster.nodes}", f"--ntasks-per-node={2 // cluster.nodes}",
                   *sbatch_flags, train=tuple(sbatch_train))
        if hold:
            cluster.run("scontrol", "hold", a.id, b.id)
    finally:
        if hold:
            cluster.run("scontrol", "update", "PartitionName=debug", "State=UP")
    return a, b


# -- an uninterrupted run ---------------------------------------------------------------------


@dataclass
class Reference:
    jobs: tuple[Job, Job]
    losses: list[tuple[int, float]]
    startup_s: float  # from their release to the first step of both jobs


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> Reference:
    """Each launcher's job, uninterrupted, both released at once (how long they take to start
    training is measured for the time-limit test)."""
    base = tmp_path_factory.mktemp("uninterrupted")
    jobs = submit_both(cluster, base, hold=True)
    released = time.monotonic()
    cluster.run("scontrol", "release", *[j.id for j in jobs])
    wait_done(cluster, list(jobs))
    for j in jobs:
        assert j.state == "COMPLETED" and j.first_step_at, j.describe()
    return Reference(jobs, jobs[0].losses(), max(j.first_step_at for j in jobs) - released)


def test_each_launcher_trains_on_two_tasks_and_the_loss_falls(idle_cluster, reference):
    submitted, sbatched = reference.jobs
    for job in reference.jobs:
        assert job.state == "COMPLETED" and job.restarts == 0, job.describe()
        assert job.info["NumTasks"] == "2", job.info
        assert job.lines(r"world 2 = dp 1 x cp 2 \(striped\)"), job.describe()
        losses = [loss for _, loss in job.losses()]
        assert [s for s, _ in job.losses()] == list(range(1, STEPS + 1))
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        assert last < first - 1.5, f"{job.launcher}: the loss did not fall: {first:.2f} -> {last:.2f}"
    # submitit ran one rank in each task, and each task returned its result.
    results = sorted(submitted.logs.glob(f"{submitted.id}_*_result.pkl"))
    assert len(results) == 2
    import pickle

    ranks = sorted(pickle.loads(r.read_bytes())[1]["rank"] for r in results)
    assert ranks == [0, 1]
    if idle_cluster.nodes == 2:  # one torchrun on each node, meeting at the first node's rendezvous
        assert sbatched.info["NumNodes"] == "2", sbatched.info
    # The same run through either launcher: the same losses, bit for bit.
    assert sbatched.losses() == submitted.losses()


# (Before the time-limit test, this one shortens that test's wait for slurmctld's next check.)
def test_failing_training_ends_failed_without_requeue(idle_cluster, tmp_path):
    """Flags the training refuses where it runs: the job ends FAILED with the message in its log,
    and is not requeued."""
    submitted, sbatched = jobs = submit_both(idle_cluster, tmp_path, submit_train=("--device", "cuda"),
                                             sbatch_train=("--cp-size", "3"))
    wait_done(idle_cluster, list(jobs))
    for job in jobs:
        assert job.state == "FAILED" and job.restarts == 0, job.describe()
        assert not job.metrics()
    assert submitted.lines(r"train\.py: error: --device cuda, but torch sees no GPU"), submitted.describe()
    assert sbatched.lines(r"train\.py: error: --cp-size 3 does not divide the world size 2"), sbatched.describe()


def assert_resumed(job: Job, reference: Reference, stopped_by: str) -> None:
    """``job`` was stopped in mid-run by ``stopped_by``, checkpointed, came back from that
    checkpoint and ended with the uninterrupted run's losses."""
    assert job.state == "COMPLETED" and job.restarts >= 1, job.describe()
    stopped = [int(s) for s in job.lines(rf"^step (\d+): stopped by {stopped_by} after checkpointing")]
    resumed = [int(s) for s in job.lines(r"^resuming at step (\d+)")]
    assert stopped and 0 < stopped[0] < STEPS, job.describe()
    assert resumed and resumed[0] == stopped[0], job.describe()
    assert job.losses() == reference.losses, f"{job.launcher}: the resumed run's losses differ"


def rank_processes(cluster: Cluster, job: Job) -> list[int]:
    """The processes of ``job`` that train: submitit's tasks, or the ranks torchrun started."""
    marks = (f"SLURM_CONF={cluster.conf}\0".encode(), f"SLURM_JOB_ID={job.id}\0".encode())
    ranks = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not all(m in _environ(entry.name) for m in marks):
            continue
        argv = _cmdline(entry.name).split()
        torchrun = any("torchrun" in a for a in argv)  # its command line names launch/train.py too
        if argv and Path(argv[0]).name.startswith("python") and (
                "submitit.core._submit" in argv or ("launch/train.py" in argv and not torchrun)):
            ranks.append(int(entry.name))
    return ranks


def test_time_limit_warning_checkpoints_requeues_and_resumes(idle_cluster, reference, tmp_path):
    """A one-minute time limit: Slurm's SIGUSR2 warning, at its next time-limit check, makes the
    job checkpoint and requeue itself; it comes back and resumes from the checkpoint.

    slurmctld checks time limits every 30 s, and warns a job of a minute at its first check. So
    that the check finds the jobs training on a machine of any speed, they start well before it
    (a check during their start-up would warn them before they can checkpoint), and once they
    train their ranks wait, stopped (SIGSTOP), until a second before it."""
    jobs = submit_both(idle_cluster, tmp_path, submit_flags=("--time", "1", "--signal-delay", "50"),
                       sbatch_flags=("--time=1", "--signal=B:USR2@50"), hold=True)
    lead = min(25.0, max(10.0, 2 * reference.startup_s + 2))  # enough to start training
    check = idle_cluster.next_time_limit_check()
    if check - time.time() < lead:
        time.sleep(check + 1 - time.time())  # past this one: the next comes 30 s after it
        check += TIME_LIMIT_CHECK_S
    idle_cluster.run("scontrol", "release", *[j.id for j in jobs])
    stopped = []
    try:
        def pause(job: Job):
            ranks = rank_processes(idle_cluster, job)
            assert len(ranks) == 2, f"{job.launcher} job {job.id}: ranks {ranks}"
            for pid in ranks:
                os.kill(pid, signal.SIGSTOP)
            stopped.extend(ranks)

        act_when(idle_cluster, list(jobs), lambda j: training_past(j, 40), pause, "step 40",
                 timeout=check - 2 - time.time())
        time.sleep(max(0.0, check - 1 - time.time()))
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    wait_done(idle_cluster, list(jobs), timeout=150)
    assert any(abs(t - check) < 3 for t in idle_cluster.time_limit_checks()), "no time-limit check when expected"
    submitted, sbatched = jobs
    assert_resumed(submitted, reference, "SIGUSR2")  # each rank got Slurm's signal
    assert submitted.lines(r"submitit .*Requeued job"), submitted.describe()  # and submitit requeued the job
    assert sbatched.lines(r"SIGUSR2: checkpointing before the time limit"), sbatched.describe()
    assert_resumed(sbatched, reference, "SIGTERM")  # the batch script got it, the ranks SIGTERM


def test_requeued_in_mid_run_resumes_from_its_checkpoint(idle_cluster, reference, tmp_path):
    """`scontrol requeue` (what a preemption does): SIGTERM to every process of the job, Slurm
    puts it back in the queue, it starts again and resumes from the checkpoint."""
    jobs = submit_both(idle_cluster, tmp_path, submit_flags=("--time", "10"), sbatch_flags=("--time=10",))
    act_when(idle_cluster, list(jobs), lambda j: training_past(j, 20),
             lambda j: idle_cluster.run("scontrol", "requeue", j.id), "step 20")
    wait_done(idle_cluster, list(jobs))
    for job in jobs:
        assert job.restarts == 1, job.describe()
        assert_resumed(job, reference, "SIGTERM")


def test_requeues_stop_at_max_requeues(idle_cluster, tmp_path):
    """--max-requeues 1: the first time-limit warning requeues the job, the second ends it
    failed, its checkpoint kept. The warning is sent at once (`scancel --signal=USR2`, to the
    tasks for submitit's job and to the batch script for sbatch's) rather than by the clock."""
    submitted, sbatched = jobs = submit_both(
        idle_cluster, tmp_path, submit_flags=("--time", "5", "--max-requeues", "1"),
        sbatch_flags=("--time=5",), sbatch_train=("--max-requeues", "1"))

    def warn(job: Job):
        idle_cluster.run("scancel", "--signal=USR2", *(["--batch"] if job.launcher == "sbatch" else []), job.id)

    act_when(idle_cluster, list(jobs), lambda j: training_past(j, 20), warn, "step 20")
    first = {}  # the step of the first checkpoint

    def training_again(job: Job) -> bool:  # 10 steps past the first checkpoint, in the second allocation
        if job.restarts == 1 and job.checkpoint_step():
            first.setdefault(job.id, job.checkpoint_step())
            return training_past(job, first[job.id] + 10)
        return False

    act_when(idle_cluster, list(jobs), training_again, warn, "training in a second allocation")
    wait_done(idle_cluster, list(jobs))
    for job in jobs:
        assert job.state == "FAILED" and job.restarts == 1, job.describe()
        assert first[job.id] < job.checkpoint_step() < STEPS, job.describe()  # the second checkpoint is kept
    assert submitted.lines(r"submit\.py: job not requeued: the time limit came again after --max-requeues"), \
        submitted.describe()
    assert sbatched.lines(r"train\.sbatch: job \d+ not requeued: it was restarted 1 times \(--max-requeues 1\)"), \
        sbatched.describe()


# -- the script, where it cannot run ----------------------------------------------------------


def test_local_cluster_needs_slurm_installed(tmp_path):
    """Without Slurm's programs the script says what to install, and starts nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("nproc", "hostname", "id"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run([shutil.which("bash"), str(LOCAL_CLUSTER), "start", "--dir", str(tmp_path / "c")],
                          env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3, proc.stderr
    assert "not installed: munged munge" in proc.stderr and "apt-get install slurm-wlm munge" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_local_cluster_needs_root(tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (and setpriv) to run the script as another user")
    if why_no_cluster():
        pytest.skip(why_no_cluster())
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(LOCAL_CLUSTER),
                           "start", "--dir", str(tmp_path / "c")], env={**os.environ, "PATH": SBIN_PATH},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 4, proc.stderr
    assert "run it as root" in proc.stderr
