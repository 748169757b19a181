#!/usr/bin/env bash
# Re-vendor the JavaScript that draws ipywidgets and the math in the static book (offline: no CDN at read time).
# Fetches pinned npm packages with `npm pack`, copies the two files MyST-NB loads through
# `nb_ipywidgets_js` (see _config.yml) into book/_vendor/, with their licences and checksums.
# Needs node/npm and the npm registry; the vendored files are committed, so building the book does not.
set -euo pipefail
cd "$(dirname "$0")/.."
HTML_MANAGER=1.0.15   # @jupyter-widgets/html-manager 1.x draws ipywidgets 8 state
REQUIREJS=2.3.8
MATHJAX=3.2.2         # the MathJax 3 that Sphinx's mathjax extension configures (mathjax_path in _config.yml)
out=book/_vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@jupyter-widgets/html-manager@$HTML_MANAGER" "requirejs@$REQUIREJS" \
   "mathjax@$MATHJAX" >/dev/null)
mkdir -p "$tmp/hm" "$tmp/rq" "$tmp/mj" "$out"
tar xzf "$tmp"/jupyter-widgets-html-manager-*.tgz -C "$tmp/hm"
tar xzf "$tmp"/requirejs-*.tgz -C "$tmp/rq"
tar xzf "$tmp"/mathjax-*.tgz -C "$tmp/mj"
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
# MathJax: the TeX-to-HTML component, its woff2 fonts and the TeX extensions it autoloads (\boldsymbol, ...),
# at the paths MathJax computes from its own URL ([mathjax]/output/chtml/fonts/woff-v2, [mathjax]/input/tex/extensions).
mj=$tmp/mj/package/es5
rm -rf "$out/mathjax"
mkdir -p "$out/mathjax/output/chtml/fonts" "$out/mathjax/input/tex"
cp "$mj/tex-chtml.js" "$out/mathjax/tex-chtml.js"
cp -r "$mj/output/chtml/fonts/woff-v2" "$out/mathjax/output/chtml/fonts/woff-v2"
cp -r "$mj/input/tex/extensions" "$out/mathjax/input/tex/extensions"
cp "$tmp/mj/package/LICENSE" "$out/mathjax/LICENSE"
cat > "$out/VERSIONS" <<TXT
@jupyter-widgets/html-manager $HTML_MANAGER (BSD-3-Clause): dist/embed-amd.js; bundled licences in embed-amd.js.LICENSE.txt
requirejs $REQUIREJS (MIT, see the header of require.js): require.js
Font Awesome 5 Free webfonts (SIL OFL 1.1) bundled by html-manager: @jupyter-widgets/**/*.woff2
mathjax $MATHJAX (Apache-2.0, mathjax/LICENSE): es5/tex-chtml.js, its woff-v2 fonts and TeX extensions
attnlens-widgets-config.js is attnlens' own (not vendored)
fetched with scripts/vendor_js.sh (npm pack)
TXT
(cd "$out" && sha256sum embed-amd.js require.js @jupyter-widgets/*.woff2 mathjax/tex-chtml.js > SHA256SUMS)
echo "vendored into $out:"; cat "$out/VERSIONS"; cat "$out/SHA256SUMS"
