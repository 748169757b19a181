#!/usr/bin/env bash
# Re-vendor the JavaScript that draws ipywidgets in the static book (offline: no CDN at read time).
# Fetches pinned npm packages with `npm pack`, copies the two files MyST-NB loads through
# `nb_ipywidgets_js` (see _config.yml) into book/_vendor/, with their licences and checksums.
# Needs node/npm and the npm registry; the vendored files are committed, so building the book does not.
set -euo pipefail
cd "$(dirname "$0")/.."
HTML_MANAGER=1.0.15   # @jupyter-widgets/html-manager 1.x draws ipywidgets 8 state
REQUIREJS=2.3.8
out=book/_vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@jupyter-widgets/html-manager@$HTML_MANAGER" "requirejs@$REQUIREJS" >/dev/null)
mkdir -p "$tmp/hm" "$tmp/rq" "$out"
tar xzf "$tmp"/jupyter-widgets-html-manager-*.tgz -C "$tmp/hm"
tar xzf "$tmp"/requirejs-*.tgz -C "$tmp/rq"
cp "$tmp/hm/package/dist/embed-amd.js" "$out/embed-amd.js"
cp "$tmp/hm/package/dist/embed.js.LICENSE.txt" "$out/embed-amd.js.LICENSE.txt"
cp "$tmp/rq/package/require.js" "$out/require.js"
cat > "$out/VERSIONS" <<TXT
@jupyter-widgets/html-manager $HTML_MANAGER (BSD-3-Clause): dist/embed-amd.js; bundled licences in embed-amd.js.LICENSE.txt
requirejs $REQUIREJS (MIT, see the header of require.js): require.js
fetched with scripts/vendor_js.sh (npm pack)
TXT
(cd "$out" && sha256sum embed-amd.js require.js > SHA256SUMS)
echo "vendored into $out:"; cat "$out/VERSIONS"; cat "$out/SHA256SUMS"
