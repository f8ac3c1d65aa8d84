"""`dvc plots show` renders offline: the page carries Vega itself, and every curve of dvc.yaml
is a valid Vega-Lite spec over the training step, with more than one evaluation point."""

import json
import re
import subprocess
import sys

import vl_convert
import yaml

from tests.conftest import REPO, make_clone, subprocess_env


def test_plots_show_loads_nothing_from_the_web_and_draws_every_curve_over_the_step(tmp_path):
    repo = make_clone(tmp_path / "repo")  # the committed training curves of the default run (dvclive/)
    for command in (["-m", "stack_dpo.plots"], ["-m", "dvc", "plots", "show"]):
        done = subprocess.run([sys.executable, *command], cwd=repo, env=subprocess_env(), capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
    page = (repo / "dvc_plots/index.html").read_text()
    assert "<script src" not in page.lower() and "window.vegaEmbed=" in page  # no CDN: the bundle is inline
    specs = {}
    for chunk in page.split("var spec = ")[1:]:  # DVC writes each plot as `var spec = {...}; vegaEmbed('#id', spec)`
        spec, end = json.JSONDecoder().raw_decode(chunk)
        specs[re.match(r";\s*vegaEmbed\('#([^']+)'", chunk[end:]).group(1)] = spec
    titles = [next(iter(plot)) for plot in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]]
    assert len(specs) == len(titles) >= 10  # loss, learning rate, grad norm, rewards, log-probs
    for title in ("SFT learning rate", "DPO grad norm", "DPO log-probs (chosen, rejected)"):
        assert re.sub(r"[ (),]", "_", title) in specs
    for name, spec in specs.items():
        assert spec["encoding"]["x"]["field"] == "step", name
        rows = spec["data"]["values"]
        assert len({row["step"] for row in rows}) > 3, name  # curves, not dots
        for eval_file in {row.get("filename", "") for row in rows} - {""}:
            assert len([row for row in rows if row.get("filename") == eval_file]) >= 3, (name, eval_file)
        svg = vl_convert.vegalite_to_svg(spec)  # it renders, here and offline: the spec is whole
        assert svg.startswith("<svg") and "<path" in svg, name
    assert any(row["filename"] == "eval/loss.tsv" for row in specs["DPO_loss"]["data"]["values"])
