#!/usr/bin/env bash
# Build the OAO container image from this checkout, offline: no Docker Hub, and no TLS
# needed inside containers. docs/deployment.md explains the steps.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy/build-image.sh [OPTIONS]

Builds the OAO image (./Dockerfile) the way this repository's tests do, with no image
registry and no network inside containers:

  1. base image: a Debian bookworm root made with `debootstrap --variant=minbase`
     (python3, python3-venv) and loaded with `docker import`; kept as an image and
     made again only when missing or asked (--rebuild-base);
  2. wheelhouse: every Python dependency built on the host with `pip wheel` into
     deploy/wheelhouse/ (the host's pip reaches the index, containers need not);
  3. `docker build` of ./Dockerfile on that base, installing with `pip --no-index`.

Options:
  -t, --tag TAG          image to build (default: oao:latest)
  --base-image IMAGE     build on IMAGE instead of the Debian base (e.g. the official
                         python:3.11-slim-bookworm where a registry is reachable); the
                         wheelhouse is still used
  --redis                also make the Redis image (redis-server from Debian's packages,
                         the same kind of base) that the container fleet test runs
  --redis-tag TAG        the Redis image's tag (default: oao-redis:bookworm)
  --only-redis           make only the Redis image
  --rebuild-base         run debootstrap again even if the base images exist
  --cache-dir DIR        debootstrap trees and .deb cache (default: <repo>/.cache/deploy)
  --mirror URL           Debian mirror (default: $DEBIAN_MIRROR, else
                         http://deb.debian.org/debian); behind a proxy set http_proxy
  --python PY            host Python for `pip wheel` (default: python3); its version must
                         be the base image's (3.11 for Debian bookworm)
  --check                then run `oao-scheduler run examples/blog_post.yaml` in the image
  -h, --help             show this help

Needs a running Docker daemon (Debian: apt-get install docker.io; dockerd as root) and,
for the Debian base, root and debootstrap (apt-get install debootstrap).
Prints the image's size at the end. Exit status: 0 built, 1 a step failed, 2 usage.
EOF
}

repo="$(cd "$(dirname "$0")/.." && pwd)"
tag="oao:latest"
base_image=""
redis=0
only_redis=0
redis_tag="oao-redis:bookworm"
rebuild_base=0
cache_dir="$repo/.cache/deploy"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
python="python3"
check=0
suite="bookworm"
base_tag="oao-base:bookworm"
base_packages="python3,python3-venv,ca-certificates"
redis_packages="redis-server"

while [ $# -gt 0 ]; do
  case "$1" in
    -t | --tag) tag="$2"; shift 2 ;;
    --base-image) base_image="$2"; shift 2 ;;
    --redis) redis=1; shift ;;
    --redis-tag) redis_tag="$2"; shift 2 ;;
    --only-redis) redis=1; only_redis=1; shift ;;
    --rebuild-base) rebuild_base=1; shift ;;
    --cache-dir) cache_dir="$2"; shift 2 ;;
    --mirror) mirror="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --check) check=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build-image.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '[build-image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker daemon answers (start dockerd: deploy/dockerd.sh start)"
# The Debian docker.io client has no buildx; the classic builder handles this Dockerfile.
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi

# image_label IMAGE LABEL: the label's value, empty if the image or label is missing.
image_label() {
  docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true
}

# make_debian_image TAG PACKAGES CHANGES...: debootstrap a minbase root with PACKAGES,
# strip docs and caches, and `docker import` it as TAG (skipped when TAG exists with the
# same package list, unless --rebuild-base).
make_debian_image() {
  local image="$1" packages="$2"
  shift 2
  if [ "$rebuild_base" = 0 ] && [ "$(image_label "$image" org.oao.debootstrap)" = "$suite:$packages" ]; then
    say "$image exists (debootstrap $suite with $packages)"
    return
  fi
  [ "$(id -u)" = 0 ] || die "debootstrap needs root (or pass --base-image)"
  command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
  local tree="$cache_dir/rootfs-${image//[:\/]/-}"
  mkdir -p "$cache_dir/debs"
  rm -rf "$tree"
  say "debootstrap --variant=minbase --include=$packages $suite ($mirror) -> $tree"
  debootstrap --variant=minbase --include="$packages" --cache-dir="$cache_dir/debs" \
    "$suite" "$tree" "$mirror" >"$cache_dir/debootstrap.log" 2>&1 ||
    { tail -20 "$cache_dir/debootstrap.log" >&2; die "debootstrap failed (log: $cache_dir/debootstrap.log)"; }
  rm -rf "$tree"/usr/share/doc/* "$tree"/usr/share/man/* "$tree"/usr/share/info/* \
    "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin "$tree"/var/cache/apt/archives/*.deb \
    "$tree"/var/log/*.log
  find "$tree/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
  say "docker import -> $image"
  tar --numeric-owner -C "$tree" -c . |
    docker import --change "LABEL org.oao.debootstrap=$suite:$packages" \
      --change 'ENV LANG=C.UTF-8' "$@" - "$image" >/dev/null
  rm -rf "$tree"
}

if [ "$redis" = 1 ]; then
  make_debian_image "$redis_tag" "$redis_packages" \
    --change 'USER redis' --change 'WORKDIR /var/lib/redis' \
    --change 'CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/var/lib/redis", "--appendonly", "yes", "--maxmemory-policy", "noeviction"]'
  if [ "$only_redis" = 1 ]; then exit 0; fi
fi

if [ -z "$base_image" ]; then
  make_debian_image "$base_tag" "$base_packages" --change 'CMD ["/bin/bash"]'
  base_image="$base_tag"
fi

# --- wheelhouse: built on the host, for the base image's Python version
base_py="$(docker run --rm --network none --entrypoint python3 "$base_image" \
  -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || die "$base_image has no python3"
host_py="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$base_py" = "$host_py" ] ||
  die "$python is Python $host_py but $base_image has $base_py: pass --python python$base_py"

wheelhouse="$repo/deploy/wheelhouse"
mapfile -t deps < <(cd "$repo" && "$python" -c '
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
# async-timeout: for redis-py on Python < 3.11.3 (Debian bookworm: 3.11.2); dumb-init is
# the image's init; setuptools and wheel build the project inside the image.
extra=("async-timeout>=4.0.3" "dumb-init>=1.2.5" "setuptools>=68" "wheel")
stamp="$(printf '%s\n' "$host_py" "${deps[@]}" "${extra[@]}" | sha256sum | cut -c1-16)"
if [ -f "$wheelhouse/.stamp" ] && [ "$(cat "$wheelhouse/.stamp")" = "$stamp" ]; then
  say "wheelhouse up to date ($(find "$wheelhouse" -name '*.whl' | wc -l) wheels)"
else
  say "pip wheel -> $wheelhouse"
  find "$wheelhouse" -name '*.whl' -delete
  "$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheelhouse" \
    "${deps[@]}" "${extra[@]}" || die "pip wheel failed"
  echo "$stamp" >"$wheelhouse/.stamp"
  say "wheelhouse: $(find "$wheelhouse" -name '*.whl' | wc -l) wheels"
fi

say "docker build -t $tag (base $base_image, pip --no-index, no network)"
mkdir -p "$cache_dir"
docker build --network none -t "$tag" -f "$repo/Dockerfile" \
  --build-arg BASE_IMAGE="$base_image" --build-arg PIP_ARGS="--no-index" "$repo" \
  >"$cache_dir/docker-build.log" 2>&1 ||
  { tail -30 "$cache_dir/docker-build.log" >&2; die "docker build failed (log: $cache_dir/docker-build.log)"; }

size="$(docker image inspect -f '{{.Size}}' "$tag")"
say "built $tag: $((size / 1000000)) MB"

if [ "$check" = 1 ]; then
  say "check: oao-scheduler run examples/blog_post.yaml"
  docker run --rm --network none "$tag" oao-scheduler run examples/blog_post.yaml >/dev/null ||
    die "the example run failed in $tag"
  say "check passed"
fi
