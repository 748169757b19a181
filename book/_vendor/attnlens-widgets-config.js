// attnlens book: loaded between require.js and embed-amd.js (nb_ipywidgets_js in _config.yml).
// ipywidgets' bundles resolve their fonts next to each AMD module's URL, which require.js derives from
// its baseUrl (by default the page's folder, where nothing is). Point it at this script's folder
// (_static/), where scripts/vendor_js.sh puts the fonts, so widget pages load nothing that is missing.
(function () {
  var script = document.currentScript;
  if (script && script.src && window.requirejs) {
    window.requirejs.config({ baseUrl: script.src.slice(0, script.src.lastIndexOf("/") + 1) });
  }
})();
