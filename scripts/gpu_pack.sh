#!/usr/bin/env bash
# Builds the GPU binaries on a machine without a GPU (nvcc only) and packs them, stripped, with the
# shared libraries they need beyond the C/C++ runtime, into .cudarun/pack.tar.gz — the folder a GPU session
# carries to the device machine (the device tool's carry: [".cudarun"]; keep it under 64 MiB), where
# scripts/gpu_check.sh runs them. NCCL is not packed (218 MB): the nccl transport loads
# libnccl.so.2 at run time from the device's CUDA install.
# --baseline REV also builds `moemesh` at git revision REV (its own source tree from `git archive`
# and build folder, BUILD-base) and packs it as bin/moemesh-base: gpu_check.sh's ab section then
# starts with this code against REV on the same machine (changes without a switch included).
#
#   scripts/gpu_pack.sh [--arch 90] [--build DIR] [--baseline REV]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCH=90
BUILD="$ROOT/build-devpack"
BASELINE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=$2; shift 2 ;;
    --build) BUILD=$2; shift 2 ;;
    --baseline) BASELINE=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_pack.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
# "-real": SASS for sm_$ARCH only, no PTX beside it (the device runs exactly that architecture; the
# PTX, there for JIT compilation on later GPUs, made the pack ~62 MB, close to the 64 MiB carry).
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEMESH_CUDA=ON -DMOEMESH_CUDA_EMU=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH-real" >/dev/null
if [ -n "$BASELINE" ]; then
  BASE_REV=$(git -C "$ROOT" rev-parse --verify --quiet "$BASELINE^{commit}") ||
    { echo "gpu_pack.sh: --baseline: '$BASELINE' is not a commit of this repository" >&2; exit 2; }
fi
mapfile -t TESTS < <(ninja -C "$BUILD" -t targets all | sed -n 's/^\(test_cuda_[a-z_0-9]*\): .*/\1/p' | sort -u)
TARGETS=(moemesh moemesh-worker bench_cuda_gemv "${TESTS[@]}")
echo "[gpu_pack] building ${TARGETS[*]} for sm_$ARCH in $BUILD"
ninja -C "$BUILD" -j"$(nproc)" "${TARGETS[@]}"
OUT="$ROOT/.cudarun"
rm -rf "$OUT/bin" "$OUT/lib"
mkdir -p "$OUT/bin" "$OUT/lib"
# pack_bin BINARY NAME: BINARY stripped as bin/NAME, with the libraries it needs into lib/
pack_bin() {
  strip -o "$OUT/bin/$2" "$1"
  ldd "$1" | awk '/=> \//{print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libstdc++.so*|libgcc_s.so*|ld-linux*|libpthread.so*|libdl.so*|librt.so*) ;;
      libnccl.so*|libcuda.so*) ;;
      *) cp -uL "$lib" "$OUT/lib/" ;;
    esac
  done
}
for t in "${TARGETS[@]}"; do pack_bin "$BUILD/$t" "$t"; done
if [ -n "$BASELINE" ]; then
  BASE_DIR="$BUILD-base"
  echo "[gpu_pack] building moemesh at $BASE_REV (--baseline $BASELINE) in $BASE_DIR"
  rm -rf "$BASE_DIR/src"
  mkdir -p "$BASE_DIR/src"
  git -C "$ROOT" archive "$BASE_REV" | tar -x -C "$BASE_DIR/src"
  cmake -S "$BASE_DIR/src" -B "$BASE_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEMESH_CUDA=ON \
    -DMOEMESH_CUDA_EMU=OFF -DCMAKE_CUDA_ARCHITECTURES="$ARCH-real" >/dev/null
  ninja -C "$BASE_DIR/build" -j"$(nproc)" moemesh
  pack_bin "$BASE_DIR/build/moemesh" moemesh-base
  echo "$BASE_REV" >"$OUT/bin/moemesh-base.rev"
fi
grep -qx '/.cudarun/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.cudarun/' >> "$ROOT/.git/info/exclude"
# The carry is limited to 64 MiB; the binaries (CUDA fatbins, gRPC) take ~80 MB unpacked, ~3.4x less
# gzipped. gpu_check.sh unpacks it on the device.
tar -C "$OUT" -czf "$OUT/pack.tar.gz" bin lib
rm -rf "$OUT/bin" "$OUT/lib"
du -sh "$OUT/pack.tar.gz"
[ "$(stat -c %s "$OUT/pack.tar.gz")" -lt $((60 << 20)) ] || echo "[gpu_pack] warning: pack.tar.gz is over 60 MiB (carry limit 64 MiB)" >&2
echo "[gpu_pack] done: carry [\".cudarun\"] and run: bash scripts/gpu_check.sh"
