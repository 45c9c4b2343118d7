"""examples/: each script runs under torchrun on the CPU (gloo, reference engine) as its docstring says.

The number of processes comes from the command line in the script's docstring, so the command a
user copies is the one tested; the arguments after it only shrink the shapes to keep each run
to a few seconds.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)  # tests here start processes: a hang must fail, not stall

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def documented_nproc(script: Path) -> int:
    """N of the first ``torchrun --nproc-per-node N examples/<script>`` in the script's docstring."""
    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert doc, f"{script.name} has no docstring"
    m = re.search(rf"torchrun --nproc-per-node (\d+) examples/{re.escape(script.name)}\b", doc)
    assert m, f"{script.name}'s docstring does not give its torchrun command line"
    return int(m.group(1))


def run_example(name: str, *args: str, timeout: float = 120) -> str:
    """Run examples/<name> under torchrun on the CPU with its documented process count; its stdout."""
    script = EXAMPLES / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={documented_nproc(script)}", str(script), *args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # the CPU path (gloo, reference engine) on any machine
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),  # this checkout
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        # Start once more: torchrun's --standalone rendezvous picks a free port that another process
        # may take first. A failure of the example itself fails again.
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+ loss (\S+)$", stdout, flags=re.M)]


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_is_short_and_documented(name):
    script = EXAMPLES / name
    assert documented_nproc(script) >= 1
    assert len(script.read_text().splitlines()) <= 80, f"{name}: an example should read in one screen or two"


def test_ring_vs_sdpa():
    out = run_example("ring_vs_sdpa.py", "--batch", "1", "--seqlen", "64", "--heads", "4", "--kv-heads", "2",
                      "--head-dim", "16")
    errors = dict(re.findall(r"^\s*(out|dq|dk|dv) relative error (\S+)$", out, flags=re.M))
    assert sorted(errors) == ["dk", "dq", "dv", "out"], out
    assert all(float(e) < 1e-5 for e in errors.values()), out  # float32 on the CPU: rounding only
    assert re.search(r"^max relative error \S+ <= tolerance \S+: OK$", out, flags=re.M), out


def test_model_loss_falls():
    out = run_example("model.py", "--seqlen", "64", "--steps", "4")
    loss = losses(out)
    assert len(loss) == 4, out
    assert loss[-1] < loss[0], out


def test_dp_cp_mesh_loss_falls():
    out = run_example("dp_cp_mesh.py", "--seqlen", "32", "--steps", "3")
    loss = losses(out)
    assert len(loss) == 3, out
    assert loss[-1] < loss[0], out


def test_packed_documents():
    out = run_example("packed_documents.py", "--seqlen", "256", "--window", "40")
    err = re.search(r"relative error (\S+)$", out, flags=re.M)
    assert err and float(err.group(1)) < 1e-5, out  # float32 on the CPU: rounding only
    assert re.search(r"^OK$", out, flags=re.M), out
    steps = losses(out)
    assert len(steps) == 5 and steps[-1] < steps[0], out


def test_hf_llama_loss_falls():
    pytest.importorskip("transformers")
    out = run_example("hf_llama.py", "--seqlen", "128", "--steps", "4")
    loss = losses(out)
    assert len(loss) == 4, out
    assert loss[-1] < loss[0], out


def test_sparse():
    out = run_example("sparse.py", "--seqlen", "256", "--block", "16")
    errs = re.findall(r"^(block|qkdrop|hash): relative error (\S+)$", out, flags=re.M)
    assert len(errs) == 3 and all(float(e) < 1e-5 for _, e in errs), out  # float32 on the CPU
    assert re.search(r"^OK$", out, flags=re.M), out
    steps = losses(out)
    assert len(steps) == 5 and steps[-1] < steps[0], out
