#!/usr/bin/env bash
# Make sure the real components the suite runs are on this machine:
# redis-server (all Redis tests), nginx and haproxy (the load balancers of the
# end-to-end suite), chromium (its browser EventSource client) and nchan (nginx's
# Nchan module, the peer `make bench` compares the broker with; a module, not a command)
# curl (the README's examples, run as written) and npm (with Node.js: the npm
# `eventsource` client of the end-to-end suite; tests/e2e/node/package.json).
# Installs them from Debian's packages when we can (root + apt-get); otherwise
# stops and says exactly what to install.
set -euo pipefail

declare -A package_of=(
  [redis-server]=redis-server
  [nginx]=nginx
  [haproxy]=haproxy
  [chromium]=chromium
  [nchan]=libnginx-mod-nchan
  [curl]=curl
  [npm]=npm
)
# Tools that are files rather than commands on the PATH.
declare -A file_of=(
  [nchan]=/usr/lib/nginx/modules/ngx_nchan_module.so
)
wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(redis-server nginx haproxy chromium)

missing=()
for tool in "${wanted[@]}"; do
  if [ -n "${file_of[$tool]:-}" ]; then
    [ -e "${file_of[$tool]}" ] || missing+=("${package_of[$tool]}")
  elif ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
    missing+=("${package_of[$tool]}")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing from Debian's packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The suite starts its own servers on free ports; the packaged services must not hold ports.
  for svc in redis-server nginx haproxy; do
    (command -v systemctl >/dev/null && systemctl stop "$svc" 2>/dev/null) || true
  done
  # (Without systemd the package starts its server itself: stop that one only, by its
  # packaged command line, never a redis-server of anybody else's.)
  pkill -f '^/usr/bin/redis-server 127\.0\.0\.1:6379' 2>/dev/null || true
  exit 0
fi
echo "missing: ${missing[*]}" >&2
echo "install them first, e.g.: sudo apt-get install ${missing[*]}" >&2
exit 1
