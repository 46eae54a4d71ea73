"""The sbatch scripts `megatronlite submit` renders, and its errors; no Slurm needed."""

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import error_of

from megatronlite.cli import main
from megatronlite.launcher import slurm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def dry_run(capsys, *flags: str) -> str:
    main(["submit", "configs/demo.yaml", "--run-dir", "/shared/runs/demo", "--dry-run", *flags])
    return capsys.readouterr().out


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_torchrun_script_one_task_per_node(capsys):
    script = dry_run(
        capsys,
        "--nodes",
        "4",
        "--nproc-per-node",
        "8",
        "--partition",
        "gpu",
        "--time",
        "4:00:00",
        "--set",
        "train.global_batch_size=256",
    )
    assert sbatch_lines(script) == [
        "--job-name=demo",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=4:00:00",
        f"--chdir={REPO}",
        "--output=/shared/runs/demo/slurm-%j.out",
        "--open-mode=append",
        "--signal=B:USR1@300",
        "--requeue",
    ]
    assert f'{sys.executable} -m megatronlite launch "$CONFIG"' in script
    assert f"CONFIG={REPO / 'configs' / 'demo.yaml'}" in script and "RUN_DIR=/shared/runs/demo" in script
    assert '--nproc-per-node 8 --nnodes "$SLURM_JOB_NUM_NODES"' in script
    assert '--rdzv-id "$SLURM_JOB_ID"' in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert "trap " in script and "scontrol requeue" in script  # the save-and-requeue helper is inlined
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_srun_script_one_task_per_worker(capsys):
    script = dry_run(
        capsys, "--nodes", "2", "--nproc-per-node", "4", "--launcher", "srun", "--set", "train.global_batch_size=64"
    )
    assert "--ntasks-per-node=4" in sbatch_lines(script)
    assert (
        f'{sys.executable} -m megatronlite train "$CONFIG" --run-dir "$RUN_DIR" --set train.global_batch_size=64'
        in script
    )
    assert "export MASTER_ADDR MASTER_PORT" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_container_image_runs_the_image_python_with_pyxis(capsys):
    script = dry_run(capsys, "--container-image", "registry#megatronlite:latest", "--container-mounts", "/data:/data")
    mounts = f"--container-mounts={REPO}:{REPO},/shared/runs/demo:/shared/runs/demo,/data:/data"
    assert f"'--container-image=registry#megatronlite:latest' {mounts} --container-workdir={REPO}" in script
    assert "python -m megatronlite launch" in script and sys.executable not in script


def test_pyxis_entry_point(tmp_path):
    env = {**os.environ, "IMAGE": str(tmp_path / "megatronlite.sqsh"), "NODES": "1", "GPUS_PER_NODE": "2"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    done = subprocess.run(
        ["bash", "launch/submit_pyxis.sh", "configs/demo.yaml", "--run-dir", str(tmp_path / "run"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "--partition=gpu" in sbatch_lines(done.stdout) and "--time=24:00:00" in sbatch_lines(done.stdout)
    assert f"--container-image={tmp_path / 'megatronlite.sqsh'}" in done.stdout


def test_cpu_job_asks_for_no_gpus(capsys):
    lines = sbatch_lines(dry_run(capsys, "--gpus-per-node", "0", "--account", "proj", "--signal-seconds", "90"))
    assert not any(line.startswith("--gpus") for line in lines)
    assert "--account=proj" in lines and "--signal=B:USR1@90" in lines


def test_own_template(capsys, tmp_path):
    template = tmp_path / "mine.sbatch"
    template.write_text("#!/bin/bash\n{{sbatch}}\n#SBATCH --qos=high\n{{run}}\necho {{megatronlite}} $HOME\n")
    script = dry_run(capsys, "--template", str(template))
    assert "#SBATCH --qos=high" in script and f"echo {sys.executable} -m megatronlite $HOME" in script
    template.write_text("{{sbatch}}\n{{nodes_count}}\n")
    line = error_of(capsys, "submit", "configs/demo.yaml", "--template", str(template), "--dry-run")
    assert "unknown template field(s) nodes_count; known fields: helpers, max_restarts, megatronlite" in line


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--nproc-per-node", "3", "--set", "parallel.tensor=2"],
            "world size 3 is not divisible by parallel.tensor x parallel.pipeline x parallel.context (2 x 1 x 1)",
        ),
        (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
        (["--nodes", "0"], "--nodes must be >= 1, got 0"),
    ],
)
def test_bad_input_fails_before_submitting(capsys, flags, message):
    assert message in error_of(capsys, "submit", "configs/demo.yaml", *flags)


def test_a_run_directory_that_cannot_be_made_is_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    error = error_of(capsys, "submit", "configs/demo.yaml", "--run-dir", str(tmp_path / "file" / "run"))
    assert error.endswith("run: cannot make the directory (Not a directory)"), error


def test_missing_sbatch_is_one_clear_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm tools on PATH
    assert error_of(capsys, "submit", "configs/demo.yaml", "--run-dir", str(tmp_path / "run")) == (
        "megatronlite: error: sbatch not found on PATH: submit from a machine with the Slurm client tools "
        "(a login node), or use --dry-run to print the job script"
    )


def test_launch_folder_links_to_the_packaged_templates():
    """One copy of each template, in the package (what a pip install submits with); launch/ links to it."""
    for name in [*slurm.TEMPLATES.values(), "slurm_helpers.sh"]:
        link = REPO / "launch" / name
        assert link.is_symlink() and link.resolve() == slurm.TEMPLATE_DIR / name, link


@pytest.mark.parametrize("launcher", sorted(slurm.TEMPLATES))
def test_print_template_needs_no_config(capsys, launcher):
    with pytest.raises(SystemExit) as e:
        main(["submit", "--print-template", launcher])
    assert e.value.code == 0
    assert capsys.readouterr().out == (slurm.TEMPLATE_DIR / slurm.TEMPLATES[launcher]).read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-restarts", "-1"], "--max-restarts must be >= 0, got -1"),
        (["--cpus-per-task", "-2"], "--cpus-per-task must be >= 1, got -2"),
        (["--gpus-per-node", "-1"], "--gpus-per-node must be >= 0, got -1"),
        (["--partition", ""], "--partition must not be empty"),
        (["--time", " "], "--time must not be empty"),
        (["--account", ""], "--account must not be empty"),
        (["--job-name", "demo\ntouch /tmp/injected #"], "--job-name: 'demo\\ntouch /tmp/injected #' has a control"),
        (["--partition", "gpu\x7f"], "--partition: 'gpu\\x7f' has a control character"),
    ],
)
def test_bad_directives_fail_before_the_script_is_written(capsys, flags, message):
    """These passed: a job failing only once it ran (--max-restarts -1), one sbatch refuses, or a newline that ends
    the #SBATCH line and makes the rest of the value a command of the script."""
    error = error_of(capsys, "submit", "configs/demo.yaml", "--run-dir", "/shared/runs/demo", "--dry-run", *flags)
    assert message in error, error


HELPERS = slurm.TEMPLATE_DIR / "slurm_helpers.sh"


def run_helpers(tmp_path: Path, script: str, tools: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`script` in bash with the sbatch helpers sourced, SLURM_JOB_ID=42, a scontrol that only says how it was
    called, `tools` (name: bash body) first on PATH, and $FIFO a named pipe for the test's processes to meet on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"scontrol": 'echo "SCONTROL CALLED: $*"', **(tools or {})}.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    os.mkfifo(tmp_path / "fifo")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FIFO": str(tmp_path / "fifo")}
    return subprocess.run(
        ["bash", "-c", f"source {HELPERS}\nSLURM_JOB_ID=42\n{script}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )


# `STEP SIGNAL CODE`: a job step that sends the batch shell SIGNAL, waits (20 s at most) for a line on the pipe and
# exits with CODE. Its output goes elsewhere: a shell that died of the signal must not keep the test waiting on it.
STEP = (
    """bash -c 'exec >/dev/null 2>&1 3<>"$FIFO"; echo $$ > step.pid; kill -$1 $PPID; read -t 20 _ <&3; exit $2' step"""
)


def test_run_preemptible_keeps_the_status_of_a_step_that_ended_while_the_trap_ran(tmp_path):
    """The warning came as the step ended by itself (exit 0): `wait` returned 138 for the trap, the step ended while
    the trap ran, and its status was never collected: a finished job was requeued. Here the trap's `date` lets the
    step go on and returns only once it has ended."""
    date = (
        'if mkdir released 2>/dev/null; then echo go > "$FIFO"; timeout 20 tail --pid="$(<step.pid)" -f /dev/null; fi'
    )
    script = f'mkdir run; run_preemptible run {STEP} USR1 0; echo "returned $?"'
    done = run_helpers(tmp_path, script, {"date": f'{date}\ncommand -p date "$@"'})
    assert "warning signal: asking the trainer to save and stop" in done.stdout, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "returned 0", done.stdout + done.stderr
    assert "SCONTROL" not in done.stdout


@pytest.mark.parametrize("code", [3, 1])
def test_sigterm_to_the_batch_shell_asks_for_a_save_and_never_requeues(tmp_path, code):
    """scancel, preemption and the time limit send SIGTERM, which ended the batch shell at once, before the step
    could save. Now it asks for a save through the flag file (the step goes on once it is there) and waits; it
    requeues nothing (a cancelled job stays cancelled; Slurm requeues what it preempts itself)."""
    (tmp_path / "run").mkdir()
    touch = 'command -p touch "$@"; echo go > "$FIFO"'
    done = run_helpers(tmp_path, f'run_preemptible run {STEP} TERM {code}; echo "returned $?"', {"touch": touch})
    out = done.stdout + done.stderr
    assert "SIGTERM: asking the trainer to save and stop" in done.stdout, out
    assert (tmp_path / "run" / ".save_and_exit").exists()
    assert done.stdout.strip().splitlines()[-1] == f"returned {code}", out
    assert "SCONTROL" not in done.stdout, out


def test_free_port_leaves_room_for_the_restarts(tmp_path):
    """The launcher's restart k meets at port + k: those must be free too, not only the first."""
    job = next(j for j in random.sample(range(20000), 50) if all(_free(20000 + j + k) for k in range(4)))
    port = 20000 + job
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port + 1))
        busy.listen()
        done = run_helpers(tmp_path, f"SLURM_JOB_ID={job}; free_port; free_port 2; free_port 0")
    assert done.stdout.split() == [str(port), str(port + 2), str(port)], done.stdout + done.stderr


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
