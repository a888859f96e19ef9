#!/usr/bin/env bash
# Prepare a Debian 12 host for maintctl: packages, /dev/kvm permissions, libvirtd and virtlogd.
# Idempotent: a second run installs nothing and starts nothing that already runs.
set -euo pipefail

PACKAGES=(
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
  python3 python3-venv python3-dev gcc make
  systemd  # systemd-analyze: tests/unit/test_deploy_files.py verifies deploy/maintctl.service
)
[ "$#" -gt 0 ] && PACKAGES+=("$@")

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-debian: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Without this, libvirtd finds its cached QEMU capabilities stale at every domain start and
# re-probes QEMU (about 52 s per guest start instead of 0.4 s). udev does this on a normal host.
if [ -e /dev/kvm ]; then
  chgrp kvm /dev/kvm && chmod 660 /dev/kvm
fi

mkdir -p /var/run/libvirt /var/log/libvirt
# A daemon keeps nothing its caller holds open: virtlogd keeps inherited descriptors, so a lock
# held around this script (`flock LOCK make test`) would otherwise stay held as long as it runs.
detached() {
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec "$@"
  )
}
# Ask the system daemons themselves: other users' session daemons share the process names.
if ! pgrep -u root -x virtlogd >/dev/null; then detached virtlogd -d; fi
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  echo "install-debian: starting libvirtd"
  detached libvirtd -d
  for _ in $(seq 1 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
virsh -c qemu:///system version >/dev/null
