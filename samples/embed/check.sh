#!/usr/bin/env bash
# check.sh BUILD PREFIX: the packaging check CI runs (scripts/test.sh, on build/gcc). Installs the
# built tree BUILD into PREFIX, then uses it only through what an application sees:
#   1. libvkg.so exports exactly the VKG_API functions of the installed vkg.h;
#   2. this folder, configured with find_package(vkg) (CMAKE_PREFIX_PATH=PREFIX) and built in
#      BUILD/embed: `embed` (vkg::vkg, shared) and `embed_static` (vkg::vkg_static) run on a
#      Vulkan device they create themselves, under the validation layer (VKG_VALIDATION=1) with
#      synchronization validation (VK_LAYER_ENABLES): a barrier missing on either side of
#      vkg_session_record's contract, or around vkg_session_submit, fails the run;
#   3. main.c compiled by hand with `pkg-config --cflags --libs vkg`, and run.
# Fails on the first error. Takes seconds once BUILD is built.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "$1" && pwd)
mkdir -p "$2"
prefix=$(cd "$2" && pwd)
work="$build/embed"
mkdir -p "$work"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$work/xdg}"
mkdir -p "$XDG_RUNTIME_DIR"
export VKG_VALIDATION=1
export VK_LAYER_ENABLES=VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT
log="$work/check.log"
quiet() { "$@" > "$log" 2>&1 || { cat "$log"; echo "check.sh: failed: $*" >&2; exit 1; }; }

quiet cmake --install "$build" --prefix "$prefix"
pc=$(find "$prefix" -path '*/pkgconfig/vkg.pc' | head -n 1)
[ -n "$pc" ] || { echo "check.sh: no vkg.pc under $prefix" >&2; exit 1; }
PKG_CONFIG_PATH=$(dirname "$pc")
export PKG_CONFIG_PATH
libdir=$(cd "$(pkg-config --variable=libdir vkg)" && pwd)
for f in "$prefix/bin/vkg" "$prefix/include/vkg.h" "$prefix/include/vkg_version.h" "$libdir/libvkg.a" \
         "$libdir/libvkg.so" "$libdir/cmake/vkg/vkgConfig.cmake" "$libdir/cmake/vkg/vkgConfigVersion.cmake"; do
  [ -e "$f" ] || { echo "check.sh: not installed: $f" >&2; exit 1; }
done

# 1. The shared library's exports are the public API, nothing more, nothing less: every function
#    declared in vkg.h (a declaration without VKG_API would be missing from libvkg.so).
want=$(grep -v '^typedef' "$prefix/include/vkg.h" | sed -n 's/^[A-Za-z_][^(]*\b\(vkg_[a-z0-9_]*\)(.*/\1/p' | sort)
got=$(nm -D --defined-only "$libdir/libvkg.so" | awk '{print $3}' | sort)
if [ "$want" != "$got" ]; then
  echo "check.sh: libvkg.so exports differ from the functions of vkg.h, each needs VKG_API (< vkg.h, > libvkg.so):" >&2
  diff <(echo "$want") <(echo "$got") >&2 || true
  exit 1
fi
echo "check.sh: libvkg.so exports the $(echo "$got" | wc -l) functions of vkg.h and nothing else"

# 2. find_package(vkg) from the installed prefix, shared and static.
quiet cmake -S "$here" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_FLAGS=-Werror
grep -qxF "vkg_DIR:PATH=$libdir/cmake/vkg" "$work/cmake/CMakeCache.txt" ||
  { echo "check.sh: find_package(vkg) found another vkg: $(grep '^vkg_DIR' "$work/cmake/CMakeCache.txt")" >&2; exit 1; }
quiet cmake --build "$work/cmake"
"$work/cmake/embed"
"$work/cmake/embed_static" > "$log" 2>&1 || { cat "$log"; exit 1; }
echo "check.sh: embed_static ok"

# 3. pkg-config, the one-line way.
flags=$(pkg-config --cflags --libs vkg)
# shellcheck disable=SC2086 # the flags are words
cc -std=c11 -Wall -Wextra -Werror "$here/main.c" -o "$work/embed_pkgconfig" $flags -lm -Wl,-rpath,"$libdir"
"$work/embed_pkgconfig" > "$log" 2>&1 || { cat "$log"; exit 1; }
echo "check.sh: embed_pkgconfig ok"
