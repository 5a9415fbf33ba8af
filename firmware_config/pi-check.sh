#!/usr/bin/env bash
# `make pi-check`: install and run the device side on an emulated Raspberry Pi OS 64-bit.
#
# Run as root from a checkout:   sudo firmware_config/pi-check.sh [options]
#
# 1. A Debian Bookworm arm64 root file system (Raspberry Pi OS 64-bit is Bookworm plus the
#    Raspberry Pi archive), built once with debootstrap and kept in CACHE/pi-rootfs; every run
#    starts from a fresh copy of it.
# 2. It runs under qemu-user-static: through binfmt_misc (mounted and qemu-aarch64 registered
#    when missing), else, where binfmt_misc cannot be used, single binaries with
#    `qemu-aarch64-static -L ROOTFS` (a reduced install: see --mode).
# 3. The device side is installed the way a Pi owner installs it: this checkout's
#    firmware_config/install.sh --no-start, run as root inside the emulated system (apt
#    packages, the leukocam user, /opt/leukocam with a venv made with --system-site-packages,
#    `pip install .[device]` from PyPI's aarch64 wheels, the config, the demo bundle, the unit).
#    The Raspberry Pi archive cannot be reached from here: python3-picamera2 is the fake from
#    tests/fakes/picamera2 packaged as a .deb, and python3-lgpio an empty placeholder, both
#    from a local apt repository. GPIO is not emulated (gpiozero runs on mock pins).
# 4. Under emulation: `leukocam doctor`, the bundle self-test (`leukocam check-bundle`), one
#    replay capture through the whole pipeline into a store, and one dashboard request
#    (`leukocam serve`, then GET /api/captures must list that capture). Any error fails.
#
# Emulated timings mean nothing about a Pi's speed: this checks that it installs and runs on
# arm64, never how fast. A run takes about 9 minutes from an empty cache, 4 to 5 with the root
# file system cached, on a 2-core x86 machine (docs/pi.md, "Checked under
# emulation"); it is a release check, not part of `make test`.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${PI_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/leukocam}
MIRROR=${PI_CHECK_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
MODE=auto
ARGS=("$@")
REBUILD=0
KEEP=0
FAKE_REPO_ONLY=
# What a fresh Raspberry Pi OS Lite has that a minbase debootstrap lacks (install.sh adds the rest).
BASE_PACKAGES=(python3 ca-certificates systemd sudo)
# For --mode qemu-L: nothing runs inside while the system is unpacked, so Python and pip come with it.
FOREIGN_PACKAGES=(python3 python3-pip python3-venv python3-numpy python3-pil ca-certificates)
ROOTFS_STAMP_TEXT="suite=$SUITE mirror=$MIRROR base=${BASE_PACKAGES[*]} foreign=${FOREIGN_PACKAGES[*]} v1"
BINFMT_DIR=/proc/sys/fs/binfmt_misc
BINFMT_CONF=/usr/lib/binfmt.d/qemu-aarch64.conf
REPO_IN_PI=/opt/pi-check-repo
CHECKOUT_IN_PI=/home/pi/leukocam
PI_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

usage() {
    cat <<EOF
usage: sudo $0 [--cache DIR] [--rebuild] [--keep] [--mode auto|binfmt|qemu-L]
       $0 --build-fake-repo DIR

  --cache DIR        root file system, apt and pip caches (default: $CACHE; env PI_CHECK_CACHE)
  --rebuild          build the root file system again instead of reusing CACHE/pi-rootfs
  --keep             keep the emulated system of this run in CACHE/pi-check-work
  --mode MODE        binfmt: chroot through binfmt_misc, install with install.sh (default where
                     binfmt_misc works); qemu-L: qemu-aarch64-static -L per command, no install.sh
                     (pip installs the wheels, the code runs from the checkout, as root)
  --build-fake-repo DIR  only build the local apt repository (fake python3-picamera2,
                     placeholder python3-lgpio) into DIR; needs dpkg-deb, not root
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --cache) CACHE=${2:?--cache needs a directory}; shift 2 ;;
        --cache=*) CACHE=${1#*=}; shift ;;
        --rebuild) REBUILD=1; shift ;;
        --keep) KEEP=1; shift ;;
        --mode) MODE=${2:?--mode needs auto, binfmt or qemu-L}; shift 2 ;;
        --mode=*) MODE=${1#*=}; shift ;;
        --build-fake-repo) FAKE_REPO_ONLY=${2:?--build-fake-repo needs a directory}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "pi-check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
case $MODE in
    auto|binfmt|qemu-L) ;;
    *) echo "pi-check.sh: --mode must be auto, binfmt or qemu-L" >&2; exit 2 ;;
esac

say() { printf '==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
note() { printf 'NOTE: %s\n' "$*"; }
die() { printf 'pi-check: FAILED: %s\n' "$*" >&2; exit 1; }

# fake_version: the picamera2 release tests/fakes/picamera2 stands for (its VERSION).
fake_version() {
    sed -n 's/^VERSION = "\([0-9.]*\)"$/\1/p' "$SRC/tests/fakes/picamera2/__init__.py"
}

# build_fake_repo DIR: a flat apt repository with python3-picamera2 (the fake) and python3-lgpio
# (empty): the two packages install.sh takes from the Raspberry Pi archive.
build_fake_repo() {
    local repo=$1 version work deb
    version=$(fake_version)
    [[ -n $version ]] || die "no VERSION in tests/fakes/picamera2/__init__.py"
    command -v dpkg-deb > /dev/null || die "dpkg-deb is missing (Debian package dpkg)"
    mkdir -p "$repo"
    work=$(mktemp -d)
    local site=$work/picamera2/usr/lib/python3/dist-packages
    mkdir -p "$work/picamera2/DEBIAN" "$site/picamera2" "$site/picamera2-$version.dist-info"
    install -m 0644 "$SRC/tests/fakes/picamera2/__init__.py" "$site/picamera2/__init__.py"
    printf 'Metadata-Version: 2.1\nName: picamera2\nVersion: %s\nSummary: LeukoCam test fake of picamera2\n' \
        "$version" > "$site/picamera2-$version.dist-info/METADATA"
    printf 'debian\n' > "$site/picamera2-$version.dist-info/INSTALLER"
    cat > "$work/picamera2/DEBIAN/control" <<EOF
Package: python3-picamera2
Version: $version-1+leukocamfake
Architecture: all
Maintainer: LeukoCam pi-check <leukocam@localhost>
Depends: python3, python3-numpy, python3-pil
Section: python
Priority: optional
Description: FAKE picamera2 for LeukoCam's emulated install check
 LeukoCam's tests/fakes/picamera2 (no camera, no libcamera): the Raspberry Pi
 archive's python3-picamera2 cannot be installed where pi-check runs.
EOF
    mkdir -p "$work/lgpio/DEBIAN"
    cat > "$work/lgpio/DEBIAN/control" <<EOF
Package: python3-lgpio
Version: 0.0.0-0+leukocamplaceholder
Architecture: all
Maintainer: LeukoCam pi-check <leukocam@localhost>
Section: python
Priority: optional
Description: EMPTY placeholder for python3-lgpio in LeukoCam's emulated install check
 GPIO is not emulated: the check runs gpiozero on mock pins.
EOF
    rm -f "$repo"/*.deb
    dpkg-deb --root-owner-group --build "$work/picamera2" "$repo/python3-picamera2_$version-1+leukocamfake_all.deb" > /dev/null
    dpkg-deb --root-owner-group --build "$work/lgpio" "$repo/python3-lgpio_0.0.0-0+leukocamplaceholder_all.deb" > /dev/null
    rm -rf "$work"
    : > "$repo/Packages"
    for deb in "$repo"/*.deb; do
        {
            dpkg-deb -f "$deb"
            printf 'Filename: ./%s\nSize: %s\nSHA256: %s\n\n' "$(basename "$deb")" "$(stat -c %s "$deb")" \
                "$(sha256sum "$deb" | cut -d' ' -f1)"
        } >> "$repo/Packages"
    done
}

if [[ -n $FAKE_REPO_ONLY ]]; then
    build_fake_repo "$FAKE_REPO_ONLY"
    echo "fake apt repository in $FAKE_REPO_ONLY"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    echo "pi-check.sh: run as root (sudo make pi-check): debootstrap, chroot and binfmt_misc need it" >&2
    exit 1
fi
if [[ $(uname -m) == aarch64 ]]; then
    note "this machine is aarch64 already: the check runs natively, not emulated"
fi

# Everything below mounts inside the emulated system: a private mount namespace drops those
# mounts when this script ends, however it ends.
if [[ -z ${PI_CHECK_IN_NAMESPACE:-} ]] && command -v unshare > /dev/null; then
    export PI_CHECK_IN_NAMESPACE=1
    exec unshare --mount --propagation private -- bash "$0" "${ARGS[@]}"
fi

T0=$(date +%s)
WORK=$CACHE/pi-check-work
R=$WORK/root
SERVE_PID=
# remove_work: unmount everything under the emulated system, then delete it (never through a mount).
remove_work() {
    local mount
    while read -r mount; do
        umount -l "$mount" 2> /dev/null || true
    done < <(awk -v root="$R/" 'index($2, root) == 1 { print $2 }' /proc/self/mounts | sort -r)
    if grep -qF " $R/" /proc/self/mounts; then
        note "something is still mounted under $R: not deleting $WORK"
        return 0
    fi
    rm -rf --one-file-system "$WORK"
}
cleanup() {
    local rc=$?
    if [[ -n $SERVE_PID ]]; then
        kill "$SERVE_PID" 2> /dev/null || true
        wait "$SERVE_PID" 2> /dev/null || true
    fi
    if [[ $rc -eq 0 ]]; then
        say "pi-check PASSED in $(( $(date +%s) - T0 )) s (mode $MODE; emulated: the times say nothing about a Pi)"
    else
        printf 'pi-check: FAILED (exit %s) after %s s; the emulated system is kept in %s\n' \
            "$rc" "$(( $(date +%s) - T0 ))" "$WORK" >&2
        return
    fi
    if [[ $KEEP -eq 0 ]]; then
        remove_work
    fi
}
trap cleanup EXIT

# -- tools -------------------------------------------------------------------------------------
need=()
command -v debootstrap > /dev/null || need+=(debootstrap)
command -v qemu-aarch64-static > /dev/null || need+=(qemu-user-static)
[[ -e $BINFMT_CONF ]] || need+=(qemu-user-static)
command -v dpkg-deb > /dev/null || need+=(dpkg)
command -v python3 > /dev/null || need+=(python3)
if [[ ${#need[@]} -gt 0 ]]; then
    say "installing ${need[*]}"
    command -v apt-get > /dev/null || die "need ${need[*]} (Debian packages), and there is no apt-get here"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" binfmt-support > /dev/null
fi

# -- binfmt_misc -------------------------------------------------------------------------------
# binfmt_ready: qemu-aarch64 registered and enabled (mounting binfmt_misc and registering it if needed).
binfmt_ready() {
    if [[ ! -e $BINFMT_DIR/register ]]; then
        mount -t binfmt_misc binfmt_misc "$BINFMT_DIR" 2> /dev/null || return 1
    fi
    if [[ ! -e $BINFMT_DIR/qemu-aarch64 ]]; then
        [[ -r $BINFMT_CONF ]] || return 1
        grep -v '^[#;]' "$BINFMT_CONF" | grep -m1 . > "$BINFMT_DIR/register" 2> /dev/null || return 1
    fi
    [[ $(head -n1 "$BINFMT_DIR/qemu-aarch64") == enabled ]]
}
if [[ $MODE == auto || $MODE == binfmt ]]; then
    if binfmt_ready; then
        MODE=binfmt
        say "binfmt_misc: qemu-aarch64 registered ($(sed -n 's/^interpreter //p' "$BINFMT_DIR/qemu-aarch64"))"
    elif [[ $MODE == binfmt ]]; then
        die "binfmt_misc cannot be used here (mount -t binfmt_misc, or registering $BINFMT_CONF, failed); try --mode qemu-L"
    else
        MODE=qemu-L
        note "binfmt_misc cannot be used here: single binaries run with qemu-aarch64-static -L (reduced install)"
    fi
fi

# -- the root file system (cached) ---------------------------------------------------------------
mkdir -p "$CACHE"
ROOTFS=$CACHE/pi-rootfs
[[ $MODE == binfmt ]] || ROOTFS=$CACHE/pi-rootfs-foreign
STAMP=$ROOTFS/.leukocam-pi-rootfs
if [[ $REBUILD -eq 1 || ! -e $STAMP || $(cat "$STAMP" 2> /dev/null) != "$ROOTFS_STAMP_TEXT" ]]; then
    say "building a Debian $SUITE arm64 root file system ($MODE) in $ROOTFS (once; then reused)"
    building=$ROOTFS.building
    rm -rf --one-file-system "$building"
    if [[ $MODE == binfmt ]]; then
        packages=$(IFS=,; echo "${BASE_PACKAGES[*]}")
        debootstrap --arch=arm64 --variant=minbase --include="$packages" "$SUITE" "$building" "$MIRROR" \
            > "$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
        chroot "$building" apt-get clean
    else
        packages=$(IFS=,; echo "${FOREIGN_PACKAGES[*]}")
        debootstrap --foreign --arch=arm64 --variant=minbase --include="$packages" "$SUITE" "$building" "$MIRROR" \
            > "$CACHE/debootstrap.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
        # Nothing can run inside to finish the install: unpack every package (no maintainer scripts).
        for deb in "$building"/var/cache/apt/archives/*.deb; do
            dpkg-deb -x "$deb" "$building"
        done
    fi
    rm -rf --one-file-system "$ROOTFS"
    mv "$building" "$ROOTFS"
    printf '%s' "$ROOTFS_STAMP_TEXT" > "$STAMP"
else
    say "reusing the root file system in $ROOTFS (--rebuild builds it again)"
fi

say "a fresh copy of it in $R"
remove_work
[[ ! -e $WORK ]] || die "$WORK could not be removed"
mkdir -p "$WORK"
cp -a "$ROOTFS" "$R"

# The checkout as a clean clone has it: tracked and new files, nothing git ignores (.venv, runs/).
say "this checkout's files to $CHECKOUT_IN_PI"
mkdir -p "$R$CHECKOUT_IN_PI"
if git -C "$SRC" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) \
        | tar -C "$R$CHECKOUT_IN_PI" -xf -
else
    tar -C "$SRC" --exclude=./.venv --exclude=./runs --exclude=./data --exclude=./var --exclude=./.git \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$R$CHECKOUT_IN_PI" -xf -
fi

PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PI_TMP=/tmp/pi-check
mkdir -p "$R$PI_TMP"

# qemu-user (7.2, Debian Bookworm's) shows the emulated programs this host's own /proc/cpuinfo (an
# x86 one): LiteRT's CPU detection crashes on it (SIGSEGV creating any Interpreter). A Raspberry
# Pi 4's (four Cortex-A72, as its kernel reports them) stands in; a real Pi has its own.
pi4_cpuinfo() {
    local n
    for n in 0 1 2 3; do
        printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$n"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
    done
    printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n'
}
pi4_cpuinfo > "$WORK/cpuinfo"
EMULATED=1
[[ $(uname -m) != aarch64 ]] || EMULATED=0

# -- run commands in the emulated system -----------------------------------------------------------
if [[ $MODE == binfmt ]]; then
    mount -t proc proc "$R/proc"
    [[ $EMULATED -eq 0 ]] || mount --bind "$WORK/cpuinfo" "$R/proc/cpuinfo"
    mount -t sysfs sysfs "$R/sys"
    mount --rbind /dev "$R/dev"
    mkdir -p "$CACHE/pi-pip" "$CACHE/pi-apt" "$R/root/.cache/pip"
    mount --bind "$CACHE/pi-pip" "$R/root/.cache/pip"
    mount --bind "$CACHE/pi-apt" "$R/var/cache/apt/archives"
    rm -f "$R/etc/resolv.conf"
    cp -L /etc/resolv.conf "$R/etc/resolv.conf"
    # Packages install, services do not start (there is no systemd running in a chroot).
    printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"
    chmod 0755 "$R/usr/sbin/policy-rc.d"
    [[ $(chroot "$R" uname -m) == aarch64 ]] || die "the emulated system does not report aarch64"
elif [[ $EMULATED -eq 1 ]]; then
    # qemu-aarch64-static -L looks a path up under ROOTFS first: /proc/cpuinfo is this file there.
    mkdir -p "$R/proc"
    cp "$WORK/cpuinfo" "$R/proc/cpuinfo"
fi

# The host's proxy settings reach apt and pip inside (each command there starts with a clean environment).
PROXY_ENV=()
for name in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [[ -z ${!name:-} ]] || PROXY_ENV+=("$name=${!name}")
done
# pi_root CMD...: run CMD as root in the emulated system. No systemd runs there: SYSTEMD_OFFLINE=1
# makes systemctl do what it can offline (enable) and skip what needs the manager (daemon-reload),
# as in an image build (systemd does not always detect the chroot under emulation).
pi_root() {
    chroot "$R" /usr/bin/env -i PATH="$PI_PATH" HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        SYSTEMD_OFFLINE=1 "${PROXY_ENV[@]}" "$@"
}
# leukocam_argv ARGS...: ARGV = the leukocam command in the emulated system: binfmt, as the
# leukocam user in /tmp (as the docs say to run it); qemu-L, as root with the installed wheels.
# GPIO runs on mock pins. Each layer execs the next: a background ARGV's $! is the process itself.
SITE=/opt/leukocam/site
ARGV=()
leukocam_argv() {
    if [[ $MODE == binfmt ]]; then
        ARGV=(chroot --userspec=leukocam:leukocam "--groups=video,gpio" "$R" /usr/bin/env -i --chdir=/tmp
            PATH="$PI_PATH" HOME=/tmp LANG=C.UTF-8 GPIOZERO_PIN_FACTORY=mock /usr/local/bin/leukocam "$@")
    else
        ARGV=(env -i PATH="$PI_PATH" HOME="$R/tmp" LANG=C.UTF-8 GPIOZERO_PIN_FACTORY=mock "${PROXY_ENV[@]}"
            PYTHONPATH="$R$SITE:$R$CHECKOUT_IN_PI"
            qemu-aarch64-static -L "$R" "$R/usr/bin/python3.11"
            -c 'import sys; from device.cli import main; sys.argv[0] = "leukocam"; main()' "$@")
    fi
}
leukocam() {
    leukocam_argv "$@"
    "${ARGV[@]}"
}
# qemu_python ARGS...: --mode qemu-L: the emulated system's own Python.
qemu_python() {
    env -i PATH="$PI_PATH" HOME="$R/tmp" LANG=C.UTF-8 "${PROXY_ENV[@]}" \
        qemu-aarch64-static -L "$R" "$R/usr/bin/python3.11" "$@"
}
# in_pi PATH: PATH as the emulated leukocam command sees it.
in_pi() {
    if [[ $MODE == binfmt ]]; then printf '%s' "$1"; else printf '%s' "$R$1"; fi
}

# Certificate authorities this host added (a TLS-inspecting proxy, say) are trusted inside too.
local_cas=(/usr/local/share/ca-certificates/*.crt)
if [[ -e ${local_cas[0]} ]]; then
    say "trusting this host's local CA certificates inside too: ${local_cas[*]##*/}"
    mkdir -p "$R/usr/local/share/ca-certificates"
    cp "${local_cas[@]}" "$R/usr/local/share/ca-certificates/"
    if [[ $MODE == binfmt ]]; then
        pi_root update-ca-certificates > /dev/null 2>&1 || die "update-ca-certificates failed inside"
    else
        cat "${local_cas[@]}" >> "$R/etc/ssl/certs/ca-certificates.crt"
    fi
fi

# -- install ---------------------------------------------------------------------------------------
if [[ $MODE == binfmt ]]; then
    say "the Raspberry Pi archive's packages: fake python3-picamera2 $(fake_version), empty python3-lgpio"
    build_fake_repo "$R$REPO_IN_PI"
    echo "deb [trusted=yes] file:$REPO_IN_PI ./" > "$R/etc/apt/sources.list.d/leukocam-pi-check.list"
    say "firmware_config/install.sh --no-start inside the emulated system (apt, user, venv, pip from PyPI)"
    pi_root bash "$CHECKOUT_IN_PI/firmware_config/install.sh" --no-start > "$WORK/install.log" 2>&1 \
        || { tail -n 40 "$WORK/install.log" >&2; die "install.sh failed (log: $WORK/install.log)"; }
    grep -E '^(==>|NOTE)' "$WORK/install.log" || true
    # shellcheck disable=SC2016 # dpkg-query's own ${...} fields
    pi_root dpkg-query -W -f='${Package} ${Version}\n' python3-picamera2 python3.11 python3-numpy
    pi_root /opt/leukocam/.venv/bin/python -c \
        'import platform, sys, numpy, cv2; print("venv:", sys.version.split()[0], platform.machine(), "numpy", numpy.__version__, "opencv", cv2.__version__)'
    # install.sh leaves the store to the service user: the check's own folder too.
    pi_root chown leukocam:leukocam "$PI_TMP"
    BUNDLES=/var/lib/leukocam/bundles
    BUNDLE=$BUNDLES/current
    SYSTEM_CONFIG=/etc/leukocam/leukocam.toml
else
    say "--mode qemu-L: pip installs the [device] wheels for aarch64 into $SITE (no install.sh: it needs a chroot)"
    mkdir -p "$R$SITE" "$CACHE/pi-pip"
    mapfile -t reqs < <(python3 - "$SRC/pyproject.toml" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for r in project["dependencies"] + project["optional-dependencies"]["device"]:
    print(r)
EOF
)
    qemu_python -m pip install --quiet --break-system-packages --only-binary=:all: --cache-dir "$CACHE/pi-pip" \
        --target "$R$SITE" "${reqs[@]}" "simplejpeg>=1.8.1" > "$WORK/install.log" 2>&1 \
        || { tail -n 40 "$WORK/install.log" >&2; die "pip under qemu-aarch64-static -L failed"; }
    # The fake python3-picamera2 unpacked where apt would put it (no dpkg runs without binfmt_misc).
    build_fake_repo "$WORK/repo"
    dpkg-deb -x "$WORK"/repo/python3-picamera2_*.deb "$R"
    note "python3-picamera2 is the fake (unpacked, not installed with dpkg), lgpio is absent, commands run as root"
    mkdir -p "$R$PI_TMP/bundles"
    leukocam install-bundle "$R$CHECKOUT_IN_PI/device/demo/bundle" --store "$R$PI_TMP/bundles"
    BUNDLES=$PI_TMP/bundles
    BUNDLE=$BUNDLES/current
    SYSTEM_CONFIG=$PI_TMP/system.toml
    sed -e "s#/var/lib/leukocam/bundles#$R$BUNDLES#" -e "s#/var/lib/leukocam#$R$PI_TMP/system-store#" \
        "$SRC/firmware_config/leukocam.toml" > "$R$SYSTEM_CONFIG"
fi

# -- the checks ------------------------------------------------------------------------------------
say "leukocam doctor --config $SYSTEM_CONFIG (picamera2 backend: the fake; GPIO: mock pins)"
leukocam doctor --config "$(in_pi "$SYSTEM_CONFIG")" | tee "$WORK/doctor.txt" \
    || die "leukocam doctor found a failure"
grep -q '^✓ camera ' "$WORK/doctor.txt" || die "doctor: the camera row did not pass"
grep -q '^✓ bundle ' "$WORK/doctor.txt" || die "doctor: the bundle row did not pass"

say "the bundle self-test: leukocam check-bundle $BUNDLE"
leukocam check-bundle "$(in_pi "$BUNDLE")" || die "the bundle self-test failed"

cat > "$R$PI_TMP/replay.toml" <<EOF
# pi-check: the replay camera over the shipped demo fields, the installed bundle, a throwaway store.
[camera]
backend = "replay"
replay_dir = "$(in_pi "$CHECKOUT_IN_PI/device/demo/fields")"
[trigger]
enabled = false
[model]
bundle = "$(in_pi "$BUNDLES")"
threads = 2
[store]
data_dir = "$(in_pi "$PI_TMP/store")"
min_free_mb = 1
[web]
host = "127.0.0.1"
port = $PORT
[service]
startup_captures = 0
EOF
[[ $MODE == binfmt ]] && pi_root chown -R leukocam:leukocam "$PI_TMP"

say "one replay capture through the pipeline into the store"
leukocam capture --json --config "$(in_pi "$PI_TMP/replay.toml")" > "$WORK/capture.json" \
    || { cat "$WORK/capture.json" >&2; die "leukocam capture failed"; }
CAPTURE_ID=$(python3 - "$WORK/capture.json" <<'EOF'
import json, sys
result = json.load(open(sys.argv[1]))
outcome, cap = result["outcome"], result["capture"]
if outcome["status"] != "ok" or not cap:
    sys.exit(f"capture outcome {outcome['status']}: {outcome.get('message')}")
if cap["n_cells"] < 1:
    sys.exit(f"capture {cap['id']} found no cell")
print(cap["id"])
print(f"capture {cap['id']}: {cap['n_cells']} cells stored", file=sys.stderr)
EOF
) || die "the capture did not store a result"

say "one dashboard request: leukocam serve on 127.0.0.1:$PORT, GET /api/captures"
leukocam_argv serve --config "$(in_pi "$PI_TMP/replay.toml")"
"${ARGV[@]}" > "$WORK/serve.log" 2>&1 &
SERVE_PID=$!
python3 - "$PORT" "$CAPTURE_ID" "$SERVE_PID" <<'EOF' || { tail -n 30 "$WORK/serve.log" >&2; die "the dashboard request failed"; }
import json, os, sys, time, urllib.request
port, capture_id, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 900  # emulated start-up: imports and the self-test take minutes
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("leukocam serve exited")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=30) as r:
            break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("leukocam serve did not answer")
        time.sleep(2)
with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/captures?limit=5", timeout=120) as r:
    status, page = r.status, json.load(r)
ids = [item["id"] for item in page.get("captures", [])]
print(f"GET /api/captures: {status}, total {page.get('total')}, ids {ids}")
if status != 200 or capture_id not in ids:
    sys.exit(f"the stored capture {capture_id} is not listed")
EOF
kill "$SERVE_PID"
wait "$SERVE_PID" || true
SERVE_PID=
if grep -E 'Traceback|ERROR' "$WORK/serve.log"; then
    die "leukocam serve logged an error (log: $WORK/serve.log)"
fi
