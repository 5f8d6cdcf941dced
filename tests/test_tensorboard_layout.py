"""What a TensorBoard user sees, read back from the event file: custom-scalar charts that never put markers
of different scales on one axis, and a text table describing every logged marker."""

from __future__ import annotations

import re

import lightning.pytorch as L
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_geomarkers import GeometryMonitor
from lightning_geomarkers.functional import MARKERS
from tests.lightning_helpers import TinyMLP, gaussian_classes, loaders, read_events, trainer

# A wiring test: a few markers and a small GLUE budget (the values are not under test here).
WATCHED = ["glue_dimension", "glue_capacity", "glue_center_alignment", "glue_axis_alignment"]
WATCHED += ["participation_ratio", "numerical_rank", "nc1"]
SMALL = dict(markers=WATCHED, n_t=20, n_pairs=4, samples_per_class=20, lid_k=5)


def _plotted(layout, scalars) -> dict[str, list[str]]:
    """What TensorBoard's Custom Scalars tab draws per chart (keyed by its title, prefixed with the
    category's where several categories hold charts of one title): its tags are regular expressions
    matched (``re.match``) against the run's scalar keys."""
    titles = [chart.title for cat in layout.category for chart in cat.chart]
    return {
        (chart.title if titles.count(chart.title) == 1 else f"{cat.title} / {chart.title}"): sorted(
            k for k in scalars if any(re.match(t, k) for t in chart.multiline.tag)
        )
        for cat in layout.category
        for chart in cat.chart
    }


def _fit(tmp_path, monitor: GeometryMonitor | list[GeometryMonitor]):
    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(per_class=20)
    tr = trainer(tmp_path, monitor if isinstance(monitor, list) else [monitor], max_epochs=2)
    tr.fit(TinyMLP(), *loaders(x, y))
    return read_events(tr.logger.log_dir)


def test_custom_scalar_charts_do_not_mix_scales_and_markers_are_described(tmp_path):
    acc = _fit(tmp_path, GeometryMonitor(**SMALL))
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = _plotted(layout, acc.Tags()["scalars"])
    # Every monitored marker is laid out exactly once.
    laid_out = sorted(t for tags in charts.values() for t in tags)
    assert laid_out == sorted(f"geometry/{m}" for m in WATCHED)
    # One chart per marker; the only shared chart is the alignments' (all in [0, 1]).
    for title, tags in charts.items():
        if len(tags) > 1:
            assert all("alignment" in t for t in tags), (title, tags)
    # The measured values really differ in scale: numerical rank ~ tens, participation ratio ~ units.
    last = {m: acc.Scalars(f"geometry/{m}")[-1].value for m in ("numerical_rank", "participation_ratio")}
    assert last["numerical_rank"] > 3 * last["participation_ratio"]
    rank_chart = next(tags for tags in charts.values() if "geometry/numerical_rank" in tags)
    assert rank_chart == ["geometry/numerical_rank"]
    # Chart titles carry the marker's description.
    assert f"participation_ratio: {MARKERS['participation_ratio'].description}" in charts

    # The Text tab: one table, written once, naming every logged tag with its description.
    assert "geometry/markers/text_summary" in acc.Tags()["tensors"]
    events = acc.Tensors("geometry/markers/text_summary")
    assert len(events) == 1
    text = events[0].tensor_proto.string_val[0].decode()
    for m in WATCHED:
        assert f"| `geometry/{m}` | {MARKERS[m].description} |" in text
    assert "| `geometry/nc1` | neural collapse NC1 = tr(S_W S_B^+) / C | sign varies |" in text
    assert "| `geometry/glue_dimension` | GLUE effective dimension D_eff = E[b] / P | higher |" in text


def test_no_layout_or_text_without_custom_scalars(tmp_path):
    acc = _fit(
        tmp_path, GeometryMonitor(custom_scalars=False, log_spectrum=False, log_class_heatmap=False, **SMALL)
    )
    assert acc.Tags()["tensors"] == []
    assert acc.Tags()["histograms"] == []
    assert "geometry/glue_dimension" in acc.Tags()["scalars"]


def test_two_monitors_on_one_logger_share_one_layout_and_extras_follow_the_scalar_keys(tmp_path):
    """TensorBoard shows the last custom-scalars layout of a run: each monitor wrote its own, so the
    second hid the first's charts. With several layers the spectrum's tag used the raw layer name
    ('fc:input') where the scalars use 'fc_input', so they landed in different sections."""
    head = GeometryMonitor(layers="fc:input", prefix="head", **SMALL)
    both = GeometryMonitor(layers=["fc:input", "body.1"], prefix="both", log_class_heatmap=False, **SMALL)
    acc = _fit(tmp_path, [head, both])
    configs = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(configs[-1].tensor_proto.string_val[0])  # the one TensorBoard shows
    categories = [c.title for c in layout.category]
    assert {"head: GLUE", "both fc_input: GLUE", "both body.1: GLUE"} <= set(categories), categories
    tags = {k for keys in _plotted(layout, acc.Tags()["scalars"]).values() for k in keys}
    assert {"head/glue_dimension", "both/fc_input/glue_dimension"} <= tags
    histograms = set(acc.Tags()["histograms"])
    assert {
        "head/feature_spectrum",
        "both/fc_input/feature_spectrum",
        "both/body.1/feature_spectrum",
    } <= histograms
    assert "both/fc_input/glue_dimension" in acc.Tags()["scalars"]


def test_every_chart_draws_exactly_its_own_keys(tmp_path):
    """Chart tags are regular expressions matched at the start: 'geometry/lid' also drew 'lid_twonn', each
    GLUE chart its standard error ('_se'), and a prefix with regex characters ('geo(val)') drew nothing."""
    markers = ["glue_dimension", "glue_capacity", "lid", "lid_twonn", "participation_ratio"]
    monitor = GeometryMonitor(**{**SMALL, "markers": markers}, prefix="geo(val)", log_standard_errors=True)
    acc = _fit(tmp_path, monitor)
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    scalars = acc.Tags()["scalars"]
    assert "geo(val)/glue_dimension_se" in scalars and "geo(val)/lid_twonn" in scalars
    plotted = _plotted(layout, scalars)
    assert sorted(plotted.values()) == sorted([f"geo(val)/{m}"] for m in markers)


def test_two_monitors_with_one_prefix_keep_both_charts_and_one_table(tmp_path):
    """The merged layout was keyed by the prefix, so a second monitor with the same prefix (other layers)
    replaced the first one's charts, and each wrote its own text table under one tag."""
    head = GeometryMonitor(layers="fc:input", **SMALL)
    body = GeometryMonitor(layers=["body.1", "body.3"], **SMALL)
    acc = _fit(tmp_path, [head, body])
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    drawn = {k for keys in _plotted(layout, acc.Tags()["scalars"]).values() for k in keys}
    assert {"geometry/glue_dimension", "geometry/body.1/glue_dimension", "geometry/body.3/nc1"} <= drawn
    text = acc.Tensors("geometry/markers/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| `geometry/glue_dimension` |" in text and "| `geometry/body.3/nc1` |" in text


def test_every_tensorboard_logger_gets_the_extras(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from tests.lightning_helpers import read_events

    L.seed_everything(0, verbose=False)
    x, y = gaussian_classes(per_class=20)
    loggers = [TensorBoardLogger(tmp_path, name=n) for n in ("a", "b")]
    tr = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        callbacks=[GeometryMonitor(**SMALL)],
        logger=loggers,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    tr.fit(TinyMLP(), *loaders(x, y))
    for logger in loggers:
        tags = read_events(logger.log_dir).Tags()
        assert (
            "geometry/feature_spectrum" in tags["histograms"]
            and "custom_scalars__config__" in tags["tensors"]
        )


def test_single_layer_monitors_with_one_prefix_merge_their_charts_per_category(tmp_path):
    """Their categories have the same names ('geometry: Spectrum'): the merge kept only the last
    monitor's charts of each."""
    a = GeometryMonitor(layers="fc:input", **{**SMALL, "markers": ["participation_ratio"]})
    b = GeometryMonitor(layers="body.1", **{**SMALL, "markers": ["effective_rank"]})
    acc = _fit(tmp_path, [a, b])
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    drawn = {k for keys in _plotted(layout, acc.Tags()["scalars"]).values() for k in keys}
    assert {"geometry/participation_ratio", "geometry/effective_rank"} <= drawn
