"""An HTML template for ``dvc plots show`` that draws its charts offline.

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN: with no internet it stays blank.
This template carries the three libraries inline (the bundle that vl-convert-python ships), so the
page DVC writes (``dvc_plots/index.html``) draws its charts on a machine with no network.
``scripts/setup.sh`` (``python -m flows.plots``) writes it to ``.dvc/plots-offline.html`` and names
it as ``plots.html_template`` in ``.dvc/config.local``: a checkout's own setting, so that a clone set
up without it keeps DVC's own page instead of naming a file it does not have;
``python -m flows.plots DEST`` writes the template anywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flows import ROOT

DEFAULT = ROOT / ".dvc" / "plots-offline.html"  # .dvc/config.local: plots.html_template
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>texq: DVC plots</title>
    <!-- Vega {vega}, Vega-Lite {vegalite}, vega-embed {embed}, inline (vl-convert-python {vlc}):
         this page needs no network -->
    <script>{bundle}</script>
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    <p id="texq-plots-note" style="color: #a00">The charts below did not render: this page's inline
    chart library failed to run (see the browser console).</p>
    {{plot_divs}}
    <script>
        if (window.vegaEmbed) {{ document.getElementById("texq-plots-note").remove(); }}
    </script>
</body>
</html>
"""


def offline_template() -> str:
    """The template's text: DVC's ``{plot_divs}`` and ``{refresh_tag}`` placeholders, the libraries
    inline (no ``{scripts}`` placeholder: DVC's CDN links are left out)."""
    try:
        import vl_convert as vlc
    except ImportError as exc:
        from texq.util.errors import TexqError

        raise TexqError("the offline plots template needs vl-convert-python (pip install "
                        "'texq[pipeline]')") from exc
    from importlib.metadata import version

    bundle = vlc.javascript_bundle().replace("</script", "<\\/script")
    return PAGE.format(bundle=bundle, vega=vlc.get_vega_version(), vegalite=vlc.get_vegalite_versions()[-1],
                       embed=vlc.get_vega_embed_version(), vlc=version("vl-convert-python"))


def write_template(dest: str | Path = DEFAULT) -> Path:
    """Write the template to ``dest`` atomically (unchanged content is not rewritten)."""
    from texq.util.io import atomic_path

    dest = Path(dest)
    text = offline_template()
    if not (dest.is_file() and dest.read_text() == text):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            tmp.write_text(text)
    return dest


def configure(root: str | Path = ROOT) -> Path:
    """Write the template into ``root``'s ``.dvc`` folder and name it in ``.dvc/config.local``."""
    import subprocess

    root = Path(root)
    dest = write_template(root / ".dvc" / DEFAULT.name)
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", dest.name],
                   cwd=root, check=True, capture_output=True, text=True)
    return dest


if __name__ == "__main__":
    print(write_template(sys.argv[1]) if sys.argv[1:] else configure())
