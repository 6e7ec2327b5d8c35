"""The launch scripts: syntax, the Slurm script's sizes, signal forwarding and requeue, the DeepSpeed script's ssh
choice, the Kubernetes manifest and the Docker build's pins. Slurm, srun and deepspeed are small shell stubs on
PATH that record what they were asked; nothing is launched."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SBATCH = LAUNCH / "slurm.sbatch"
DEEPSPEED = LAUNCH / "deepspeed.sh"
JOB_ID = "4242"

# Each stub appends what it was asked to files in $FAKE_DIR.
STUBS = {
    "scontrol": """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") printf 'node-a\\nnode-b\\n' ;;
  "show job") echo "JobId=$3 JobName=lemur JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None" ;;
  *) echo "scontrol $*" >> "$FAKE_DIR/calls" ;;
esac
""",
    # Slurm's scancel --signal signals the step's processes: here, the stub srun.
    "scancel": """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_DIR/calls"
kill -TERM "$(cat "$FAKE_DIR/srun.pid")"
""",
    # A step that runs for 10 s unless it gets SIGTERM (then takes 0.2 s to checkpoint and exits with
    # $FAKE_TERM_RC, 0 as the trainer does; torchrun itself exits 1), or exits at once with $FAKE_SRUN_RC.
    "srun": """#!/usr/bin/env bash
trap 'sleep 0.2; echo "srun: SIGTERM, saved" >> "$FAKE_DIR/calls"; exit "${FAKE_TERM_RC:-0}"' TERM
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
echo $$ > "$FAKE_DIR/srun.pid.tmp" && mv "$FAKE_DIR/srun.pid.tmp" "$FAKE_DIR/srun.pid"
[[ -z ${FAKE_SRUN_RC:-} ]] || exit "$FAKE_SRUN_RC"
for _ in $(seq 200); do sleep 0.05; done
""",
    "nvidia-smi": "#!/bin/sh\nexit 1\n",
    "deepspeed": """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_DIR/deepspeed.args"
""",
}


@pytest.fixture
def fake_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment whose PATH starts with the stubs, as a two-node Slurm job with 4 GPUs per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        stub = bin_dir / name
        stub.write_text(text)
        stub.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_DIR": str(tmp_path),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_ON_NODE": "32",
    }


def run_script(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=10
    )


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def option(args: list[str], name: str) -> str:
    """The value after `name` in an argument list."""
    return args[args.index(name) + 1]


@pytest.mark.parametrize("script", ["slurm.sbatch", "deepspeed.sh", "local.sh"])
def test_script_parses(script: str) -> None:
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_sbatch_header_asks_for_the_signal_and_requeue() -> None:
    text = SBATCH.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert any(line.startswith("#SBATCH --signal=B:USR1@") for line in directives)
    assert "#SBATCH --requeue" in directives
    assert "#SBATCH --open-mode=append" in directives
    assert not any("--gpus-per-node" in line or "--cpus-per-task" in line for line in directives)
    assert "29500" not in text
    assert "--resume auto" in text.split("#SBATCH")[0]  # the header's example


@pytest.mark.parametrize(
    ("extra_env", "nproc", "endpoint"),
    [
        ({}, "4", "node-a:24242"),  # SLURM_GPUS_ON_NODE; port 20000 + job id % 10000
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h200:2"}, "2", "node-a:24242"),
        ({"GPUS_PER_NODE": "1", "MASTER_PORT": "31234"}, "1", "node-a:31234"),
        ({"MASTER_ADDR": "10.0.0.7"}, "4", "10.0.0.7:24242"),
    ],
)
def test_sbatch_takes_sizes_from_the_submission(
    fake_env: dict[str, str], tmp_path: Path, extra_env: dict[str, str], nproc: str, endpoint: str
) -> None:
    result = run_script(SBATCH, {**fake_env, **extra_env, "FAKE_SRUN_RC": "0"}, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    args = read_lines(tmp_path / "srun.args")
    assert option(args, "--cpus-per-task") == "32"
    assert option(args, "--nnodes") == "2"
    assert option(args, "--nproc-per-node") == nproc
    assert option(args, "--rdzv-backend") == "c10d"
    assert option(args, "--rdzv-endpoint") == endpoint
    assert option(args, "--rdzv-id") == JOB_ID
    assert args[-6:] == ["-m", "trainer.train", "--config", "lemur", "--resume", "auto"]
    assert read_lines(tmp_path / "calls") == []  # finished on its own: no requeue


def test_sbatch_without_a_gpu_count_fails(fake_env: dict[str, str], tmp_path: Path) -> None:
    result = run_script(SBATCH, {**fake_env, "SLURM_GPUS_ON_NODE": ""})
    assert result.returncode != 0
    assert "--gpus-per-node" in result.stderr
    assert not (tmp_path / "srun.args").exists()


def test_sbatch_passes_on_the_step_status(fake_env: dict[str, str], tmp_path: Path) -> None:
    result = run_script(SBATCH, {**fake_env, "FAKE_SRUN_RC": "3"}, "--resume", "auto")
    assert result.returncode == 3
    assert read_lines(tmp_path / "calls") == []


def signal_batch(
    env: dict[str, str], tmp_path: Path, sig: signal.Signals
) -> subprocess.CompletedProcess[str]:
    """Start the batch script, send it `sig` once its step runs, and wait for it to end."""
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "--resume", "auto"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 5
    while not (tmp_path / "srun.pid").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=5)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize(("sig", "term_rc"), [(signal.SIGUSR1, 0), (signal.SIGTERM, 0), (signal.SIGUSR1, 1)])
def test_sbatch_signal_stops_the_step_then_requeues(
    fake_env: dict[str, str], tmp_path: Path, sig: signal.Signals, term_rc: int
) -> None:
    result = signal_batch({**fake_env, "FAKE_TERM_RC": str(term_rc)}, tmp_path, sig)
    assert result.returncode == term_rc, result.stdout + result.stderr
    # The step gets SIGTERM once (from scancel on SIGUSR1, from the script through srun on SIGTERM) and the
    # requeue waits until it has saved and exited.
    stop = [f"scancel --signal=TERM {JOB_ID}"] if sig == signal.SIGUSR1 else []
    assert read_lines(tmp_path / "calls") == [*stop, "srun: SIGTERM, saved", f"scontrol requeue {JOB_ID}"]


@pytest.mark.parametrize(
    ("extra_env", "sig"),
    [({"FAKE_JOB_STATE": "CANCELLED"}, signal.SIGTERM), ({"REQUEUE": "0"}, signal.SIGUSR1)],
)
def test_sbatch_does_not_requeue_a_cancelled_job_or_when_told(
    fake_env: dict[str, str], tmp_path: Path, extra_env: dict[str, str], sig: signal.Signals
) -> None:
    result = signal_batch({**fake_env, **extra_env}, tmp_path, sig)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = read_lines(tmp_path / "calls")
    assert calls.count("srun: SIGTERM, saved") == 1
    assert not any("requeue" in call for call in calls)


def write_hostfile(tmp_path: Path, *hosts: str) -> str:
    path = tmp_path / "hostfile"
    path.write_text("# a comment\n" + "".join(f"{host} slots=2\n" for host in hosts))
    return str(path)


@pytest.mark.parametrize("host", ["localhost", socket.gethostname()])
def test_deepspeed_runs_a_local_hostfile_without_ssh(
    fake_env: dict[str, str], tmp_path: Path, host: str
) -> None:
    env = {**fake_env, "HOSTFILE": write_hostfile(tmp_path, host)}
    result = run_script(DEEPSPEED, env, "--set", "a.b=1")
    assert result.returncode == 0, result.stderr
    args = read_lines(tmp_path / "deepspeed.args")
    assert "--no_ssh" in args
    assert option(args, "--node_rank") == "0"
    assert option(args, "--master_addr") == "127.0.0.1"
    assert args[-7:] == [
        "--no_local_rank",
        "--module",
        "trainer.train",
        "--config",
        "lemur",
        "--set",
        "a.b=1",
    ]


@pytest.mark.parametrize(
    ("hosts", "extra_env"),
    [(("node-001", "node-002"), {}), (("localhost",), {"NO_SSH": "0"})],
)
def test_deepspeed_uses_ssh_for_other_hosts_or_when_told(
    fake_env: dict[str, str], tmp_path: Path, hosts: tuple[str, ...], extra_env: dict[str, str]
) -> None:
    env = {**fake_env, **extra_env, "HOSTFILE": write_hostfile(tmp_path, *hosts), "MASTER_PORT": "29600"}
    result = run_script(DEEPSPEED, env)
    assert result.returncode == 0, result.stderr
    args = read_lines(tmp_path / "deepspeed.args")
    assert "--no_ssh" not in args
    assert "--node_rank" not in args
    assert option(args, "--master_port") == "29600"


def test_deepspeed_multi_node_without_ssh_needs_the_node_rank(
    fake_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**fake_env, "HOSTFILE": write_hostfile(tmp_path, "node-001", "node-002"), "NO_SSH": "1"}
    result = run_script(DEEPSPEED, env)
    assert result.returncode != 0
    assert "NODE_RANK" in result.stderr

    result = run_script(DEEPSPEED, {**env, "NODE_RANK": "1"})
    assert result.returncode == 0, result.stderr
    args = read_lines(tmp_path / "deepspeed.args")
    assert "--no_ssh" in args
    assert option(args, "--node_rank") == "1"
    assert option(args, "--master_addr") == "node-001"


def test_pytorchjob_manifest() -> None:
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((LAUNCH / "k8s" / "pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    for spec in replicas.values():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"  # the operator's env vars go to the container of this name
        assert container["command"] == ["torchrun"]
        args = container["args"]
        assert "--rdzv-backend=c10d" in args
        assert "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT)" in args
        assert args[args.index("-m") + 1] == "trainer.train"
        assert "--resume=auto" in args
        out_dir = next(a.split("=", 2)[2] for a in args if a.startswith("--set=logging.out_dir="))
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["NCCL_NVLS_ENABLE"] == "0"
        shared = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["shared"]
        assert out_dir.startswith(shared + "/")
        volume = next(v for v in pod["volumes"] if v["name"] == "shared")
        assert "persistentVolumeClaim" in volume


def test_dockerfile_pins_torch_2_11_and_checks_the_triple() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0" in text
    assert "fbgemm-gpu==1.6.0" in text and "torchrec==1.6.1" in text
    assert "import torch, fbgemm_gpu, torchrec" in text
    assert 'ENTRYPOINT ["lemur"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".gpu-bundle", "outputs", "**/__pycache__"} <= set(ignored)
