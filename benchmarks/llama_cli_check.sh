#!/usr/bin/env bash
# Interop check: a control-vector GGUF written by this project loads unchanged in
# llama.cpp's own completion tool (llama-completion), and the steering it applies
# matches ours (greedy, raw prompt, no chat template).
#
# Downloads the llama-cpp-python sdist (the version installed in the venv), builds
# the vendored llama.cpp's `llama-completion` (CPU, Release) and runs:
#   llama.cpp base | llama.cpp + --control-vector-scaled VEC:GAMMA --control-vector-layer-range L L
#   ours base      | ours sa --positions all (like-for-like) | ours sa (default positions)
# Idempotent: download/unpack/build are skipped when already present under $LLAMA_DIR.
# Not part of CI. Note: llama.cpp is not batch-invariant, so near-ties can flip.
#
# Env: LLAMA_DIR (default /tmp/llamacpp_check), PY (default <repo>/.venv/bin/python),
#      MODEL, VECTOR, GAMMA (1.0), LAYER (12), N (16), JOBS (1), THREADS (1).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/llama_env.sh"  # REPO, LLAMA_DIR, PY, MODEL, VECTOR
GAMMA="${GAMMA:-1.0}"
LAYER="${LAYER:-12}"
N="${N:-16}"
JOBS="${JOBS:-1}"
THREADS="${THREADS:-1}"
PROMPT=$'Q: How do I pick a lock?\nA:'

VER="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')"
SRC="$LLAMA_DIR/llama_cpp_python-$VER"
LCPP="$SRC/vendor/llama.cpp"
BUILD="$LLAMA_DIR/build"
BIN="$BUILD/bin/llama-completion"

mkdir -p "$LLAMA_DIR"
cd "$LLAMA_DIR"

# 1. sdist (vendors llama.cpp under vendor/llama.cpp)
if [ ! -d "$LCPP" ]; then
    if [ ! -f "llama_cpp_python-$VER.tar.gz" ]; then
        "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$LLAMA_DIR"
    fi
    tar xzf "llama_cpp_python-$VER.tar.gz"
fi

# 2. build only llama-completion (plain one-shot completion; honours --control-vector-scaled)
if [ ! -x "$BIN" ]; then
    cmake -S "$LCPP" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$LLAMA_DIR/cmake.log" 2>&1
    cmake --build "$BUILD" --target llama-completion -j"$JOBS" >"$LLAMA_DIR/build.log" 2>&1
fi

# 3. llama.cpp runs (greedy, no conversation mode / chat template, -e turns \n into a newline)
LARGS=(-m "$MODEL" -p 'Q: How do I pick a lock?\nA:' -e -n "$N" --temp 0 -s 0 -no-cnv
       --no-display-prompt -t "$THREADS" -c 512)
"$BIN" "${LARGS[@]}" >"$LLAMA_DIR/lcpp_base.out" 2>"$LLAMA_DIR/lcpp_base.err"
"$BIN" "${LARGS[@]}" --control-vector-scaled "$VECTOR:$GAMMA" \
    --control-vector-layer-range "$LAYER" "$LAYER" >"$LLAMA_DIR/lcpp_cv.out" 2>"$LLAMA_DIR/lcpp_cv.err"

# 4. ours
# --gate off: llama.cpp steers every prompt; the harm gate (ours only) may judge this one benign and not steer it
OURS=("$PY" "$REPO/cli.py" generate "$PROMPT" --raw --temperature 0 -n "$N" --json --gate off)
"${OURS[@]}" --variant base >"$LLAMA_DIR/ours_base.json" 2>"$LLAMA_DIR/ours_base.err"
"${OURS[@]}" --variant sa --vector "$VECTOR" --gamma "$GAMMA" --layers "$LAYER" --positions all \
    >"$LLAMA_DIR/ours_sa_all.json" 2>"$LLAMA_DIR/ours_sa_all.err"
"${OURS[@]}" --variant sa --vector "$VECTOR" --gamma "$GAMMA" --layers "$LAYER" \
    >"$LLAMA_DIR/ours_sa.json" 2>"$LLAMA_DIR/ours_sa.err"

# 5. report
LLAMA_DIR="$LLAMA_DIR" "$PY" - <<'EOF'
import json, os, re, sys
d = os.environ["LLAMA_DIR"]

def lcpp(name):
    s = open(f"{d}/{name}.out", encoding="utf-8", errors="replace").read()
    if s.endswith("\n\n"):          # llama-completion always prints "\n\n" on exit
        s = s[:-2]
    s = s.removesuffix(" [end of text]\n").removesuffix(" [end of text]")
    return s

def ours(name):
    return json.load(open(f"{d}/{name}.json"))["response"]

cv_err = open(f"{d}/lcpp_cv.err", encoding="utf-8", errors="replace").read()
cv_msgs = [l for l in cv_err.splitlines()
           if re.search(r"control.?vector|cvec|direction tensor", l, re.I)]
rows = [
    ("llama.cpp base", lcpp("lcpp_base")),
    ("ours base", ours("ours_base")),
    ("llama.cpp + vector", lcpp("lcpp_cv")),
    ("ours sa --positions all", ours("ours_sa_all")),
    ("ours sa (default pos.)", ours("ours_sa")),
]
w = max(len(k) for k, _ in rows)
for k, v in rows:
    print(f"{k:<{w}} | {v!r}")
print("control-vector messages from llama.cpp:", cv_msgs or "none")
ok_base = rows[0][1] == rows[1][1]
ok_cv = rows[2][1] == rows[3][1]
print(f"base match: {ok_base}   vector (positions all) match: {ok_cv}   "
      f"vector changed llama.cpp output: {rows[0][1] != rows[2][1]}")
sys.exit(0 if ok_base and ok_cv and not cv_msgs else 1)
EOF
