"""Plots a user can read: no text under 8 pt, and every plot names a model the same way."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from mixquant.experiments import plots  # noqa: E402


@pytest.fixture
def captured(monkeypatch):
    figures = []

    def keep(fig, plt, path):
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield figures
    import matplotlib.pyplot as plt

    for fig in figures:
        plt.close(fig)


def _texts(fig):
    import matplotlib.text

    fig.canvas.draw()
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]


def _info(n_layers: int):
    layers = [{"name": f"features.{i}.conv.{i % 3}", "params": 100 * (i + 1)} for i in range(n_layers)]
    errors = {l["name"]: {"bits": [2, 3, 4], "norm": [1e-1, 3e-2, 1e-2], "sse": [1, 1, 1], "mse": [1, 1, 1],
                          "max_abs": [1, 1, 1]} for l in layers}
    return {"title": "MobileNetV2 (torchvision ImageNet weights) on real photos", "levels": [3.0], "layers": layers,
            "errors_per_channel": errors, "primary": "agree", "fp32": {"agree": 1.0}}


def _records(info):
    bits = {l["name"]: 3 for l in info["layers"]}
    metrics = {"agree": 0.5, "kl": 0.3, "top1": 0.5}
    return [
        {"model": "mobilenet_v2", "study": "asym", "selector": "mixquant", "level": 3.0, "avg_bits": 3.0,
         "bits": bits, "metrics": metrics},
        {"model": "mobilenet_v2", "study": "asym", "selector": "uniform", "level": 3.0, "avg_bits": 3.0,
         "metrics": metrics},
        {"model": "mobilenet_v2", "study": "brecq", "selector": "mixquant", "level": 3.0, "avg_bits": 3.0,
         "metrics": {"agree": 0.7, "kl": 0.2, "top1": 0.7}, "seed": 0},
        {"model": "mobilenet_v2", "study": "brecq", "selector": "mixquant", "level": 3.0, "avg_bits": 3.0,
         "metrics": {"agree": 0.8, "kl": 0.1, "top1": 0.8}, "seed": 1},
    ]


def test_every_text_is_at_least_8pt_and_names_the_model_alike(captured):
    info = _info(60)  # MobileNetV2 has 53 layers: the crowded case
    recs = _records(info)
    plots.pareto_plot("mobilenet_v2", info, recs, "p.png")
    plots.allocation_plot("mobilenet_v2", info, recs, "a.png")
    plots.heatmap_plot("mobilenet_v2", info, recs, "h.png")
    runs = [{"method": "asymmetric", "config": "uniform 4", "avg_bits": 4.0, "metrics": {
        "agree": 0.5, "top1_views": 0.4, "kl": 0.2}}]
    plots.comparison_plot(runs, {"top1_views": 0.9}, "c.png", title="MobileNetV2, demo")
    plots.bits_curve_plot([{"selector": "uniform", "avg_bits": 4.0, "metrics": {"agree": 0.5, "kl": 0.2}},
                           {"selector": "MixQuant", "avg_bits": 4.0, "metrics": {"agree": 0.8, "kl": 0.1}}],
                          {}, "k.png", title="MobileNetV2, curve")
    assert len(captured) == 5
    for fig in captured:
        texts = _texts(fig)
        small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < plots.TICK_PT]
        assert not small, small[:3]
        joined = " ".join(t.get_text() for t in texts)
        assert "mobilenet_v2" not in joined and "torchvision ImageNet weights" not in joined
    titles = [" ".join(t.get_text() for t in _texts(fig)) for fig in captured[:3]]
    assert all("MobileNetV2:" in t for t in titles)


def test_seeds_give_error_bars(captured):
    info = _info(5)
    plots.pareto_plot("mobilenet_v2", info, _records(info), "p.png")
    from matplotlib.container import ErrorbarContainer

    bars = [c for ax in captured[0].axes for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert bars  # the two BRECQ seeds: mean with a spread
