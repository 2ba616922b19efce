#!/bin/sh
# `make iotests`: QEMU's own iotests that start a storage daemon, run against blockmirror.
#
# The iotests come from the installed QEMU's Debian source package (fetch.sh, cached, never
# committed) and run unmodified through their own ./check -qcow2, with QSD_PROG pointing at
# blockmirror and the system's qemu-img/qemu-io/qemu-nbd. Debian's qemu-system-x86_64 lacks
# the qtest accelerator iotests ask for, so QEMU_PROG is a wrapper that asks for TCG instead
# (tests that start a VM need it; without qemu-system installed they fail, and say why).
#
#   scripts/iotests/run.sh [TEST...]    default: qsd-jobs graph-changes-while-io 281 185
#   QSD=qemu-storage-daemon scripts/iotests/run.sh ...   the real QSD instead, for comparison
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${BLOCKMIRROR_PYTHON:-$ROOT/.venv/bin/python}
CACHE=${BLOCKMIRROR_IOTESTS_CACHE:-$HOME/.cache/blockmirror-iotests}
IOTESTS=$(sh "$ROOT/scripts/iotests/fetch.sh" "$CACHE")
WORK="$CACHE/work"
rm -rf "$WORK/scratch"
mkdir -p "$WORK/bin" "$WORK/scratch"
SOCK_DIR=$(mktemp -d /tmp/bm-iotests-XXXXXX)
trap 'rm -rf "$SOCK_DIR"' EXIT

if [ "${QSD:-}" = qemu-storage-daemon ]; then
  QSD_PROG=$(command -v qemu-storage-daemon)
else
  # named like QSD so that its messages start with "qemu-storage-daemon:" as .out files expect
  QSD_PROG="$WORK/bin/qemu-storage-daemon"
  cat > "$QSD_PROG" <<EOF
#!$PY
import sys
from blockmirror.cli.main import main
sys.exit(main(["daemon", *sys.argv[1:]]))
EOF
  chmod +x "$QSD_PROG"
fi

REAL_QEMU=$(command -v qemu-system-x86_64 || true)
QEMU_WRAP="$WORK/bin/qemu-system-x86_64"
if [ -n "$REAL_QEMU" ]; then
  cat > "$QEMU_WRAP" <<EOF
#!/bin/sh
# Debian's qemu-system-x86_64 has no qtest accelerator: ask for TCG instead
for a; do shift; [ "\$a" = qtest ] && a=tcg; set -- "\$@" "\$a"; done
exec $REAL_QEMU "\$@"
EOF
else
  cat > "$QEMU_WRAP" <<'EOF'
#!/bin/sh
# qemu-system-x86_64 is not installed: enough for testenv.py, not for tests that start a VM
case "$*" in *"-machine help"*) echo "pc-i440fx-7.2 Standard PC (default)"; exit 0;; esac
echo "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)" >&2
exit 1
EOF
fi
chmod +x "$QEMU_WRAP"

[ $# -gt 0 ] || set -- qsd-jobs graph-changes-while-io 281 185
cd "$IOTESTS"
export QSD_PROG QEMU_PROG="$QEMU_WRAP" SOCK_DIR TEST_DIR="$WORK/scratch"
export QEMU_IMG_PROG="$(command -v qemu-img)" QEMU_IO_PROG="$(command -v qemu-io)"
export QEMU_NBD_PROG="$(command -v qemu-nbd)"
echo "iotests: $IOTESTS"
echo "QSD_PROG=$QSD_PROG"
# ./check exits non-zero if any test failed; the summary lines say which
exec python3 ./check -qcow2 "$@"
