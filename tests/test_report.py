"""Reports: self-contained HTML + Markdown, figure content, escaping, bad input, and a headless
Chromium rendering of the page (skipped when Chromium is not installed)."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from obliviate.reporting import plots
from obliviate.reporting.report import load_run, metric_side, write_report
from obliviate.runs.registry import RunFileError
from test_registry import fake_eval, make_demo_run, make_unlearn_run, questions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CI_INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


def fmt(v):  # the documented number format, written out independently
    return f"{v:.3e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4f}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    demo = make_demo_run(root / "d")
    unlearn = make_unlearn_run(root / "u", method="npo")
    rep = write_report([demo, unlearn], root / "out")
    return demo, unlearn, rep, rep.html.read_text()


def _section(text: str, start: str, end: str | None) -> str:
    i = text.index(start)
    return text[i:text.index(end, i)] if end else text[i:]


def test_html_is_self_contained(built):
    _, _, rep, text = built
    assert "<script" not in text and "<link" not in text and "http://" not in text and "https://" not in text
    srcs = re.findall(r"src='([^']*)'", text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # overview + (trade-off, relearning, truth ratios, loss) per run
    assert len(srcs) == 9 == len(rep.figures)
    embedded = sorted(base64.b64decode(s.split(",", 1)[1]) for s in srcs)
    assert embedded == sorted(p.read_bytes() for p in rep.figures)
    assert all(png.startswith(PNG_MAGIC) for png in embedded)


def test_metric_tables_split_forget_and_utility_sides(built):
    _, unlearn, _, text = built
    section = _section(text, "<h2 id='unlearn-npo-0'>", None)
    models = json.loads((unlearn / "metrics.json").read_text())["models"]
    forget = _section(section, "<h4>forget side</h4>", "<h4>utility side</h4>")
    utility = _section(section, "<h4>utility side</h4>", "</table>")
    labels = ("target", "oracle", "unlearned")
    for key in ("forget_quality", "forget_rouge", "forget_truth_ratio", "mia_auc_mink", "privleak"):
        cells = "".join(f"<td class='num'>{fmt(models[label][key])}</td>" for label in labels)
        assert f"<td class=''>{key}</td>{cells}" in forget
    for key in ("model_utility", "retain_rouge", "real_authors_probability", "world_facts_truth_ratio"):
        cells = "".join(f"<td class='num'>{fmt(models[label][key])}</td>" for label in labels)
        assert f"<td class=''>{key}</td>{cells}" in utility
    assert "<th>metric</th><th>target</th><th>oracle</th><th>unlearned</th>" in forget


def test_attack_sections(built):
    _, unlearn, _, text = built
    section = _section(text, "<h2 id='unlearn-npo-0'>", None)
    relearn = json.loads((unlearn / "attacks" / "relearn.json").read_text())
    assert f"Recovery: <b>{fmt(relearn['summary']['recovery'])}</b>" in section
    quant = json.loads((unlearn / "attacks" / "quantise.json").read_text())
    for bits in ("8", "4"):
        assert (f"<td class=''>{bits}-bit</td><td class='num'>{fmt(quant[bits]['forget_quality'])}</td>"
                f"<td class='num'>{fmt(quant[bits]['model_utility'])}</td>") in section


def test_generations_are_escaped(built):
    _, unlearn, _, text = built
    raw_question = questions("forget")[0]
    assert raw_question not in text and html.escape(raw_question) in text
    assert "<i>to</i>" not in text and "&lt;i&gt;to&lt;/i&gt;" in text
    ev = json.loads((unlearn / "eval" / "unlearned.json").read_text())
    first = ev["sets"]["retain"]["per_sample"]
    assert html.escape(f"{first['generation'][1]}  [ROUGE {fmt(first['rouge'][1])}]") in text
    assert f"{first['generation'][3]}" not in text  # three examples per set by default


def test_markdown_summary(built):
    demo, unlearn, rep, _ = built
    md = rep.markdown.read_text()
    un = json.loads((unlearn / "metrics.json").read_text())["models"]
    assert (f"| unlearn-npo-0 | npo | {fmt(un['unlearned']['forget_quality'])} | "
            f"{fmt(un['unlearned']['model_utility'])} | {fmt(un['oracle']['model_utility'])} |") in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 9 and all((rep.markdown.parent / link).exists() for link in links)
    assert "Relearning recovery" in md and "| 4-bit |" in md


def test_run_without_optional_files(tmp_path):
    run = make_unlearn_run(tmp_path, optional=False)
    rep = write_report([run], tmp_path / "out")
    text = rep.html.read_text()
    assert [p.name.rsplit("-", 1)[-1] for p in rep.figures] == ["truth_ratio.png", "loss.png"]
    assert "Relearning attack" not in text and "Quantisation" not in text and "<h2>Overview" not in text


def test_eval_run_without_metrics_uses_eval_aggregates(tmp_path):
    run = tmp_path / "eval-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"command": "eval", "model": "m"}))
    ev = fake_eval("mymodel", seed=5)
    # a set without perturbed answers has no truth ratios (evaluation writes null)
    ev["sets"]["holdout"] = json.loads(json.dumps(ev["sets"]["retain"]))
    ev["sets"]["holdout"]["truth_ratio"] = ev["sets"]["holdout"]["per_sample"]["truth_ratio_raw"] = None
    (run / "eval").mkdir()
    (run / "eval" / "mymodel.json").write_text(json.dumps(ev))
    data = load_run(run)
    assert data.models["mymodel"]["retain_rouge"] == ev["sets"]["retain"]["rouge"]
    assert data.models["mymodel"]["model_utility"] == ev["model_utility"]
    text = write_report([run], tmp_path / "out").html.read_text()
    assert f"<td class=''>retain_rouge</td><td class='num'>{fmt(ev['sets']['retain']['rouge'])}</td>" in text
    assert "<td class=''>holdout_truth_ratio</td><td class=''></td>" in text


def test_bad_eval_files_are_named(tmp_path):
    run = make_unlearn_run(tmp_path, optional=False)
    bad = run / "eval" / "oracle.json"
    bad.write_text(json.dumps({"model": "oracle"}))
    with pytest.raises(RunFileError, match=re.escape(str(bad)) + ".*'sets'"):
        load_run(run)
    ev = fake_eval("oracle", seed=1)
    ev["sets"]["retain"]["per_sample"]["rouge"].pop()
    bad.write_text(json.dumps(ev))
    with pytest.raises(RunFileError, match="set 'retain' has per-sample lists of different lengths"):
        load_run(run)
    bad.write_text("{oops")
    with pytest.raises(RunFileError, match="not valid JSON"):
        load_run(run)
    (run / "trajectory.json").write_text("{}")
    bad.unlink()
    with pytest.raises(RunFileError, match="trajectory.json: expected a JSON list"):
        load_run(run)


def test_metric_side():
    assert [metric_side(k) for k in ("forget_quality", "forget_rouge", "mia_auc", "privleak", "holdout_nll",
                                     "model_utility", "retain_rouge", "real_authors_probability", "seconds")] == \
        ["forget"] * 5 + ["utility"] * 3 + ["other"]


# ---------------------------------------------------------------------------------------------
# Figures: their data, not their pixels


def test_tradeoff_figure_plots_trajectory_on_log_axis():
    traj = [{"step": 0, "forget_quality": 1e-12, "model_utility": 0.6},
            {"step": 5, "forget_quality": 0.0, "model_utility": 0.55},  # underflowed p-value
            {"step": 10, "forget_quality": None, "model_utility": 0.5},  # not evaluated: skipped
            {"step": 15, "forget_quality": 0.3, "model_utility": 0.45}]
    fig = plots.tradeoff_figure({"npo": traj}, {"oracle": (1.0, 0.58), "target": (None, 0.6)})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "npo"]
    assert list(line.get_xdata()) == [1e-12, plots.FQ_FLOOR, 0.3] and list(line.get_ydata()) == [0.6, 0.55, 0.45]
    (oracle,) = ax.collections
    assert oracle.get_offsets().tolist() == [[1.0, 0.58]]  # target has no forget quality: not drawn
    assert plots.png_bytes(fig).startswith(PNG_MAGIC)


def test_relearn_figure_plots_both_models():
    relearn = {"steps": [0, 5, 10], "forget_rouge": [0.1, 0.3, 0.6], "forget_probability": [0.01, 0.1, 0.2],
               "oracle": {"steps": [0, 5, 10], "forget_rouge": [0.1, 0.2, 0.25],
                          "forget_probability": [0.0, 0.05, 0.1]},
               "summary": {"recovery": 0.5}}
    fig = plots.relearn_figure(relearn)
    assert len(fig.axes) == 2
    for ax, key in zip(fig.axes, ("forget_rouge", "forget_probability")):
        lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
        assert lines == {"unlearned": relearn[key], "oracle": relearn["oracle"][key]}
    assert "0.500" in fig._suptitle.get_text()


def test_truth_ratio_histogram_counts():
    rng = np.random.default_rng(0)
    values = {"oracle": (10 ** rng.normal(0, 0.5, 40)).tolist(),
              "unlearned": (10 ** rng.normal(-1, 0.5, 30)).tolist() + [0.0, -1.0]}
    fig = plots.truth_ratio_figure(values)
    ax = fig.axes[0]
    logs = {k: np.log10([v for v in vals if v > 0]) for k, vals in values.items()}
    bins = np.linspace(min(a.min() for a in logs.values()), max(a.max() for a in logs.values()) + 1e-9, 25)
    oracle_counts = [p.get_height() for p in ax.patches if p.get_label() in ("oracle (n=40)", "_nolegend_")]
    assert oracle_counts == np.histogram(logs["oracle"], bins)[0].tolist()
    (step,) = [p for p in ax.patches if p.get_label() == "unlearned (n=30)"]
    xy = step.get_xy()  # a step outline: the count of each bin appears as the height of its edge
    heights = [xy[2 * i + 1][1] for i in range(len(bins) - 1)]
    assert heights == np.histogram(logs["unlearned"], bins)[0].tolist()
    assert "2 non-positive" in ax.get_title()


def test_loss_figure_plots_each_part():
    rows = [{"step": s, "loss": 3.0 - s / 10, "forget_loss": 2.0, "retain_loss": 1.0 - s / 10, "lr": 1e-5}
            for s in range(1, 6)] + [{"step": 6, "lr": 1e-5}]
    ax = plots.loss_figure(rows).axes[0]
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
    assert set(lines) == {"loss", "forget_loss", "retain_loss"}
    assert lines["loss"] == ([1, 2, 3, 4, 5], [3.0 - s / 10 for s in range(1, 6)])


# ---------------------------------------------------------------------------------------------
# CLI


def test_report_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from obliviate.cli.evidence import report

    app = typer.Typer()
    app.command("report")(report)
    app.command("noop")(lambda: None)  # keep "report" a sub-command
    run = make_unlearn_run(tmp_path, optional=False)
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "out"), "--examples", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "report.md").exists()
    (run / "metrics.json").write_text("[1, 2]")
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "out2")])
    assert res.exit_code == 2 and "metrics.json" in res.output  # a user error: one line, exit code 2


# ---------------------------------------------------------------------------------------------
# Headless Chromium


def _chromium() -> str | None:
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


def _chrome(binary: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp)})


@pytest.mark.skipif(_chromium() is None, reason=f"Chromium is not installed (CI installs it: {CI_INSTALL})")
def test_report_renders_in_headless_chromium(built, tmp_path):
    from PIL import Image

    binary = _chromium()
    _, _, rep, _ = built
    url = rep.html.resolve().as_uri()
    shot = tmp_path / "shot.png"
    res = _chrome(binary, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", url)
    assert shot.exists(), res.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (2000, 1200, 3)
    not_white = (img < 245).any(axis=2).mean()
    assert 0.02 < not_white < 0.9, f"screenshot looks blank or broken ({not_white:.3f} non-white)"
    # pixels of the plots' blue (#1f77b4): the page's own CSS has none, so the PNGs were decoded and drawn
    blue = (np.abs(img - np.array([31, 119, 180])).sum(axis=2) < 40).sum()
    assert blue > 200, f"no plot visible in the screenshot ({blue} blue pixels)"

    dom = _chrome(binary, tmp_path, "--dump-dom", url).stdout
    imgs = re.findall(r"<img [^>]*>", dom)
    assert len(imgs) == 9
    assert all('class="plot"' in t and 'src="data:image/png;base64,' in t for t in imgs)
