#!/usr/bin/env bash
# Makes a fresh Debian 12 machine ready: the Debian packages the harness
# needs (installed only when missing), a venv in .venv, and the package
# built into it. Safe to run again; the other scripts call it first.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }

pkgs=(qemu-system-x86 busybox-static e2fsprogs cpio kmod zstd xz-utils redis-server redis-tools libmimalloc2.0
      fuse3 libfuse3-dev pkg-config git sqlite3 libsqlite3-dev zlib1g-dev fio erofs-utils libc6-dev
      libvirt-daemon-system libvirt-dev iproute2 iptables)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || {
            say "need root to install ${missing[*]}: run as root or install them with apt-get"
            exit 1
        }
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # `harness bench apps` starts its own redis-server on a free port; the
    # system service the package may have started is not needed.
    if printf '%s\n' "${missing[@]}" | grep -qx redis-server && [ -d /run/systemd/system ]; then
        "${sudo[@]}" systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
fi

py=${PYTHON:-python3}
"$py" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || {
    say "need Python 3.11 or newer as '$py' (set PYTHON=/path/to/python3.11)"
    exit 1
}
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$py" -m venv .venv
fi
say "installing the harness into .venv (builds the C core)"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,libvirt]'
