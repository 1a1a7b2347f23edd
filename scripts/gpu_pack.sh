#!/usr/bin/env bash
# Builds the GPU binaries on a machine without a GPU (nvcc only) and packs them, stripped, with the
# shared libraries they need beyond the C/C++ runtime, into .cudarun/pack.tar.gz — the folder a GPU session
# carries to the device machine (the device tool's carry: [".cudarun"]; keep it under 64 MiB), where
# scripts/gpu_check.sh runs them. NCCL is not packed (218 MB): the nccl transport loads
# libnccl.so.2 at run time from the device's CUDA install.
#
#   scripts/gpu_pack.sh [--arch 90] [--build DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCH=90
BUILD="$ROOT/build-devpack"
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=$2; shift 2 ;;
    --build) BUILD=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "gpu_pack.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
# "-real": SASS for sm_$ARCH only, no PTX beside it (the device runs exactly that architecture; the
# PTX, there for JIT compilation on later GPUs, made the pack ~62 MB, close to the 64 MiB carry).
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEMESH_CUDA=ON -DMOEMESH_CUDA_EMU=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH-real" >/dev/null
mapfile -t TESTS < <(ninja -C "$BUILD" -t targets all | sed -n 's/^\(test_cuda_[a-z_0-9]*\): .*/\1/p' | sort -u)
TARGETS=(moemesh moemesh-worker bench_cuda_gemv "${TESTS[@]}")
echo "[gpu_pack] building ${TARGETS[*]} for sm_$ARCH in $BUILD"
ninja -C "$BUILD" -j"$(nproc)" "${TARGETS[@]}"
OUT="$ROOT/.cudarun"
rm -rf "$OUT/bin" "$OUT/lib"
mkdir -p "$OUT/bin" "$OUT/lib"
for t in "${TARGETS[@]}"; do
  strip -o "$OUT/bin/$t" "$BUILD/$t"
  ldd "$BUILD/$t" | awk '/=> \//{print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libstdc++.so*|libgcc_s.so*|ld-linux*|libpthread.so*|libdl.so*|librt.so*) ;;
      libnccl.so*|libcuda.so*) ;;
      *) cp -uL "$lib" "$OUT/lib/" ;;
    esac
  done
done
grep -qx '/.cudarun/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.cudarun/' >> "$ROOT/.git/info/exclude"
# The carry is limited to 64 MiB; the binaries (CUDA fatbins, gRPC) take ~80 MB unpacked, ~3.4x less
# gzipped. gpu_check.sh unpacks it on the device.
tar -C "$OUT" -czf "$OUT/pack.tar.gz" bin lib
rm -rf "$OUT/bin" "$OUT/lib"
du -sh "$OUT/pack.tar.gz"
[ "$(stat -c %s "$OUT/pack.tar.gz")" -lt $((60 << 20)) ] || echo "[gpu_pack] warning: pack.tar.gz is over 60 MiB (carry limit 64 MiB)" >&2
echo "[gpu_pack] done: carry [\".cudarun\"] and run: bash scripts/gpu_check.sh"
