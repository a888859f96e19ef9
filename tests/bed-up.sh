#!/usr/bin/env bash
# The test bed's own needs, on top of deploy/install-debian.sh: what builds the guest image,
# a real PostgreSQL server, and a login role the tests use; sshd and Debian's python3-libvirt
# for the remote host over SSH (tests/sshbed.py starts its own sshd); Debian's chromium, which
# the dashboard's browser test drives through Playwright (no browser download); debootstrap and
# systemd-nspawn for the container that runs deploy/maintctl.service under a real systemd
# (tests/systemdbed.py). Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../deploy/install-debian.sh" qemu-guest-agent busybox-static cpio kmod postgresql \
  postgresql-client util-linux openssh-server python3-libvirt chromium debootstrap \
  systemd-container

# promtool, for the alert rules' tests (tests/unit/test_alert_rules.py), ships in Debian's
# prometheus package, whose installation starts a Prometheus server and enables it at boot. It is
# installed with service starts refused (policy-rc.d, which invoke-rc.d and deb-systemd-invoke
# obey) and then disabled, so that only the promtool binary is put to use.
if ! command -v promtool >/dev/null; then
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# tests/bed-up.sh: no service starts while prometheus installs\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  "$here/../deploy/install-debian.sh" prometheus
  systemctl disable prometheus.service >/dev/null 2>&1 || true  # works offline too
  update-rc.d prometheus disable >/dev/null 2>&1 || true
  if grep -q 'tests/bed-up.sh' "$policy"; then rm -f "$policy"; fi  # ours only
  trap - EXIT
fi

# That container's Debian tree, built once (about 40 s) and cached under /var/cache/maintctl-test,
# so a test run only boots it. Standard library only: the virtualenv may not be there yet.
python3 "$here/systemdbed.py" build

# Two clusters: "main" (port 5432) for every test, and "faults" (port 5433) for the tests that
# stop PostgreSQL (tests/faults), so that the others can run beside them.
version=$(pg_lsclusters --no-header | awk 'NR==1 {print $1}')
version=${version:-15}
cluster_up() {  # name port
  pg_lsclusters --no-header | awk -v n="$1" '$2==n' | grep -q . || pg_createcluster "$version" "$1" -p "$2" >/dev/null
  pg_lsclusters --no-header | awk -v n="$1" '$2==n {print $4}' | grep -q online || pg_ctlcluster "$version" "$1" start
  for _ in $(seq 1 50); do runuser -u postgres -- pg_isready -q -p "$2" && break; sleep 0.2; done
  runuser -u postgres -- psql -p "$2" -qtAc "SELECT 1 FROM pg_roles WHERE rolname='maintctl'" | grep -q 1 || \
    runuser -u postgres -- psql -p "$2" -qc "CREATE ROLE maintctl LOGIN PASSWORD 'maintctl' CREATEDB"
  # Tests drop their databases WITH (FORCE), which must also end an autovacuum worker's session.
  runuser -u postgres -- psql -p "$2" -qc "GRANT pg_signal_backend TO maintctl" 2>/dev/null
  runuser -u postgres -- psql -p "$2" -qtAc "SELECT 1 FROM pg_database WHERE datname='maintctl'" | grep -q 1 || \
    runuser -u postgres -- psql -p "$2" -qc "CREATE DATABASE maintctl OWNER maintctl"
}
cluster_up main 5432
cluster_up faults 5433
