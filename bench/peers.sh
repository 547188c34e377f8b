#!/usr/bin/env bash
# bench/peers.sh [--runs N] [--warmup N] [--seed S] [--json FILE] [--attention] [--peers-only]
#                      [--no-build] [--rebuild-venv]
# bench/peers.sh --decoder [--runs N] [--vkg-runs N] [--batches 1,8] [--json FILE] [--no-build]
#   the Transfuser decoder instead (bench/peers/decoder.py): dense nn.TransformerDecoder in ncnn Vulkan,
#   onnxruntime and PyTorch against vkg's MoE decoder, p50/p99, dispatches and barriers per run.
#
# DINOv2 ViT-S/14 (224x224, batch 1, fp32, random weights from a fixed seed) timed on this machine in one
# run: ncnn Vulkan fp32 (pnnx-converted; lavapipe), onnxruntime CPU, PyTorch CPU (Debian's torch 1.13) and
# vkg (`vkg bench`), each output checked against PyTorch. Details: bench/peers/README.md.
# Sets up build/peers-venv once (Debian python3 + system site packages, numpy<2 pinned).
# Exit status: 0 ok; 1 a step failed; 3 vkg could not be measured (peers' table still printed);
# 4 a runtime's output disagreed with PyTorch.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/build/peers-venv
dl=$root/build/peers-dl
py=/usr/bin/python3
# Versions verified with Debian 12's torch 1.13.0 / NumPy 1.24.2 (onnxruntime is built against NumPy 2's
# ABI but imports and runs under NumPy 1.24; numpy<2 is a constraint on every install).
pins=("ncnn==1.0.20261020" "pnnx==20261020" "onnxruntime==1.32.0")

die() { echo "peers.sh: ERROR: $*" >&2; exit 1; }

args=()
no_build=0
driver=run.py
for a in "$@"; do
    case $a in
        --decoder) driver=decoder.py ;;
        --rebuild-venv) rm -rf "$venv" ;;
        --no-build) no_build=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exec "$py" "$root/bench/peers/run.py" --help ;;
        *) args+=("$a") ;;
    esac
done

[ -x "$py" ] || die "$py not found (Debian's python3 with python3-torch is required)"
"$py" -c 'import torch, numpy; assert numpy.__version__ < "2"' 2>/dev/null \
    || die "$py lacks torch or has NumPy >= 2 (need Debian's python3-torch and python3-numpy 1.x)"

if [ ! -f "$venv/.peers-ok" ]; then
    echo "peers.sh: creating $venv" >&2
    rm -rf "$venv"
    "$py" -m venv --system-site-packages "$venv" || die "venv creation failed"
    mkdir -p "$dl"
    echo "numpy<2" > "$venv/constraints.txt"
    pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
    "${pip[@]}" download --no-deps -d "$dl" "${pins[@]}" || die "downloading ${pins[*]} failed"
    # ncnn, onnxruntime with their dependencies (numpy stays Debian's 1.x); pnnx without (its only
    # dependency is torch, which must stay Debian's 1.13).
    "${pip[@]}" install -c "$venv/constraints.txt" --find-links "$dl" "${pins[0]}" "${pins[2]}" \
        || die "pip install ncnn onnxruntime failed"
    "${pip[@]}" install --no-deps --find-links "$dl" "${pins[1]}" || die "pip install pnnx failed"
    "$venv/bin/python" - <<'EOF' || die "the venv does not import torch 1.13 + numpy 1.x + ncnn + onnxruntime + pnnx"
import numpy, torch, ncnn, onnxruntime, pnnx, os
assert numpy.__version__ < "2", numpy.__version__
assert torch.__version__.startswith("1.13"), torch.__version__
assert os.access(pnnx.EXEC_PATH, os.X_OK), pnnx.EXEC_PATH
EOF
    touch "$venv/.peers-ok"
fi

# vkg: an incremental Release build (a no-op when up to date) so the binary knows the exporter's ops.
if [[ " ${args[*]-} " != *" --peers-only "* && " ${args[*]-} " != *" --attention "* && $no_build == 0 ]]; then
    mkdir -p "$root/build/release"
    bash "$root/scripts/build.sh" "$root/build/release" -DCMAKE_BUILD_TYPE=Release >&2 \
        || die "vkg build failed (bash scripts/build.sh build/release -DCMAKE_BUILD_TYPE=Release)"
fi

cd "$root"
exec "$venv/bin/python" "$root/bench/peers/$driver" ${args[@]+"${args[@]}"}
