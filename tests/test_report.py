"""Report: report.md with the summary, best reward and every layer, plus valid non-empty PNGs."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchpocket.report import plot_ablation, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1"]


def _trials() -> list[dict]:
    trials = []
    for i in range(8):
        policy = [0.3 + 0.05 * ((i + j) % 5) for j in range(len(LAYERS))]
        trials.append({"trial": i, "optimizer": "tpe" if i % 2 else "random", "policy": policy,
                       "resource": 0.45 + 0.01 * i, "val_acc": 0.80 + 0.01 * (i % 4),
                       "reward": 0.70 + 0.013 * (i % 4) - 0.001 * i, "seconds": 1.5, "status": "ok", "reason": ""})
    trials[5] = {**trials[5], "status": "failed", "reason": "NonFiniteLoss: loss became nan", "reward": float("nan"),
                 "val_acc": float("nan")}
    return trials


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_write_report(tmp_path: Path) -> None:
    trials = _trials()
    best = max((t for t in trials if t["status"] == "ok"), key=lambda t: t["reward"])
    summary = {"baseline": {"test_acc": 0.9123, "flops": 81_626_368, "params": 272_474, "size_bytes": 1_100_000,
                            "latency_ms": 4.2},
               "compressed": {"test_acc": 0.9011, "flops": 40_000_000, "params": 150_000, "size_bytes": 610_000,
                              "latency_ms": 2.5},
               "search_seconds": 321.5, "learner": "chn-pruned", "target": 0.5, "config": {"nested": "skipped"}}
    run_dir = tmp_path / "run"
    path = write_report(run_dir, trials=trials, summary=summary, layer_names=LAYERS, best_policy=best["policy"],
                        uniform_policy=[0.5] * len(LAYERS), title="resnet20 chn-pruned tpe")
    assert path == run_dir / "report.md"
    text = path.read_text()
    assert text.startswith("# resnet20 chn-pruned tpe\n")
    for name in LAYERS:
        assert f"| {name} |" in text
    assert f"{best['reward']:.4f}" in text and f"trial {best['trial']}" in text
    assert "| test_acc | 0.9123 | 0.9011 |" in text
    assert "| flops | 81,626,368 | 40,000,000 | 0.490 |" in text
    assert "| search_seconds | 321.5 |" in text and "| learner | chn-pruned |" in text
    assert "nested" not in text  # only scalars
    assert "8 (1 failed)" in text and "NonFiniteLoss" in text
    pngs = sorted(run_dir.glob("*.png"))
    assert [p.name for p in pngs] == ["policy.png", "reward.png", "tradeoff.png"]
    for png in pngs:
        assert _is_png(png), png
        assert f"]({png.name})" in text


def test_write_report_without_uniform_and_all_failed(tmp_path: Path) -> None:
    trials = [{**t, "status": "failed", "reason": "x"} for t in _trials()[:3]]
    path = write_report(tmp_path, trials=trials, summary={}, layer_names=LAYERS, best_policy=[0.5] * 4,
                        uniform_policy=None, title="t")
    text = path.read_text()
    assert "Best reward" not in text and "uniform" not in text and "3 (3 failed)" in text
    assert "| # | layer | best |\n" in text
    assert all(_is_png(tmp_path / n) for n in ("reward.png", "policy.png", "tradeoff.png"))
    with pytest.raises(ValueError, match="3 values for 4 layers"):
        write_report(tmp_path, trials=[], summary={}, layer_names=LAYERS, best_policy=[0.5] * 3,
                     uniform_policy=None, title="t")


@pytest.mark.parametrize("x_values", [[0.25, 0.5, 0.75], ["resnet20", "vgg16", "mobilenet_v2"]])
def test_plot_ablation(tmp_path: Path, x_values: list) -> None:
    rows = [{"target": x, "hpo": h, "acc": 0.8 + 0.05 * i + (0.01 if h == "tpe" else 0), "acc_std": 0.01}
            for h in ("ddpg", "tpe") for i, x in enumerate(x_values)]
    out = plot_ablation(rows, tmp_path / "plots" / "ablation.png", x="target", y="acc", hue="hpo")
    assert out == tmp_path / "plots" / "ablation.png" and _is_png(out)


def test_report_html_is_self_contained(tmp_path: Path) -> None:
    import base64
    import re

    trials = _trials()
    write_report(tmp_path, trials=trials, summary={"baseline": {"test_acc": 0.9}, "compressed": {"test_acc": 0.8},
                                                   "learner": "<chn-pruned>"},
                 layer_names=LAYERS, best_policy=[0.5] * 4, uniform_policy=[0.4] * 4, title="net & co")
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<title>net &amp; co</title>" in page
    assert "&lt;chn-pruned&gt;" in page and "<chn-pruned>" not in page  # escaped, never markup
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    assert len(images) == 3  # reward, trade-off, policy: all inlined (the file names are gone)
    for data in images:
        assert base64.b64decode(data)[:8] == PNG_MAGIC
    assert 'src="reward.png"' not in page and "<td class=r>0.4</td>" in page
    assert page.count("<table>") == (tmp_path / "report.md").read_text().count("\n|---")


def test_report_html_images_load_in_a_browser(tmp_path: Path) -> None:
    """Headless Chromium opens report.html and every image decodes (naturalWidth > 0)."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    write_report(tmp_path, trials=_trials(), summary={}, layer_names=LAYERS, best_policy=[0.5] * 4,
                 uniform_policy=None, title="browser")
    page = (tmp_path / "report.html").read_text()
    probe = tmp_path / "probe.html"  # the same page, plus a script that writes how many images decoded
    probe.write_text(page.replace("</body>", "<script>window.onload=()=>{const i=[...document.images];"
                                  "document.body.setAttribute('data-loaded',i.filter(x=>x.naturalWidth>0).length+'/'"
                                  "+i.length)}</script></body>"))
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-loaded="3/3"' in out.stdout, out.stderr[-2000:]
