#!/usr/bin/env bash
# Build Horovod 0.28.1 from its PyPI sdist against the venv's torch (PyTorch + MPI + Gloo),
# cache the wheel, and install it. A cached wheel for the same torch/Python makes this take seconds.
#
# Why a patch: Horovod 0.28.1 pins C++14 in its CMake files, while torch >= 2.1 needs C++17
# and torch 2.14 needs C++20 for extensions. We raise the top level to 17 and the torch
# extension to 20 (17 for torch < 2.14).
#
# Env: VENV (default .venv), HOROVOD_CACHE (default ~/.cache/hpc-uc/wheels),
#      HOROVOD_GPU_OPERATIONS (set to NCCL on GPU clusters), CUDA_HOME.
set -euo pipefail
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
HVD_VERSION=0.28.1
CACHE=${HOROVOD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpc-uc/wheels}

torch_ver=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
py_tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
gpu_ops=${HOROVOD_GPU_OPERATIONS:-none}
key="torch${torch_ver}-${py_tag}-gpu${gpu_ops}"
slot="$CACHE/horovod-$HVD_VERSION-$key"

if "$PY" -c "import horovod.torch" 2>/dev/null \
   && [ -f "$VENV/.horovod-key" ] && [ "$(cat "$VENV/.horovod-key")" = "$key" ]; then
  echo "horovod $HVD_VERSION already installed for $key"
  exit 0
fi

mkdir -p "$slot"
wheel=$(ls "$slot"/horovod-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  echo "building horovod $HVD_VERSION for $key (about 5 minutes; cached afterwards in $slot)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$work" 2>/dev/null
  tar xzf "$work/horovod-$HVD_VERSION.tar.gz" -C "$work"
  src="$work/horovod-$HVD_VERSION"
  torch_std=20
  case "$torch_ver" in 2.1[0-3].*|2.[1-9].*) torch_std=17 ;; esac
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt"
  sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $torch_std)/" "$src/horovod/torch/CMakeLists.txt"
  # PyPI's torch is a CUDA build: its CMake config needs the CUDA toolkit root, which is
  # not always where the nvcc on PATH lives.
  if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
  if [ -n "${CUDA_HOME:-}" ]; then export CUDAToolkit_ROOT="$CUDA_HOME"; fi
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
  export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export HOROVOD_CPU_OPERATIONS=${HOROVOD_CPU_OPERATIONS:-MPI}
  if [ "$gpu_ops" = none ]; then unset HOROVOD_GPU_OPERATIONS; fi
  export MAKEFLAGS="-j$(nproc)"
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$src" > "$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log"; echo "error: horovod build failed (log above)" >&2; exit 1; }
  cp "$work"/dist/horovod-*.whl "$slot/"
  wheel=$(ls "$slot"/horovod-*.whl | head -n1)
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$wheel"
"$PY" -c "import horovod.torch as hvd; assert hvd.mpi_built() and hvd.gloo_built(), 'horovod lacks MPI or Gloo'"
echo "$key" > "$VENV/.horovod-key"
echo "horovod $HVD_VERSION installed from $wheel"
