#!/usr/bin/env bash
# The whole test suite on a fresh machine: install, then build and test three ways (and a fourth,
# ThreadSanitizer, for the concurrency test alone):
#   gcc (Release, -O3: the configuration scripts/run.sh builds, whose optimizer sees warnings -O2
#   does not), clang (RelWithDebInfo), and clang with AddressSanitizer + UndefinedBehaviorSanitizer.
# After the gcc tests, build/gcc is installed into build/install and samples/embed is built against it.
# Every GPU test runs as its own short process under VK_LAYER_KHRONOS_validation (VKG_VALIDATION=1,
# set by ctest), so a lavapipe crash is contained to one test and reported as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p build
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$PWD/build/xdg}"
mkdir -p "$XDG_RUNTIME_DIR"
jobs=$(nproc)

echo "== gcc"
bash scripts/build.sh build/gcc -DCMAKE_C_COMPILER=gcc -DCMAKE_BUILD_TYPE=Release
ctest --test-dir build/gcc --output-on-failure -j "$jobs"

echo "== install, and samples/embed built against the installed package (find_package, pkg-config)"
bash samples/embed/check.sh build/gcc build/install

echo "== clang"
bash scripts/build.sh build/clang -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVKG_PYTHON_UNIT_TESTS=OFF
ctest --test-dir build/clang --output-on-failure -j "$jobs"

echo "== clang + ASan + UBSan"
bash scripts/build.sh build/asan -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Debug -DVKG_SANITIZE=ON -DVKG_PYTHON_UNIT_TESTS=OFF
# Leaks inside the Vulkan loader, lavapipe and the validation layer are theirs, not ours.
export LSAN_OPTIONS="suppressions=$PWD/tests/lsan.supp:print_suppressions=0"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir build/asan --output-on-failure -j "$jobs" -E '^cli_bench_smoke$'

echo "== clang + ThreadSanitizer: the concurrency test (8 threads x 100 runs on one model)"
cmake -S . -B build/tsan -G Ninja -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo -DVKG_TSAN=ON \
  -DVKG_PYTHON_UNIT_TESTS=OFF > build/tsan.configure.log 2>&1 || { cat build/tsan.configure.log; exit 1; }
cmake --build build/tsan --target test_threads
ctest --test-dir build/tsan --output-on-failure -R '^threads_'
