#!/usr/bin/env bash
# Install LeukoCam on a Raspberry Pi 4/5 running Raspberry Pi OS 64-bit (Bookworm).
#
# Run as root from a checkout of the repository:   sudo firmware_config/install.sh [options]
# Safe to run again (an upgrade is the same command from a newer checkout): it never overwrites
# /etc/leukocam/leukocam.toml, the results in /var/lib/leukocam or an installed model bundle.
#
# What it does: apt packages (picamera2 comes from apt, not pip); a system user `leukocam` in the
# groups video and gpio; the code in PREFIX with a venv made with --system-site-packages (so
# picamera2 is importable) and `pip install PREFIX[device]`; the default config; the demo bundle
# as the first `current` bundle; /usr/local/bin/leukocam; the systemd unit and the avahi service
# file; the camera lines in /boot/firmware/config.txt (once); then enables and starts the service.
set -euo pipefail

PREFIX=/opt/leukocam
START=1
HOSTNAME_WANTED=
DRY_RUN=0

SERVICE_USER=leukocam
CONFIG_DIR=/etc/leukocam
STATE_DIR=/var/lib/leukocam
STORE_DIR=$STATE_DIR/bundles
UNIT_DEST=/etc/systemd/system/leukocam.service
AVAHI_DEST=/etc/avahi/services/leukocam.service
BIN_LINK=/usr/local/bin/leukocam
APT_PACKAGES=(python3-picamera2 python3-venv python3-lgpio avahi-daemon rsync)
# capture_request(wait=<seconds>) is a timeout only from picamera2 0.3.20 (device/camera/picam.py);
# `leukocam doctor` checks the same (device/doctor.py, PICAMERA2_MIN).
PICAMERA2_MIN=0.3.20
SNIPPET_MARK="# --- LeukoCam camera"

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FW=$SRC/firmware_config

usage() {
    cat <<EOF
usage: sudo $0 [--prefix DIR] [--no-start] [--hostname NAME] [--dry-run]

  --prefix DIR     where the code and its venv go (default: $PREFIX)
  --no-start       install and enable the service, but do not start it now
  --hostname NAME  set the Pi's hostname (leukocam gives http://leukocam.local:8080)
  --dry-run        print each command instead of running it (nothing is changed)
EOF
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --no-start) START=0; shift ;;
        --hostname) HOSTNAME_WANTED=${2:?--hostname needs a name}; shift 2 ;;
        --hostname=*) HOSTNAME_WANTED=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
PREFIX=${PREFIX%/}
VENV=$PREFIX/.venv

say() { printf '==> %s\n' "$*"; }
note() { printf 'NOTE: %s\n' "$*"; }

# quote ARG: ARG as a shell word (quoted only when it needs to be), for --dry-run output.
quote() {
    local safe='^[A-Za-z0-9_./:=@%+,-]+$'
    if [[ $1 =~ $safe ]]; then
        printf '%s' "$1"
    else
        printf '%q' "$1"
    fi
}

# run CMD...: run it, or print it under --dry-run.
run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '+'
        local arg
        for arg in "$@"; do
            printf ' %s' "$(quote "$arg")"
        done
        printf '\n'
    else
        "$@"
    fi
}

# render SRC DEST MODE: install a text file, with /opt/leukocam replaced by PREFIX.
render() {
    local src=$1 dest=$2 mode=$3
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '+ sed s#/opt/leukocam#%q#g %q > %q (mode %s)\n' "$PREFIX" "$src" "$dest" "$mode"
        return
    fi
    local tmp
    tmp=$(mktemp)
    sed "s#/opt/leukocam#${PREFIX}#g" "$src" > "$tmp"
    install -D -m "$mode" "$tmp" "$dest"
    rm -f "$tmp"
}

if [[ $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    echo "install.sh: run as root (sudo $0), or add --dry-run to see what it would do" >&2
    exit 1
fi
if [[ $(uname -m) != aarch64 ]]; then
    note "this is $(uname -m), not aarch64: LeukoCam's device side targets Raspberry Pi OS 64-bit"
fi

say "apt packages: ${APT_PACKAGES[*]}"
run apt-get update
run apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"

# check_picamera2: say whether apt's python3-picamera2 is new enough, and what to do when it is not.
check_picamera2() {
    local status=
    if command -v dpkg-query > /dev/null; then
        # shellcheck disable=SC2016 # dpkg-query's own ${...} fields
        status=$(dpkg-query -W -f='${db:Status-Status} ${Version}' python3-picamera2 2> /dev/null || true)
    fi
    local version=${status#* }
    if [[ ${status%% *} != installed || -z $version ]]; then
        if [[ $DRY_RUN -eq 1 ]]; then
            note "python3-picamera2 is not installed yet: the apt-get above installs it (it needs $PICAMERA2_MIN or newer)"
        else
            note "python3-picamera2 is not installed: the camera will not work; check the apt-get output above"
        fi
    elif dpkg --compare-versions "$version" lt "$PICAMERA2_MIN"; then
        note "python3-picamera2 $version is older than $PICAMERA2_MIN: its capture_request(wait=...) takes no timeout, so a camera that stops answering hangs a capture"
        note "  fix: sudo apt update && sudo apt full-upgrade, then run this script again; if apt offers nothing newer, flash Raspberry Pi OS 64-bit (Bookworm); leukocam doctor fails its picamera2 check until then"
    else
        say "python3-picamera2 $version ($PICAMERA2_MIN or newer: capture timeouts work)"
    fi
}
check_picamera2

say "service user $SERVICE_USER (groups video, gpio)"
if ! getent group gpio > /dev/null; then
    run groupadd --system gpio
fi
if id -u "$SERVICE_USER" > /dev/null 2>&1; then
    run usermod --append --groups video,gpio "$SERVICE_USER"
else
    run useradd --system --user-group --groups video,gpio --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "LeukoCam appliance" "$SERVICE_USER"
fi

say "code in $PREFIX"
if [[ "$(realpath -m "$SRC")" != "$(realpath -m "$PREFIX")" ]]; then
    run mkdir -p "$PREFIX"
    # Excluded paths on the receiving side are kept: the venv survives an upgrade.
    run rsync -a --delete --exclude=/.git --exclude=/.venv --exclude=/var --exclude=/runs \
        --exclude=/data --exclude='*.egg-info' --exclude=__pycache__ "$SRC/" "$PREFIX/"
fi

say "venv $VENV (--system-site-packages: picamera2 and lgpio come from apt)"
if [[ ! -x $VENV/bin/python ]]; then
    run python3 -m venv --system-site-packages "$VENV"
fi
run "$VENV/bin/python" -m pip install --upgrade pip
run "$VENV/bin/python" -m pip install "${PREFIX}[device]"
# opencv-python-headless needs numpy 2, and pip puts it in the venv; apt's simplejpeg (imported by
# picamera2) is built for Bookworm's numpy 1.24 and fails with "numpy.dtype size changed". A
# simplejpeg wheel from PyPI, built for numpy 2, in the venv shadows it.
run "$VENV/bin/python" -m pip install --ignore-installed --no-deps "simplejpeg>=1.8.1"
run ln -sfn "$VENV/bin/leukocam" "$BIN_LINK"

say "config $CONFIG_DIR/leukocam.toml"
if [[ -e $CONFIG_DIR/leukocam.toml ]]; then
    note "$CONFIG_DIR/leukocam.toml exists: kept as it is (compare with $FW/leukocam.toml)"
else
    run install -D -m 0644 "$FW/leukocam.toml" "$CONFIG_DIR/leukocam.toml"
fi

say "state $STATE_DIR and the bundle store $STORE_DIR"
run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
if [[ -L $STORE_DIR/current ]]; then
    note "a model bundle is installed already: kept ($(readlink "$STORE_DIR/current"))"
else
    # The SYNTHETIC demo bundle, so the service starts; replace it with `make deploy PI=...`.
    # As the service user, so that the store stays writable for start-up rollbacks.
    run runuser -u "$SERVICE_USER" -- "$VENV/bin/leukocam" install-bundle "$PREFIX/device/demo/bundle" \
        --store "$STORE_DIR"
fi
run chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR"

say "systemd unit $UNIT_DEST and avahi service $AVAHI_DEST"
render "$FW/leukocam.service" "$UNIT_DEST" 0644
render "$FW/leukocam.avahi.service" "$AVAHI_DEST" 0644

BOOT_CONFIG=/boot/firmware/config.txt
[[ -e $BOOT_CONFIG || ! -e /boot/config.txt ]] || BOOT_CONFIG=/boot/config.txt
say "camera lines in $BOOT_CONFIG"
if [[ -e $BOOT_CONFIG ]] && grep -qF "$SNIPPET_MARK" "$BOOT_CONFIG"; then
    note "$BOOT_CONFIG has the LeukoCam camera lines already"
elif [[ -e $BOOT_CONFIG || $DRY_RUN -eq 1 ]]; then
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '+ cat %q >> %q\n' "$FW/config.txt.snippet" "$BOOT_CONFIG"
    else
        cp -p "$BOOT_CONFIG" "$BOOT_CONFIG.leukocam.bak"
        { echo; cat "$FW/config.txt.snippet"; } >> "$BOOT_CONFIG"
    fi
    note "camera lines added to $BOOT_CONFIG: reboot once (sudo reboot) for them to take effect"
else
    note "$BOOT_CONFIG not found (not a Raspberry Pi?): add $FW/config.txt.snippet by hand"
fi

if [[ -n $HOSTNAME_WANTED ]]; then
    if [[ ! $HOSTNAME_WANTED =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]]; then
        echo "install.sh: --hostname $HOSTNAME_WANTED: use lower-case letters, digits and '-'" >&2
        exit 2
    fi
    say "hostname $HOSTNAME_WANTED (http://$HOSTNAME_WANTED.local:8080)"
    run hostnamectl set-hostname "$HOSTNAME_WANTED"
    if grep -q '^127\.0\.1\.1' /etc/hosts; then
        run sed -i "s/^127\.0\.1\.1.*/127.0.1.1\t$HOSTNAME_WANTED/" /etc/hosts
    else
        run sh -c "printf '127.0.1.1\t%s\n' '$HOSTNAME_WANTED' >> /etc/hosts"
    fi
fi

say "service"
run systemctl daemon-reload
if [[ $START -eq 1 ]]; then
    run systemctl enable --now avahi-daemon
    run systemctl enable leukocam
    run systemctl restart leukocam
else
    run systemctl enable avahi-daemon
    run systemctl enable leukocam
    note "--no-start: start it later with: sudo systemctl start leukocam"
fi

# The first dashboard login (needed once [web] host is opened beyond 127.0.0.1); asked for on a terminal only.
if [[ -t 0 && $DRY_RUN -eq 0 ]]; then
    say "first dashboard password (user 'admin')"
    run runuser -u "$SERVICE_USER" -- "$VENV/bin/leukocam" set-password --config "$CONFIG_DIR/leukocam.toml" admin
else
    note "set the dashboard password with: sudo -u $SERVICE_USER leukocam set-password --config $CONFIG_DIR/leukocam.toml admin"
fi

say "done. Check the rig with: leukocam doctor --config $CONFIG_DIR/leukocam.toml"
