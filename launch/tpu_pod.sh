#!/usr/bin/env bash
# Multi-host Cloud TPU slice (TPU VM) launcher: one rsllm_jax process per worker VM, all started together
# with `gcloud compute tpus tpu-vm ssh --worker=all`; jax.distributed.initialize() (main's --distributed)
# detects the slice by itself.
#
#   launch/tpu_pod.sh create                  create the slice, or reuse it if it already exists
#   launch/tpu_pod.sh setup                   ship the code (git archive of $GIT_REF) to every worker and
#                                             install it with jax[tpu] into a Python >= 3.11 venv there;
#                                             install gcsfuse there, and mount $BUCKET if it is set
#   launch/tpu_pod.sh mount                   mount $BUCKET on every worker (skipped where it already is)
#   launch/tpu_pod.sh run [--config.* ...]    (re)mount $BUCKET if set, then train on every worker; streams
#                                             the output of all workers, and each worker appends its own to
#                                             ~/rsllm_logs/<RUN_NAME>.log
#   launch/tpu_pod.sh logs                    follow that log on worker $WORKER (default 0; "all" = every one)
#   launch/tpu_pod.sh stop                    stop the run on every worker (the slice keeps running)
#   (Ctrl-C on `run` only detaches: the workers train on, their log continues; see `logs` and `stop`.)
#   launch/tpu_pod.sh delete                  delete the slice
#
# Run directory: every host must see the same one, but rsllm_jax.main writes it with plain file I/O
# (os.makedirs, metrics.jsonl appended line by line, np.save, absl log files), which cannot target a gs://
# URL. So the bucket is mounted with Cloud Storage FUSE (`gcsfuse --implicit-dirs`) at the same path on
# every worker (MOUNT_DIR, default ~/gcs/<bucket name>), and the run directory is a path under that mount:
# BUCKET=gs://my-bucket/rsllm gives --workdir=~/gcs/my-bucket/rsllm/runs/<RUN_NAME> (~ = the workers' login
# home). gcsfuse is not fully POSIX: an append rewrites the whole object, and two hosts must not write the
# same file. The workers' service account needs write access to the bucket. Instead of a bucket, WORKDIR
# may name a directory of a filesystem every worker mounts (e.g. NFS/Filestore); a gs:// (any URL) WORKDIR
# is refused.
#
# Example (v5e, 16 chips = 4 hosts; checkpoints in GCS so every host sees them and a preempted run resumes
# with another `run`):
#   export TPU_NAME=rsllm ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 BUCKET=gs://my-bucket/rsllm
#   DATA_SRC=../shared/data launch/tpu_pod.sh create setup
#   CONFIG=configs/stage2.py launch/tpu_pod.sh run --config.llm.model=/path/on/workers/Llama-2-7b-hf
#   launch/tpu_pod.sh delete
#
# Environment:
#   TPU_NAME          slice name                              (default rsllm-jax)
#   ZONE              zone                                    (default us-west4-a)
#   ACCELERATOR_TYPE  slice type                              (default v5litepod-16)
#   RUNTIME_VERSION   TPU VM software version                 (default v2-alpha-tpuv5-lite, the v5e image)
#   PROJECT           GCP project                             (default: gcloud's configured project)
#   SPOT              1 = create a Spot (preemptible) slice   (default 0)
#   BUCKET            gs://bucket[/prefix] root for run directories, mounted at MOUNT_DIR on every worker:
#                     WORKDIR=$MOUNT_DIR[/prefix]/runs/$RUN_NAME
#   MOUNT_DIR         where the workers mount the bucket      (default ~/gcs/<bucket name>; relative = under ~)
#   WORKDIR           run directory seen by every host        (overrides the BUCKET default; a local path
#                     such as a shared filesystem's or one inside MOUNT_DIR, never gs://)
#   CONFIG            config file                             (default configs/stage2.py)
#   RUN_NAME          run/log name                            (default: config file name, e.g. stage2)
#   DTYPE_FLAGS       (default "--config.llm.dtype=bfloat16 --config.llm.param_dtype=bfloat16")
#   MESH_FLAGS        (default "--config.mesh.fsdp=-1 --config.mesh.data=1"); "" = the config's own
#   RSLLM_DATA_DIR    dataset root on the workers             (default rsllm_data, i.e. ~/rsllm_data;
#                     a value exported for local runs is taken as the workers' path too)
#   DATA_SRC          local dataset root that `setup` copies to RSLLM_DATA_DIR on every worker (optional)
#   GIT_REF           commit `setup` ships                    (default HEAD; uncommitted changes are NOT shipped)
#   JAX_VERSION       pin jax[tpu]==JAX_VERSION               (default: newest allowed by setup.cfg)
#   PYTHON_VERSION    Python of the workers' venv             (default 3.11; installed by uv if missing)
#   WORKER            worker(s) for `logs`                    (default 0)
# Relative paths on the workers (code ~/rsllm_jax, venv ~/rsllm_venv, logs ~/rsllm_logs, data, MOUNT_DIR)
# are relative to the login home. Arguments after `run` go to rsllm_jax.main after the defaults, so they
# override them.
set -euo pipefail

TPU_NAME=${TPU_NAME:-rsllm-jax}
ZONE=${ZONE:-us-west4-a}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
BUCKET=${BUCKET:-}
CONFIG=${CONFIG:-configs/stage2.py}
RUN_NAME=${RUN_NAME:-$(basename "${CONFIG}" .py)}
MOUNT_DIR=${MOUNT_DIR:-}
WORKDIR=${WORKDIR:-}
DTYPE_FLAGS=${DTYPE_FLAGS---config.llm.dtype=bfloat16 --config.llm.param_dtype=bfloat16}
MESH_FLAGS=${MESH_FLAGS---config.mesh.fsdp=-1 --config.mesh.data=1}
RSLLM_DATA_DIR=${RSLLM_DATA_DIR:-rsllm_data}
DATA_SRC=${DATA_SRC:-}
GIT_REF=${GIT_REF:-HEAD}
JAX_VERSION=${JAX_VERSION:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
WORKER=${WORKER:-0}
REMOTE_DIR=rsllm_jax
REMOTE_VENV=rsllm_venv
REMOTE_LOGS=rsllm_logs

REPO=$(cd "$(dirname "$0")/.." && pwd)
GCLOUD=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="${ZONE}")
if [[ -n ${PROJECT} ]]; then
  LOCATION+=(--project="${PROJECT}")
fi

usage() {
  echo "usage: tpu_pod.sh {create|setup|mount|run|logs|stop|delete} [args]   (create and setup combine: create setup)"
  echo
  sed -n '2,/^set -euo pipefail/{/^#/s/^# \{0,1\}//p;}' "$0"
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}

q() {
  printf '%q' "$1"
}

# A path as one word of a remote command line; a relative path is taken relative to the workers' login home
# (as "$HOME"/path, so it stays right after a cd).
remote_path() {
  if [[ $1 == /* ]]; then
    q "$1"
  else
    printf '"%s"/%s' "\$HOME" "$(q "$1")"
  fi
}

# BUCKET=gs://name[/prefix] -> BUCKET_NAME=name, BUCKET_PREFIX=prefix (no slashes around it), and the
# MOUNT_DIR default.
BUCKET_NAME=""
BUCKET_PREFIX=""
parse_bucket() {
  local rest
  [[ ${BUCKET} == gs://* ]] || die "BUCKET=${BUCKET}: expected gs://bucket or gs://bucket/prefix"
  rest=${BUCKET#gs://}
  while [[ ${rest} == */ ]]; do
    rest=${rest%/}
  done
  BUCKET_NAME=${rest%%/*}
  BUCKET_PREFIX=${rest#"${BUCKET_NAME}"}
  BUCKET_PREFIX=${BUCKET_PREFIX#/}
  [[ -n ${BUCKET_NAME} ]] || die "BUCKET=${BUCKET}: no bucket name"
  MOUNT_DIR=${MOUNT_DIR:-gcs/${BUCKET_NAME}}
}

# The remote line that mounts the bucket at MOUNT_DIR unless it already is mounted there. A gcsfuse that
# died leaves a stale mount ("Transport endpoint is not connected"), which fails `mountpoint` and is
# lazily unmounted first.
mount_line() {
  local dir bucket
  dir=$(remote_path "${MOUNT_DIR}")
  bucket=$(q "${BUCKET_NAME}")
  printf '%s' "if mountpoint -q ${dir}; then echo \"\$(hostname): gs://${bucket} already mounted at ${dir}\"; \
else { fusermount3 -uz ${dir} || fusermount -uz ${dir}; } >/dev/null 2>&1 || true; \
mkdir -p ${dir} && gcsfuse --implicit-dirs ${bucket} ${dir}; fi"
}

# Run one bash command line on the workers ($1 = all | 0 | 1 ...). The workers' login shell parses the
# --command string, so the line is quoted once more for it; a line without newlines quotes to plain
# backslash escapes, which any POSIX login shell reads.
remote() {
  local worker=$1 cmd=$2
  "${GCLOUD[@]}" ssh "${TPU_NAME}" "${LOCATION[@]}" --worker="${worker}" --command="bash -c $(q "${cmd}")"
}

cmd_create() {
  if "${GCLOUD[@]}" describe "${TPU_NAME}" "${LOCATION[@]}" >/dev/null 2>&1; then
    echo "reusing TPU slice ${TPU_NAME} in ${ZONE}" >&2
    return 0
  fi
  local spot=()
  if [[ ${SPOT} == 1 ]]; then
    spot=(--spot)
  fi
  "${GCLOUD[@]}" create "${TPU_NAME}" "${LOCATION[@]}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --version="${RUNTIME_VERSION}" ${spot[@]+"${spot[@]}"}
}

cmd_setup() {
  if [[ -n ${BUCKET} ]]; then
    parse_bucket  # before any work: a bad BUCKET fails here
  fi
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: tmp is local
  trap "rm -rf $(q "${tmp}")" EXIT
  if [[ -n $(git -C "${REPO}" status --porcelain --untracked-files=no) ]]; then
    echo "warning: uncommitted changes are not shipped (git archive ${GIT_REF})" >&2
  fi
  mkdir "${tmp}/rsllm_upload"
  git -C "${REPO}" archive --format=tar.gz -o "${tmp}/rsllm_upload/rsllm_jax.tar.gz" "${GIT_REF}"
  if [[ -n ${DATA_SRC} ]]; then
    tar -C "${DATA_SRC}" -czf "${tmp}/rsllm_upload/rsllm_data.tar.gz" .
  fi
  # Lands in ~/rsllm_upload on every worker.
  "${GCLOUD[@]}" scp --recurse "${tmp}/rsllm_upload" "${TPU_NAME}:." "${LOCATION[@]}" --worker=all

  local venv dir data
  venv=$(q "${REMOTE_VENV}")
  dir=$(q "${REMOTE_DIR}")
  data=$(q "${RSLLM_DATA_DIR}")
  # One line per statement: the command line must stay free of newlines (see remote()).
  local steps=(
    "set -eu -o pipefail"
    "rm -rf ${dir}"
    "mkdir -p ${dir}"
    "tar -xzf rsllm_upload/rsllm_jax.tar.gz -C ${dir}"
    "if [ -f rsllm_upload/rsllm_data.tar.gz ]; then mkdir -p ${data} && tar -xzf rsllm_upload/rsllm_data.tar.gz -C ${data}; fi"
    "rm -rf rsllm_upload"
    # Cloud Storage FUSE from Google's apt repository (its documented Debian/Ubuntu install), for `mount`.
    "if ! command -v gcsfuse >/dev/null; then \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
sudo apt-get update -q; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcsfuse; fi"
    "export PATH=\"\$HOME/.local/bin:\$PATH\""
    # TPU VM images ship an older system Python; uv fetches the one the project needs.
    "if [ ! -x ${venv}/bin/python ] && ! command -v uv >/dev/null; then python3 -m pip install --user -q uv \
|| curl -LsSf https://astral.sh/uv/install.sh | sh; fi"
    "if [ ! -x ${venv}/bin/python ]; then uv venv --seed --python $(q "${PYTHON_VERSION}") ${venv}; fi"
    "${venv}/bin/pip install --quiet --upgrade pip"
    "${venv}/bin/pip install -e \"\$(realpath ${dir})\" $(q "jax[tpu]${JAX_VERSION:+==${JAX_VERSION}}")"
    "${venv}/bin/python -c 'import jax; print(jax.__version__, jax.local_device_count(), \"local TPU devices\")'"
  )
  if [[ -n ${BUCKET} ]]; then
    steps+=("$(mount_line)")
  fi
  local cmd step
  cmd=""
  for step in "${steps[@]}"; do
    cmd+="${cmd:+; }${step}"
  done
  remote all "${cmd}"
}

cmd_mount() {
  [[ -n ${BUCKET} ]] || die "set BUCKET=gs://bucket[/prefix] to mount"
  parse_bucket
  remote all "$(mount_line)"
}

cmd_run() {
  if [[ ${WORKDIR} == *://* ]]; then
    die "WORKDIR=${WORKDIR}: rsllm_jax.main writes its run directory with plain file I/O, which cannot target \
a bucket URL; set BUCKET=gs://bucket[/prefix] instead (mounted with gcsfuse on every worker; WORKDIR then \
defaults to a path inside the mount) or WORKDIR to a shared filesystem path every worker sees"
  fi
  [[ -n ${WORKDIR} || -n ${BUCKET} ]] || die "set BUCKET=gs://... (or WORKDIR to a directory every host sees)"
  local mount="" workdir
  if [[ -n ${BUCKET} ]]; then
    parse_bucket
    mount="$(mount_line) && "
  fi
  if [[ -n ${WORKDIR} ]]; then
    workdir=$(q "--workdir=${WORKDIR}")
  else
    workdir="--workdir=$(remote_path "${MOUNT_DIR}/${BUCKET_PREFIX:+${BUCKET_PREFIX}/}runs/${RUN_NAME}")"
  fi
  local dtype_flags=() mesh_flags=() flags a args
  read -r -a dtype_flags <<<"${DTYPE_FLAGS}"
  read -r -a mesh_flags <<<"${MESH_FLAGS}"
  # ${x[@]+"${x[@]}"}: empty arrays under `set -u` in the bash 3.2 of macOS laptops.
  flags=(--distributed ${dtype_flags[@]+"${dtype_flags[@]}"} ${mesh_flags[@]+"${mesh_flags[@]}"} "$@")
  args=" $(q "--config=${CONFIG}") ${workdir}"
  for a in "${flags[@]}"; do
    args+=" $(q "${a}")"
  done
  local log
  log=$(q "${REMOTE_LOGS}/${RUN_NAME}")
  # `exec python` keeps the shell's pid, which the pid file records for `stop`; tee keeps a per-worker log,
  # and -p keeps it (and so python) going when the ssh connection drops.
  local cmd
  cmd="set -o pipefail; ${mount}source $(q "${REMOTE_VENV}")/bin/activate && mkdir -p $(q "${REMOTE_LOGS}")"
  cmd+=" && echo \$\$ > ${log}.pid && exec > >(tee -p -a ${log}.log) 2>&1"
  cmd+=" && export RSLLM_DATA_DIR=\"\$(realpath -m $(q "${RSLLM_DATA_DIR}"))\" && cd $(q "${REMOTE_DIR}")"
  cmd+=" && echo \"[\$(hostname) \$(date -u +%FT%TZ)] starting $(q "${RUN_NAME}")\""
  cmd+=" && exec python -m rsllm_jax.main${args}"
  echo "on all workers of ${TPU_NAME}: python -m rsllm_jax.main${args}" >&2
  remote all "${cmd}"
}

cmd_logs() {
  remote "${WORKER}" "tail -n 200 -F $(q "${REMOTE_LOGS}/${RUN_NAME}.log")"
}

cmd_stop() {
  local pidfile
  pidfile=$(q "${REMOTE_LOGS}/${RUN_NAME}.pid")
  remote all "p=\$(cat ${pidfile} 2>/dev/null || true); \
if [ -n \"\$p\" ] && ps -o args= -p \"\$p\" | grep -q rsllm_jax.main; then \
kill \"\$p\" && echo \"\$(hostname): stopped \$p\"; else echo \"\$(hostname): no run\"; fi"
}

cmd_delete() {
  "${GCLOUD[@]}" delete "${TPU_NAME}" "${LOCATION[@]}" --quiet
}

main() {
  if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
  fi
  case $1 in
    -h | --help | help)
      usage
      ;;
    mount | run | logs | stop | delete)
      local sub=$1
      shift
      "cmd_${sub}" "$@"
      ;;
    create | setup)
      # `create setup` does both, in order.
      local sub
      for sub in "$@"; do
        case ${sub} in
          create | setup) "cmd_${sub}" ;;
          *) die "'${sub}' cannot follow create/setup" ;;
        esac
      done
      ;;
    *)
      echo "tpu_pod.sh: unknown subcommand '$1'" >&2
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
