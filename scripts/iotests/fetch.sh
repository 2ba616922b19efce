#!/bin/sh
# Fetch QEMU's iotests matching the installed QEMU (Debian's `qemu` source package) into a cache.
# deb-src entries are derived from the machine's own apt sources (deb822 or one-line), and used
# through a private apt configuration: nothing under /etc is changed, nothing is committed.
#   scripts/iotests/fetch.sh [CACHE_DIR]     (default: ~/.cache/blockmirror-iotests)
# Prints the path of the unpacked source tree's tests/qemu-iotests directory.
set -eu
CACHE=${1:-${BLOCKMIRROR_IOTESTS_CACHE:-$HOME/.cache/blockmirror-iotests}}
VERSION=$(dpkg-query -W -f='${source:Version}' qemu-utils 2>/dev/null || true)
[ -n "$VERSION" ] || { echo "fetch.sh: qemu-utils is not installed" >&2; exit 1; }
TREE="$CACHE/qemu-${VERSION#*:}"
if [ -f "$TREE/.complete" ]; then echo "$TREE/tests/qemu-iotests"; exit 0; fi
mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/sources.list.d" "$CACHE/dl"
SRC="$CACHE/apt/sources.list.d/deb-src.sources"
: > "$SRC"
# deb822 files: the same stanzas with Types: deb-src
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  sed -n 's/^Types:.*\bdeb\b.*/Types: deb-src/; p' "$f" >> "$SRC"; echo >> "$SRC"
done
# one-line files: deb -> deb-src
LIST="$CACHE/apt/sources.list"
: > "$LIST"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] || continue
  sed -n 's/^deb \(.*\)/deb-src \1/p' "$f" >> "$LIST"
done
APT="-o Dir::Etc::SourceList=$LIST -o Dir::Etc::SourceParts=$CACHE/apt/sources.list.d \
 -o Dir::State::Lists=$CACHE/apt/lists -o Dir::Cache=$CACHE/apt/cache \
 -o APT::Sandbox::User=root -o Debug::NoLocking=1"
mkdir -p "$CACHE/apt/cache/archives/partial"
# shellcheck disable=SC2086
apt-get -qq $APT update >&2
cd "$CACHE/dl"
# shellcheck disable=SC2086
apt-get -qq $APT source --download-only "qemu=$VERSION" >&2
rm -rf "$TREE.tmp"
dpkg-source --no-check -x qemu_*.dsc "$TREE.tmp" >&2
rm -rf "$TREE"
mv "$TREE.tmp" "$TREE"
touch "$TREE/.complete"
echo "$TREE/tests/qemu-iotests"
