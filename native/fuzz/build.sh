#!/bin/sh
# Builds the libFuzzer target for native/packet.h, ip_packet.h, reassembly.h and ctnetlink.h with ASan and UBSan
# (any UB aborts).
# Usage: native/fuzz/build.sh OUTPUT [extra clang++ flags...]
# CXX overrides clang++. Needs clang++ and its sanitizer/libFuzzer runtimes (Debian 12: apt-get install clang libclang-rt-14-dev).
set -eu
if [ $# -lt 1 ]; then
  echo "usage: $0 OUTPUT [clang++ flags...]" >&2
  exit 2
fi
out=$1
shift
native=$(cd "$(dirname "$0")/.." && pwd)
exec "${CXX:-clang++}" -std=c++20 -g -O1 -Wall -Wextra \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$native" "$native/fuzz/packet_fuzzer.cc" -o "$out" "$@"
