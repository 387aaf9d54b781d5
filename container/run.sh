#!/usr/bin/env bash
# Run a tdist image: ./container/run.sh [-it] [--mount-workspace] [--gpus] [options] [-- COMMAND...]
#
# Assembles one `docker run` with the settings a distributed-inference container wants (host
# network and IPC for NATS/UCX/NCCL, unlimited locked memory for RDMA registration) and passes
# HF_TOKEN, NATS_SERVER and ETCD_ENDPOINTS through by name when they are set, so their values
# never appear in the printed command or the process list. --dry-run prints the exact command.
set -euo pipefail

if ((BASH_VERSINFO[0] < 4)); then
  echo "$0: error: bash >= 4 is needed (this is ${BASH_VERSION}); on macOS: brew install bash" >&2
  exit 1
fi

readonly FRAMEWORKS=(STANDARD VLLM TENSORRTLLM)
readonly PASSTHROUGH_ENV=(HF_TOKEN NATS_SERVER ETCD_ENDPOINTS)

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd -P)"
PROG="container/run.sh"

usage() {
  cat <<EOF
Usage: ${PROG} [options] [-- COMMAND [ARG...]]

Run a tdist container (built by container/build.sh). Without COMMAND the image's default (a shell).

Options:
  -it                    Interactive with a terminal (docker run -it).
  --mount-workspace      Mount this repository at /workspace (also the working directory, and on
                         PYTHONPATH so the mounted tdist sources win) and the host's /tmp at /tmp.
  --gpus [SPEC]          Expose GPUs: all of them by default, or SPEC as docker takes it
                         (e.g. --gpus device=0,1 or --gpus=2).
  --framework NAME       STANDARD, VLLM or TENSORRTLLM: picks the default image
                         tdist:<version>-<framework> (default STANDARD, e.g. tdist:$(project_version)-standard).
  --image IMAGE          Image to run (overrides --framework's default).
  --name NAME            Container name.
  --network NAME         Docker network. Default: host (NATS, etcd and peers reachable as on the host).
  --user UID[:GID]       Run as this user instead of the image's (tdist, uid 1000).
  -e, --env KEY[=VALUE]  Extra environment variable (repeatable); KEY alone passes the host's value.
  -v, --volume SRC:DST   Extra bind mount or volume (repeatable).
  --dry-run              Print the docker command instead of running it.
  -h, --help             Show this help.

Passed through by name when set on the host: ${PASSTHROUGH_ENV[*]}.

Examples:
  ${PROG} -it --mount-workspace
  ${PROG} --framework VLLM --gpus -it --mount-workspace -- tdist deploy graphs/llm_vllm_monolith.yaml
EOF
}

die() {
  echo "${PROG}: error: $*" >&2
  echo "Run '${PROG} --help' for usage." >&2
  exit 2
}

project_version() {
  local version
  version="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "${REPO_ROOT}/pyproject.toml" 2>/dev/null | head -n 1)"
  echo "${version:-dev}"
}

# Quote one word for a POSIX shell, leaving plain words bare so the printed command stays readable.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

print_command() {
  local first=1 word
  for word in "$@"; do
    if ((first)); then first=0; else printf ' '; fi
    quote "${word}"
  done
  printf '\n'
}

# Fetch the value of an option given as "--opt VALUE" or "--opt=VALUE".
# Sets OPT_VALUE and OPT_SHIFT (how many words the option used).
take_value() {
  local opt="$1"
  shift
  if [[ "${opt}" == --*=* ]]; then
    OPT_VALUE="${opt#*=}"
    OPT_SHIFT=1
  elif (($# > 0)) && [[ "$1" != -* ]]; then
    OPT_VALUE="$1"
    OPT_SHIFT=2
  else
    die "option '${opt}' needs a value"
  fi
  [[ -n "${OPT_VALUE}" ]] || die "option '${opt%%=*}' needs a non-empty value"
}

interactive=0
mount_workspace=0
gpus=""
framework=""
image=""
name=""
network="host"
user=""
dry_run=0
extra_env=()
extra_volumes=()
command_args=()

while (($# > 0)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    -it | -ti)
      interactive=1; shift ;;
    --mount-workspace)
      mount_workspace=1; shift ;;
    --gpus=*)
      take_value "$@"; gpus="${OPT_VALUE}"; shift ;;
    --gpus)
      # The value is optional: the next word is the GPU spec unless it is another option.
      if (($# > 1)) && [[ -n "$2" && "$2" != -* ]]; then
        gpus="$2"; shift 2
      else
        gpus="all"; shift
      fi
      ;;
    --framework | --framework=*)
      take_value "$@"; framework="${OPT_VALUE}"; shift "${OPT_SHIFT}" ;;
    --image | --image=*)
      take_value "$@"; image="${OPT_VALUE}"; shift "${OPT_SHIFT}" ;;
    --name | --name=*)
      take_value "$@"; name="${OPT_VALUE}"; shift "${OPT_SHIFT}" ;;
    --network | --network=*)
      take_value "$@"; network="${OPT_VALUE}"; shift "${OPT_SHIFT}" ;;
    --user | --user=*)
      take_value "$@"; user="${OPT_VALUE}"; shift "${OPT_SHIFT}" ;;
    -e | --env | --env=*)
      take_value "$@"; shift "${OPT_SHIFT}"
      [[ "${OPT_VALUE}" =~ ^[A-Za-z_][A-Za-z0-9_]*(=|$) ]] ||
        die "--env wants KEY or KEY=VALUE (KEY a letter or _ then letters, digits, _), got '${OPT_VALUE}'"
      extra_env+=(-e "${OPT_VALUE}")
      ;;
    -v | --volume | --volume=*)
      take_value "$@"; shift "${OPT_SHIFT}"
      [[ "${OPT_VALUE}" == ?*:?* ]] || die "--volume wants SRC:DST[:OPTIONS], got '${OPT_VALUE}'"
      extra_volumes+=(-v "${OPT_VALUE}")
      ;;
    --dry-run)
      dry_run=1; shift ;;
    --)
      shift
      (($# > 0)) || die "'--' must be followed by a command"
      command_args=("$@")
      break
      ;;
    -i | -t | --interactive | --tty)
      die "use '-it' for an interactive terminal (got '$1')" ;;
    --mount-workspace=* | --dry-run=* | -it=* | --help=*)
      die "option '${1%%=*}' takes no value" ;;
    -*)
      die "unknown option '$1'" ;;
    *)
      die "unexpected argument '$1'; put the command after '--', e.g. ${PROG} -- $*" ;;
  esac
done

if [[ -n "${framework}" ]]; then
  known=0
  for fw in "${FRAMEWORKS[@]}"; do
    [[ "${framework^^}" == "${fw}" ]] && known=1
  done
  ((known)) || die "unknown framework '${framework}'; choose one of: ${FRAMEWORKS[*]}"
fi
framework="${framework:-STANDARD}"
framework="${framework^^}"
image="${image:-tdist:$(project_version)-${framework,,}}"
if [[ "${image}" =~ [[:space:]] ]]; then
  die "the image name cannot hold whitespace: '${image}'"
fi

cmd=(docker run --rm)
if ((interactive)); then cmd+=(-it); fi
cmd+=(--network "${network}")
# Host IPC: shared memory for UCX/NCCL between containers on one node (docker's default is 64 MB).
# Unlimited memlock: RDMA memory registration; a large stack as NCCL and Triton recommend.
cmd+=(--ipc host --ulimit memlock=-1 --ulimit stack=67108864)
# docker splits --gpus on commas, so a device list must reach it inside double quotes.
if [[ "${gpus}" == device=*,* ]]; then gpus="\"${gpus}\""; fi
if [[ -n "${gpus}" ]]; then cmd+=(--gpus "${gpus}"); fi
if [[ -n "${name}" ]]; then cmd+=(--name "${name}"); fi
if [[ -n "${user}" ]]; then cmd+=(--user "${user}"); fi
for var in "${PASSTHROUGH_ENV[@]}"; do
  # Set (even to ""), passed by name: docker reads the value from this environment.
  if [[ -n "${!var+set}" ]]; then cmd+=(-e "${var}"); fi
done
cmd+=("${extra_env[@]}")
if ((mount_workspace)); then
  cmd+=(-v "${REPO_ROOT}:/workspace" -v /tmp:/tmp -w /workspace -e PYTHONPATH=/workspace)
fi
cmd+=("${extra_volumes[@]}")
cmd+=("${image}")
cmd+=("${command_args[@]}")

if ((dry_run)); then
  print_command "${cmd[@]}"
  exit 0
fi

if ! command -v docker >/dev/null 2>&1; then
  echo "${PROG}: error: 'docker' not found on PATH; install Docker or use --dry-run" >&2
  exit 127
fi
exec "${cmd[@]}"
