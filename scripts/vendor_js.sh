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
# The bundles' CSS asks for Font Awesome 5 next to each AMD module's URL; attnlens-widgets-config.js
# points require.js at _static/, so the fonts are served from there (woff2: every browser takes it first).
fonts=$(grep -o '"[0-9a-f]\{20\}\.woff2"' "$out/embed-amd.js" | tr -d '"' | sort -u)
rm -rf "$out/@jupyter-widgets"
mkdir -p "$out/@jupyter-widgets/html-manager/dist"
for f in $fonts; do
  cp "$tmp/hm/package/dist/$f" "$out/@jupyter-widgets/$f"
  cp "$tmp/hm/package/dist/$f" "$out/@jupyter-widgets/html-manager/dist/$f"
done
cat > "$out/VERSIONS" <<TXT
@jupyter-widgets/html-manager $HTML_MANAGER (BSD-3-Clause): dist/embed-amd.js; bundled licences in embed-amd.js.LICENSE.txt
requirejs $REQUIREJS (MIT, see the header of require.js): require.js
Font Awesome 5 Free webfonts (SIL OFL 1.1) bundled by html-manager: @jupyter-widgets/**/*.woff2
attnlens-widgets-config.js is attnlens' own (not vendored)
fetched with scripts/vendor_js.sh (npm pack)
TXT
(cd "$out" && sha256sum embed-amd.js require.js @jupyter-widgets/*.woff2 > SHA256SUMS)
echo "vendored into $out:"; cat "$out/VERSIONS"; cat "$out/SHA256SUMS"
