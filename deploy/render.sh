#!/usr/bin/env bash
# Prints deploy manifests with their image placeholder filled in, so the image
# reference lives in one place (deploy/image.env plus the workspace version)
# instead of being repeated in every `image:` line.
#
#   deploy/render.sh [--image REF] [FILE...]   (default FILE: deploy/evio-cni.yaml)
#   deploy/render.sh deploy/evio-cni.yaml | kubectl apply -f -
#
# REF defaults to $EVIO_IMAGE, else $EVIO_IMAGE_REPO:<workspace version> from
# deploy/image.env: the tag deploy/build-image.sh gives the image it builds.
# Without rendering, a manifest's `image: EVIO_IMAGE` is not a valid image
# name (upper case), so the kubelet refuses it (InvalidImageName) instead of
# pulling some other image.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=image.env
. "$repo/deploy/image.env"
version=$(awk -F'"' '/^\[workspace.package\]/{p=1;next} /^\[/{p=0} p && /^version *=/{print $2; exit}' "$repo/Cargo.toml")
[ -n "$version" ] || { echo "render: no version in [workspace.package] of $repo/Cargo.toml" >&2; exit 1; }
image=${EVIO_IMAGE:-$EVIO_IMAGE_REPO:$version}

files=()
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image=${2:?--image needs a reference}; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "render: unknown option: $1" >&2; exit 2 ;;
    *) files+=("$1"); shift ;;
  esac
done
[ "${#files[@]}" -gt 0 ] || files=("$repo/deploy/evio-cni.yaml")
# A reference with sed metacharacters or spaces would corrupt the output.
case "$image" in
  *[!A-Za-z0-9./:_@-]*|"") echo "render: not an image reference: '$image'" >&2; exit 2 ;;
esac

first=1
for f in "${files[@]}"; do
  grep -Eq '^[[:space:]]*image:[[:space:]]*EVIO_IMAGE[[:space:]]*$' "$f" \
    || { echo "render: $f has no 'image: EVIO_IMAGE' line" >&2; exit 1; }
  # Several files form one stream for `kubectl apply -f -`.
  [ "$first" = 1 ] || echo "---"
  first=0
  sed -E "s|^([[:space:]]*image:[[:space:]]*)EVIO_IMAGE[[:space:]]*\$|\1$image|" "$f"
done
