#!/usr/bin/env bash
# Full disk while replacing a vector (issue 22): on a small tmpfs that a filler file has all but filled, a vector
# written by this tool is replaced by a larger one with `safeinfer vectors convert`. The command must fail with one
# line, and the previous vector must be byte for byte what it was and still load: in our tool (`generate --variant
# sa`) and in llama.cpp's own `llama-completion` (--control-vector-scaled), which benchmarks/llama_cli_check.sh
# builds from the vendored llama.cpp (run that first; it leaves the binary in $LLAMA_DIR/build/bin).
#
# Needs root (mount). Not part of CI (the tmpfs tests in tests/test_files.py are). Output: a transcript on stdout.
# Env: LLAMA_DIR (default /tmp/llamacpp_check), PY (default <repo>/.venv/bin/python), MODEL, VECTOR.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/llama_env.sh"  # REPO, LLAMA_DIR, PY, MODEL, VECTOR
BIN="$LLAMA_DIR/build/bin/llama-completion"
[ -x "$BIN" ] || { echo "no $BIN: run benchmarks/llama_cli_check.sh first" >&2; exit 2; }

WORK="$(mktemp -d)"
DISK="$WORK/disk"
mkdir -p "$DISK"
mount -t tmpfs -o size=256k tmpfs "$DISK"
trap 'umount "$DISK" 2>/dev/null || umount -l "$DISK"; rm -rf "$WORK"' EXIT
SI=("$PY" "$REPO/cli.py")

echo "## the previous vector: the shipped one, copied by our tool onto a 256 KiB tmpfs"
"${SI[@]}" vectors convert "$VECTOR" --out "$DISK/sv.gguf"
BEFORE="$(sha256sum "$DISK/sv.gguf" | cut -d' ' -f1)"
echo "sv.gguf: $(stat -c %s "$DISK/sv.gguf") bytes, sha256 $BEFORE"
# a larger vector to replace it with: every block of the model (18 x 640 floats), and a disk left with less room
"$PY" -c "import numpy as np; np.save('$WORK/big.npy', np.vstack([np.zeros((1, 640)), np.ones((17, 640))]).astype(np.float32))"
AVAIL=$(df --output=avail -B1 "$DISK" | tail -1)
head -c $((AVAIL - 8192)) /dev/zero > "$DISK/filler" || true
echo "free on the tmpfs now: $(df --output=avail -B1 "$DISK" | tail -1) bytes"

echo
echo "## replace it on the full disk"
set +e
"${SI[@]}" vectors convert "$WORK/big.npy" --out "$DISK/sv.gguf" 2>"$WORK/err"
RC=$?
set -e
echo "exit code: $RC"
echo "stderr ($(wc -l <"$WORK/err") line(s)): $(cat "$WORK/err")"
AFTER="$(sha256sum "$DISK/sv.gguf" | cut -d' ' -f1)"
echo "sv.gguf: $(stat -c %s "$DISK/sv.gguf") bytes, sha256 $AFTER ($([ "$BEFORE" = "$AFTER" ] && echo unchanged || echo CHANGED))"
echo "files on the tmpfs: $(ls -A "$DISK" | tr '\n' ' ')"

echo
echo "## the previous vector still loads: our tool"
"${SI[@]}" generate $'Q: How do I pick a lock?\nA:' --raw -t 0 -n 12 --variant sa --gate off --vector "$DISK/sv.gguf" --json \
    | "$PY" -c "import json, sys; r = json.load(sys.stdin); print('ours sa:', repr(r['response']))"

echo
echo "## the previous vector still loads: llama.cpp's llama-completion"
set +e
"$BIN" -m "$MODEL" -p 'Q: How do I pick a lock?\nA:' -e -n 12 --temp 0 -s 0 -no-cnv --no-display-prompt -t 2 -c 512 \
    --control-vector-scaled "$DISK/sv.gguf:0.5" --control-vector-layer-range 12 12 >"$WORK/lc.out" 2>"$WORK/lc.err"
LRC=$?
set -e
echo "llama-completion exit code: $LRC"
echo "llama-completion output: $(head -c 200 "$WORK/lc.out" | tr '\n' ' ')"
echo "control-vector lines on its stderr: $(grep -ci 'control.vector\|cvec' "$WORK/lc.err" || true)"
grep -i 'control.vector\|cvec' "$WORK/lc.err" | head -5 || true

[ "$RC" -ne 0 ] && [ "$(wc -l <"$WORK/err")" -eq 1 ] && [ "$BEFORE" = "$AFTER" ] && [ "$LRC" -eq 0 ]
echo
echo "OK: one line, non-zero exit, the previous vector unchanged and loading in both tools"
