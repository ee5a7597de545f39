#!/usr/bin/env bash
# System packages the API tests need (Debian/Ubuntu): Chromium for the Playwright browser test
# (we never run `playwright install`), PostgreSQL server binaries for the PostgreSQL test,
# Slurm (controller, node daemon, client commands) and munge for the slurm backend test.
# Run as root (or with sudo) once per machine; CI calls it before `make test`.
set -euo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ -x /usr/sbin/slurmctld ] || need+=(slurmctld)
[ -x /usr/sbin/slurmd ] || need+=(slurmd)
[ -x /usr/bin/sbatch ] || need+=(slurm-client)
[ -x /usr/sbin/munged ] || need+=(munge)
if [ "${#need[@]}" -eq 0 ]; then
  echo "system packages for tests/api already present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
