#!/usr/bin/env bash
# Installs, idempotently, every Debian package that building, testing and the samples need.
# Safe to run again: packages already present are skipped without touching apt's lists.
set -euo pipefail

PKGS=(
  build-essential cmake ninja-build clang libclang-rt-14-dev pkg-config
  libvulkan-dev vulkan-tools mesa-vulkan-drivers
  glslang-tools spirv-tools vulkan-validationlayers
  python3 python3-numpy python3-torch python3-torchvision python3-pip
  libstb-dev libcjson-dev
)

# PyPI packages for the tests, installed without dependencies next to Debian's PyTorch (never into
# the system site): timm and Hugging Face transformers, the independent DINOv2 implementations the
# exporter is compared against (transformers 4.40 is the newest that runs on PyTorch 1.13), with the
# modules transformers imports, pinned.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYDEPS="$ROOT/build/pydeps"
PYPI_PKGS=(timm==1.0.31 transformers==4.40.2 huggingface_hub==0.23.4 safetensors==0.4.3 tokenizers==0.19.1
           regex==2026.11.19 filelock==4.3.1 tqdm==4.70.1 packaging==26.4 pyyaml==6.0.4 requests==2.34.2)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PKGS[@]} Debian packages present"
else
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

stamp="$PYDEPS/.installed-$(printf '%s ' "${PYPI_PKGS[@]}" | md5sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  echo "setup: PyPI test packages present in build/pydeps"
else
  echo "setup: installing ${PYPI_PKGS[*]} into build/pydeps"
  rm -rf "$PYDEPS"
  mkdir -p "$PYDEPS"
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    /usr/bin/python3 -m pip install -q --no-deps --target "$PYDEPS" "${PYPI_PKGS[@]}"
  touch "$stamp"
fi
