#!/usr/bin/env bash
# Build a tdist image: ./container/build.sh --framework STANDARD|VLLM|TENSORRTLLM [options]
#
# One Dockerfile (container/Dockerfile) serves the three frameworks; this script picks the base
# image for each and assembles the `docker build` command. --dry-run prints that exact command
# (shell-quoted, runnable as is) instead of running it. See docs/containers.md.
set -euo pipefail

if ((BASH_VERSINFO[0] < 4)); then
  echo "$0: error: bash >= 4 is needed (this is ${BASH_VERSION}); on macOS: brew install bash" >&2
  exit 1
fi

readonly FRAMEWORKS=(STANDARD VLLM TENSORRTLLM)
readonly DEFAULT_BASE_IMAGE=nvcr.io/nvidia/tritonserver
# Triton 26.10 (CUDA 13), matching the Dockerfile's CUDA 13 wheels (ucxx-cu13, vLLM's torch).
readonly TRITON_RELEASE=26.10
declare -A DEFAULT_BASE_IMAGE_TAG=(
  [STANDARD]="${TRITON_RELEASE}-py3"
  [VLLM]="${TRITON_RELEASE}-py3"
  [TENSORRTLLM]="${TRITON_RELEASE}-trtllm-python-py3"
)

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd -P)"
PROG="container/build.sh"

usage() {
  cat <<EOF
Usage: ${PROG} [--framework STANDARD|VLLM|TENSORRTLLM] [options]

Build a tdist container image from container/Dockerfile (build context: the repository root).

Options:
  --framework NAME       STANDARD (Triton + tdist + nats-server + etcd + ucxx), VLLM (adds vLLM)
                         or TENSORRTLLM (Triton's TensorRT-LLM image). Case-insensitive.
                         Default: STANDARD.
  --base-image IMAGE     Base image repository. Default: ${DEFAULT_BASE_IMAGE}
  --base-image-tag TAG   Base image tag. Defaults: STANDARD ${DEFAULT_BASE_IMAGE_TAG[STANDARD]},
                         VLLM ${DEFAULT_BASE_IMAGE_TAG[VLLM]}, TENSORRTLLM ${DEFAULT_BASE_IMAGE_TAG[TENSORRTLLM]}
  --tag NAME[:TAG]       Image name. Default: tdist:<version>-<framework>, e.g. tdist:$(project_version)-vllm
  --build-arg KEY=VALUE  Extra build argument (repeatable), e.g. VLLM_VERSION=0.33.0,
                         UCXX_PACKAGE=ucxx-cu12, TDIST_UID=\$(id -u), TDIST_EXTRAS=nats,etcd
  --platform PLATFORM    Target platform, e.g. linux/arm64. Default: the builder's own.
  --no-cache             Do not use the build cache.
  --dry-run              Print the docker command instead of running it.
  -h, --help             Show this help.

Examples:
  ${PROG} --framework VLLM
  ${PROG} --framework TENSORRTLLM --base-image-tag 26.09-trtllm-python-py3 --dry-run
EOF
}

die() {
  # A usage error: say what is wrong and how to fix it, exit 2 (like docker and getopt).
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
  if [[ "${opt}" == *=* ]]; then
    OPT_VALUE="${opt#*=}"
    OPT_SHIFT=1
  elif (($# > 0)) && [[ "$1" != --* ]]; then
    OPT_VALUE="$1"
    OPT_SHIFT=2
  else
    die "option '${opt}' needs a value"
  fi
  [[ -n "${OPT_VALUE}" ]] || die "option '${opt%%=*}' needs a non-empty value"
}

framework=""
base_image=""
base_image_tag=""
tag=""
platform=""
no_cache=0
dry_run=0
extra_build_args=()

while (($# > 0)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --framework | --framework=*)
      take_value "$@"; framework="${OPT_VALUE}"; shift "${OPT_SHIFT}" ;;
    --base-image | --base-image=*)
      take_value "$@"; base_image="${OPT_VALUE}"; shift "${OPT_SHIFT}" ;;
    --base-image-tag | --base-image-tag=*)
      take_value "$@"; base_image_tag="${OPT_VALUE}"; shift "${OPT_SHIFT}" ;;
    --tag | --tag=*)
      take_value "$@"; tag="${OPT_VALUE}"; shift "${OPT_SHIFT}" ;;
    --platform | --platform=*)
      take_value "$@"; platform="${OPT_VALUE}"; shift "${OPT_SHIFT}" ;;
    --build-arg | --build-arg=*)
      take_value "$@"; shift "${OPT_SHIFT}"
      [[ "${OPT_VALUE}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
        die "--build-arg wants KEY=VALUE (KEY a letter or _ then letters, digits, _), got '${OPT_VALUE}'"
      case "${OPT_VALUE%%=*}" in
        FRAMEWORK) die "set the framework with --framework, not --build-arg FRAMEWORK=..." ;;
        BASE_IMAGE) die "set the base image with --base-image, not --build-arg BASE_IMAGE=..." ;;
        BASE_IMAGE_TAG) die "set the base image tag with --base-image-tag, not --build-arg BASE_IMAGE_TAG=..." ;;
      esac
      extra_build_args+=(--build-arg "${OPT_VALUE}")
      ;;
    --no-cache)
      no_cache=1; shift ;;
    --dry-run)
      dry_run=1; shift ;;
    --no-cache=* | --dry-run=* | -h=* | --help=*)
      die "option '${1%%=*}' takes no value" ;;
    *)
      die "unknown option '$1'" ;;
  esac
done

framework_given="${framework:-STANDARD}"
framework="${framework_given^^}"
known=0
for name in "${FRAMEWORKS[@]}"; do
  [[ "${framework}" == "${name}" ]] && known=1
done
((known)) || die "unknown framework '${framework_given}'; choose one of: ${FRAMEWORKS[*]}"
base_image="${base_image:-${DEFAULT_BASE_IMAGE}}"
base_image_tag="${base_image_tag:-${DEFAULT_BASE_IMAGE_TAG[${framework}]}}"
tag="${tag:-tdist:$(project_version)-${framework,,}}"
for value in "${base_image}" "${base_image_tag}" "${tag}" "${platform}"; do
  if [[ "${value}" =~ [[:space:]] ]]; then
    die "image names, tags and platforms cannot hold whitespace: '${value}'"
  fi
done
if [[ "${base_image}" == *:* && "${base_image}" != *:*/* ]]; then
  die "--base-image '${base_image}' holds a tag; give the tag with --base-image-tag"
fi

cmd=(docker build
  --file "${REPO_ROOT}/container/Dockerfile"
  --target runtime
  --build-arg "BASE_IMAGE=${base_image}"
  --build-arg "BASE_IMAGE_TAG=${base_image_tag}"
  --build-arg "FRAMEWORK=${framework}")
cmd+=("${extra_build_args[@]}")
if ((no_cache)); then cmd+=(--no-cache); fi
if [[ -n "${platform}" ]]; then cmd+=(--platform "${platform}"); fi
cmd+=(--tag "${tag}" "${REPO_ROOT}")

if ((dry_run)); then
  print_command "${cmd[@]}"
  exit 0
fi

if ! command -v docker >/dev/null 2>&1; then
  echo "${PROG}: error: 'docker' not found on PATH; install Docker (>= 23, with buildx) or use --dry-run" >&2
  exit 127
fi
if ! docker buildx version >/dev/null 2>&1; then
  echo "${PROG}: error: the Dockerfile needs BuildKit, but 'docker buildx' is missing; install the" \
    "buildx plugin (Debian/Ubuntu: docker-buildx-plugin or docker-buildx)" >&2
  exit 1
fi
echo "Building ${tag} (${framework}) from ${base_image}:${base_image_tag}" >&2
exec "${cmd[@]}"
