#!/bin/sh
# Install the system tools some tests use, when they are missing and we can:
#   nginx        - `nginx -t` on deploy/nginx/broadcastd.conf (Debian: nginx-light)
#   promtool     - checks and unit tests of deploy/prometheus/ (Debian: prometheus)
#   redis-server - the real Redis servers of the broker tests  (Debian: redis-server)
#   chromium     - the JavaScript client's browser test         (Debian: chromium)
# Without them those tests skip and say why; nothing else depends on them.
# The services these packages start on install are disabled again.
set -u
missing=""
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
[ -n "$missing" ] || exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no apt-get; tests needing$missing will skip" >&2; exit 0
fi
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "note: not root; tests needing$missing will skip (apt-get install$missing)" >&2; exit 0
fi
echo "installing$missing for the test suite" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null 2>&1
# shellcheck disable=SC2086
$sudo apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 \
    || echo "note: could not install$missing; those tests will skip" >&2
# The packages' own services are not wanted: the tests start what they need.
# Only those of the packages installed here: a developer's own nginx stays up.
for package in $missing; do
    service=${package%-light}
    $sudo systemctl disable --now "$service" >/dev/null 2>&1 || $sudo service "$service" stop >/dev/null 2>&1 || true
done
exit 0
