#!/usr/bin/env bash
# Build the LIFL image without Docker and without pulling a base image: a Debian bookworm root
# made by debootstrap becomes the base (its python3 is 3.11, like python:3.11-slim-bookworm),
# then buildah builds deploy/Dockerfile on it (vfs storage, chroot isolation: no daemon, no
# privileges beyond root in this machine). Optional; CI does not run it.
#
#   sudo apt-get install buildah debootstrap
#   sudo bash deploy/build-image.sh [core|ray]            # -> localhost/lifl:0.1.0[-ray]
#   sudo buildah --storage-driver vfs push localhost/lifl:0.1.0 docker-archive:lifl.tar   # for `kind load image-archive`
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-core}"
case "$extras" in core) tag=0.1.0; arg="" ;; ray) tag=0.1.0-ray; arg=ray ;;
    *) echo "usage: $0 [core|ray]" >&2; exit 2 ;; esac
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
bh=(buildah --storage-driver vfs)
base=localhost/lifl-base:bookworm
if ! "${bh[@]}" inspect --type image "$base" >/dev/null 2>&1; then
    root="$(mktemp -d)"
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$root" "$mirror"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    ctr="$("${bh[@]}" from scratch)"
    mnt="$("${bh[@]}" mount "$ctr")"
    cp -a "$root"/. "$mnt"/
    "${bh[@]}" umount "$ctr"
    "${bh[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$ctr"
    "${bh[@]}" commit --rm "$ctr" "$base"
fi
# RUN steps trust what this machine trusts (a proxy's CA, say); nothing of it enters the image
ca="${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
vols=()
if [ -f "$ca" ]; then
    pipconf="$(mktemp)"
    trap 'rm -f "$pipconf"' EXIT
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$pipconf"
    vols=(--volume "$ca:/etc/ssl/certs/ca-certificates.crt:ro" --volume "$pipconf:/etc/pip.conf:ro")
fi
"${bh[@]}" build --isolation chroot --layers=false "${vols[@]}" -f deploy/Dockerfile \
    --build-arg PYTHON_IMAGE="$base" --build-arg LIFL_EXTRAS="$arg" -t "localhost/lifl:$tag" .
echo "built localhost/lifl:$tag"
