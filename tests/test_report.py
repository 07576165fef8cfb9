from __future__ import annotations

import dataclasses
import json
import math
import re
from html.parser import HTMLParser

import pytest

from quantcli.errors import InputError
from quantcli.evaluate import CompareConfig, CompareResult, DataInfo, GateSpec, ModelInfo
from quantcli.evaluate.gates import evaluate_gates
from quantcli.evaluate.latency import compare_times
from quantcli.evaluate.metrics import ClassifierMetrics, OutputMetrics, TensorError
from quantcli.evaluate.per_layer import LayerError
from quantcli.report import render, write_report

MS = 1_000_000


def error(sqnr: float, cosine: float = 0.999) -> TensorError:
    return TensorError(8, cosine, cosine, sqnr, 0.5, 0.01, 0)


def result_dict(layers: bool = True) -> dict:
    io = (("x", "float"),), (("logits", "float"),)
    cls = ClassifierMetrics(10, 0.95, 1.0, 0.01, False, 0.9, 0.875)
    outputs = [
        OutputMetrics("logits", error(31.2), cls),
        OutputMetrics("aux|1", error(math.inf), None),
    ]
    per_layer = [
        LayerError("conv_1/out", "conv_1/out_DequantizeLinear_Output", "Conv", error(12.0, 0.95)),
        LayerError("fc", "fc_dq", "MatMul", error(25.0)),
        LayerError("x", "x_dq", "(input)", error(math.inf, 1.0)),
    ]
    float_ns, quant_ns = [3 * MS, 4 * MS, 5 * MS, 30 * MS], [1 * MS, 2 * MS, 2 * MS, 3 * MS]
    latency = compare_times(float_ns, quant_ns, batch_size=1, warmup=2)
    config = CompareConfig(gates=GateSpec(max_drop=1.0, min_cosine=0.99))
    result = CompareResult(
        ModelInfo("float <model>.onnx", 4_000_000, (), *io),
        ModelInfo("quant.onnx", 1_000_000, (), *io),
        DataInfo("images/*.png", 8, 8, False, True),
        config,
        outputs,
        latency,
        per_layer if layers else None,
        {"my_metric": 0.5},
    )
    gates = evaluate_gates(config.gates, result.summary())
    return dataclasses.replace(result, gates=gates).to_dict()


class Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.classes: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.classes += [v or "" for k, v in attrs if k == "class"]

    def handle_data(self, data):
        self.text.append(data)


def test_result_dict_is_plain_json():
    d = result_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["summary"]["accuracy_drop_points"] == pytest.approx(2.5)
    assert [g["passed"] for g in d["gates"]] == [False, True] and d["passed"] is False


def test_markdown_sections():
    text = render(result_dict(), "md")
    for heading in ("# quantcli compare", "## Outputs", "## Latency", "## Gates"):
        assert heading in text
    assert "## Per-layer error (worst 3 of 3)" in text and "## Custom metrics" in text
    assert "**Result: FAILED: max-drop**" in text
    assert "aux\\|1" in text  # pipes in names do not break the table
    assert "| 1 | conv_1/out | Conv | 12.0 |" in text
    assert "∞" in text and "Speedup ×" in text


def test_markdown_without_optional_sections():
    d = result_dict(layers=False)
    d.update(latency=None, gates=[], custom_metrics={})
    text = render(d, ".md")
    assert "no gates set" in text and "## Latency" not in text and "Per-layer" not in text


def test_html_is_self_contained_with_charts():
    page = render(result_dict(), "html")
    parser = Collector()
    parser.feed(page)
    parser.close()
    assert parser.tags.count("svg") == 2
    assert {"chart sqnr", "chart latency"} <= set(parser.classes)
    assert parser.tags.count("rect") >= 3 + 2  # a bar per layer, a box per model
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "<link" not in page
    assert "float &lt;model&gt;.onnx" in page  # names are escaped
    assert any("FAILED" in t for t in parser.text)


@pytest.mark.parametrize("ext", [".json", ".md", ".html"])
def test_write_report_by_extension(tmp_path, ext):
    d = result_dict()
    path = write_report(d, tmp_path / f"report{ext}")
    text = path.read_text(encoding="utf-8")
    assert text == render(d, ext)
    if ext == ".json":
        assert json.loads(text)["schema"] == "quantcli.compare/1"
    assert [p.name for p in tmp_path.iterdir()] == [f"report{ext}"]  # no temp file left


def test_write_report_replaces_existing(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    write_report(result_dict(), path)
    assert json.loads(path.read_text())["passed"] is False


def test_write_report_bad_extension(tmp_path):
    with pytest.raises(InputError, match="report format"):
        write_report(result_dict(), tmp_path / "report.pdf")
    with pytest.raises(InputError, match="does not exist"):
        write_report(result_dict(), tmp_path / "missing" / "report.md")
