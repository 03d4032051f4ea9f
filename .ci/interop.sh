#!/usr/bin/env bash
# Independent Diameter stacks the interop tests drive (tests/test_interop_peers.py): Erlang/OTP diameter and
# freeDiameter, from Debian's packages. Best effort: without them those tests skip and say why.
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "interop: not root or no apt-get; OTP/freeDiameter interop tests will skip"
  return 0 2>/dev/null || exit 0
fi
if ! command -v diameterc >/dev/null || ! command -v freeDiameterd >/dev/null; then
  echo "interop: installing erlang-diameter and freediameterd from Debian"
  timeout 300 apt-get update -qq >/dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq erlang-base erlang-diameter erlang-dev \
    freediameterd freediameter-extensions openssl >/dev/null 2>&1 \
    || echo "interop: install failed; OTP/freeDiameter interop tests will skip"
fi
