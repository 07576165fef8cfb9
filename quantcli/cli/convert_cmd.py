"""`quantcli convert MODEL --bits 8|4 -o OUT`: write a quantized model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from quantcli.calibrate.config import DEFAULT_METHOD
from quantcli.cli.calibrate_cmd import MethodOpt, PercentileOpt, _Bar
from quantcli.cli.common import (
    BatchOpt,
    ExcludeOpt,
    ForceOpt,
    IncludeOpt,
    JsonOpt,
    LimitOpt,
    ModelArg,
    OpTypesOpt,
    OutputOpt,
    PreprocessOpt,
    SmoothOpt,
    count_rows,
    handle_errors,
    op_selection,
    out,
    parse_preprocess,
    print_json,
    print_table,
    warn,
)
from quantcli.errors import InputError


@handle_errors
def convert(
    model: ModelArg,
    output: OutputOpt,
    bits: Annotated[int, typer.Option("--bits", help="8 (INT8) or 4 (INT4 weight-only).")] = 8,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Calibration samples (see calibrate).")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", help="A table from quantcli calibrate.")
    ] = None,
    dynamic: Annotated[
        bool, typer.Option("--dynamic", help="INT8 dynamic quantization: no calibration.")
    ] = False,
    format_: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="INT8: auto (default: QDQ convs, dynamic MatMuls), qdq or qoperator. INT4: "
            "matmulnbits (default) or qdq (standard DequantizeLinear int4).",
        ),
    ] = None,
    per_channel: Annotated[
        bool, typer.Option("--per-channel/--per-tensor", help="INT8 weight granularity.")
    ] = True,
    activation_type: Annotated[
        str, typer.Option("--activation-type", help="INT8 activations: uint8 or int8.")
    ] = "uint8",
    weight_type: Annotated[
        str, typer.Option("--weight-type", help="INT8 weights: int8 or uint8.")
    ] = "int8",
    symmetric_activations: Annotated[
        bool, typer.Option("--symmetric-activations", help="Symmetric activation ranges.")
    ] = False,
    reduce_range: Annotated[
        bool,
        typer.Option("--reduce-range", help="7-bit weights everywhere (ONNX Runtime's remedy)."),
    ] = False,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="INT8: cpu (default: accurate on every CPU, x86 without VNNI included), "
            "cpu-vnni (full 8-bit: only x86 with VNNI/AMX, or ARM64 with dot product) or "
            "tensorrt (symmetric int8 QDQ).",
        ),
    ] = "cpu",
    depthwise: Annotated[
        bool,
        typer.Option("--depthwise/--no-depthwise", help="Quantize depthwise convs."),
    ] = True,
    bias_correction: Annotated[
        bool,
        typer.Option(
            "--bias-correction/--no-bias-correction",
            help="Correct the mean shift weight rounding causes (needs calibration).",
        ),
    ] = True,
    smooth: SmoothOpt = True,
    op_types: OpTypesOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    method: MethodOpt = DEFAULT_METHOD,
    percentile: PercentileOpt = 99.99,
    batch_size: BatchOpt = 1,
    limit: LimitOpt = None,
    preprocess: PreprocessOpt = None,
    block_size: Annotated[
        int, typer.Option("--block-size", help="INT4: block along K (16..256).")
    ] = 32,
    symmetric: Annotated[
        bool, typer.Option("--symmetric/--asymmetric", help="INT4 weights: zero point or not.")
    ] = False,
    algorithm: Annotated[
        str, typer.Option("--algorithm", help="INT4: rtn (default) or gptq (needs --data).")
    ] = "rtn",
    embeddings: Annotated[
        bool,
        typer.Option(
            "--embeddings/--no-embeddings", help="INT4: also quantize Gather embedding tables."
        ),
    ] = False,
    accuracy_level: Annotated[
        int,
        typer.Option(
            "--accuracy-level",
            help="INT4 MatMulNBits accuracy_level: 4 int8 activations (fast), 0 float.",
        ),
    ] = 4,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            help="INT8: replay a recipe from quantcli tune (per-node formats and every "
            "option); with the same --data it rebuilds the same file byte for byte.",
        ),
    ] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Quantize MODEL to INT8 (QDQ, QOperator or dynamic) or INT4 and write it to -o."""
    if bits == 8:
        summary = _int8(**locals())
    elif bits == 4:
        summary = _int4(**locals())
    else:
        raise InputError(f"--bits {bits} is not supported", hint="use --bits 8 or --bits 4")
    doc = summary.to_dict()
    for message in summary.warnings:
        warn(message)
    if json_:
        print_json(doc)
    else:
        render(doc)


def _int8(**o: Any) -> Any:
    from quantcli.calibrate.config import CalibrationConfig
    from quantcli.convert import convert_int8_file
    from quantcli.quantize.config import Int8Config

    if o["recipe"] is not None:
        return _replay(o)
    if o["dynamic"] and o["format_"] not in (None, "dynamic"):
        raise InputError("--dynamic and --format are exclusive", hint="drop one of them")
    if o["algorithm"] != "rtn" or o["block_size"] != 32:
        raise InputError("--algorithm/--block-size are INT4 options", hint="add --bits 4")
    if not (o["data"] or o["calibration"] or o["dynamic"]):
        raise InputError(
            "INT8 needs activation ranges",
            hint="pass --data SAMPLES, --calibration table.json, or --dynamic",
        )
    fields = op_selection(o["op_types"], o["include"], o["exclude"])
    if o["dynamic"] or o["format_"]:
        fields["format"] = "dynamic" if o["dynamic"] else o["format_"]
    fields.update(
        per_channel=o["per_channel"],
        weight_type=o["weight_type"],
        reduce_range=o["reduce_range"],
        quantize_depthwise=o["depthwise"],
        bias_correction=o["bias_correction"],
        smooth=o["smooth"],
    )
    if o["target"] == "tensorrt":
        config = Int8Config.for_target("tensorrt", **fields)
    else:
        config = Int8Config(
            activation_type=o["activation_type"],
            symmetric_activations=o["symmetric_activations"],
            target=o["target"],
            **fields,
        )
    calibration = CalibrationConfig(
        method=o["method"],
        percentile=o["percentile"],
        batch_size=o["batch_size"],
        limit=o["limit"],
        symmetric=config.symmetric_activations,
    )
    return convert_int8_file(
        o["model"],
        o["output"],
        config,
        data_spec=o["data"],
        table_path=o["calibration"],
        calibration=calibration,
        images=parse_preprocess(o["preprocess"]),
        force=o["force"],
        progress=_Bar(),
    )


def _replay(o: dict[str, Any]) -> Any:
    """convert --recipe: the recipe's options, checked against the model it was made for."""
    from quantcli.calibrate.table import model_fingerprint
    from quantcli.convert import convert_int8_file
    from quantcli.graph.io import check_model_path
    from quantcli.quantize.recipe import load_recipe

    recipe = load_recipe(o["recipe"])
    check_model_path(Path(o["model"]))
    if recipe.model_fingerprint != model_fingerprint(Path(o["model"])):
        raise InputError(
            f"the recipe was made for another model than {o['model']}",
            hint="replay a recipe on the model quantcli tune searched",
        )
    return convert_int8_file(
        o["model"],
        o["output"],
        recipe.int8,
        data_spec=o["data"],
        table_path=o["calibration"],
        calibration=recipe.calibration,
        images=parse_preprocess(o["preprocess"]),
        force=o["force"],
        progress=_Bar(),
    )


def _int4(**o: Any) -> Any:
    from quantcli.convert import convert_int4_file
    from quantcli.quantize.int4 import Int4Config

    if o["dynamic"] or o["calibration"]:
        raise InputError("--dynamic/--calibration are INT8 options", hint="drop them for --bits 4")
    config = Int4Config(
        block_size=o["block_size"],
        symmetric=o["symmetric"],
        algorithm=o["algorithm"],
        format=o["format_"] or "matmulnbits",
        accuracy_level=o["accuracy_level"],
        exclude=tuple(o["exclude"] or ()),
        embeddings=o["embeddings"],
    )
    return convert_int4_file(
        o["model"],
        o["output"],
        config,
        data_spec=o["data"],
        limit=o["limit"],
        batch_size=o["batch_size"],
        force=o["force"],
        progress=_Bar(),
    )


def render(doc: dict[str, Any]) -> None:
    ratio = doc["size_ratio"]
    text = (
        f"Wrote {doc['output']} ({doc['bits']}-bit, {doc['format']}): "
        f"{doc['size_before'] / 1e6:.2f} MB -> {doc['size_after'] / 1e6:.2f} MB "
        f"({ratio:.2f}x) in {doc['seconds']:.1f} s"
    )
    out.print(escape(text))
    if "target" in doc:
        out.print(escape(target_line(doc["target"], doc["x86_saturation"])))
    print_table("Quantized nodes", ["op type", "nodes"], count_rows(doc["quantized"]))
    if doc["float"]:
        reasons = Counter(f"{e['op_type']}: {e['reason']}" for e in doc["float"])
        print_table("Left in float", ["why", "nodes"], count_rows(dict(reasons)))


_TARGETS = {
    "cpu": "every CPU (x86 with or without VNNI, ARM)",
    "cpu-vnni": "x86 with VNNI/AMX and ARM64 with dot product only",
    "tensorrt": "TensorRT",
}


def target_line(target: str, check: dict[str, Any] | None) -> str:
    line = f"Target {target}: {_TARGETS.get(target, target)}"
    if check is None or check["checked_weights"] == 0:
        return line
    if check["safe"]:
        return f"{line}; no int16 pair can saturate on x86 without VNNI"
    return (
        f"{line}; {len(check['nodes_at_risk'])} nodes ({check['unsafe_channels']} channels) "
        "can saturate int16 pairs on x86 without VNNI (AVX2): accuracy drops there"
    )
