"""Training curves that render without internet: an HTML template for `dvc plots show` that
carries Vega, Vega-Lite and Vega-Embed itself (vl-convert-python's bundle), instead of DVC's
default page, which loads them from a CDN. `.dvc/config` points `plots.html_template` at it;
`make install` writes it (`python -m stack_dpo.plots`)."""

from __future__ import annotations

from pathlib import Path

from stack_dpo.outputs import write_text_atomic

TEMPLATE = Path(".dvc/tmp/plots-offline.html")  # .dvc/config: plots.html_template = tmp/plots-offline.html
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>stack-dpo training curves</title>
    <script>BUNDLE</script>
    <style>table { border-spacing: 15px; } body { font-family: sans-serif; }</style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_page() -> str:
    """DVC's page without its `{scripts}` placeholder (where the CDN script tags would go), with
    the libraries inlined; vegaEmbed, vega and vegaLite become globals, as DVC's plot divs expect."""
    import vl_convert

    # DVC writes Vega-Lite 5 specs: the newest 5.x the package carries
    v5 = max((v for v in vl_convert.get_vegalite_versions() if v.startswith("5.")),
             key=lambda v: tuple(map(int, v.split("."))))
    return PAGE.replace("BUNDLE", vl_convert.javascript_bundle(vl_version=f"v{v5}"))


def main() -> None:
    write_text_atomic(TEMPLATE, offline_page())
    print(f"{TEMPLATE}: written (dvc plots show renders offline)")


if __name__ == "__main__":
    main()
