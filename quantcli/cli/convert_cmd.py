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
        bool | None,
        typer.Option(
            "--per-channel/--per-tensor",
            help="INT8 weight granularity.",
            show_default="per-channel",
        ),
    ] = None,
    activation_type: Annotated[
        str | None,
        typer.Option(
            "--activation-type", help="INT8 activations: uint8 or int8.", show_default="uint8"
        ),
    ] = None,
    weight_type: Annotated[
        str | None,
        typer.Option("--weight-type", help="INT8 weights: int8 or uint8.", show_default="int8"),
    ] = None,
    symmetric_activations: Annotated[
        bool, typer.Option("--symmetric-activations", help="Symmetric activation ranges.")
    ] = False,
    reduce_range: Annotated[
        bool,
        typer.Option("--reduce-range", help="7-bit weights everywhere (ONNX Runtime's remedy)."),
    ] = False,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="INT8: cpu (default: accurate on every CPU, x86 without VNNI included), "
            "cpu-vnni (full 8-bit: only x86 with VNNI/AMX, or ARM64 with dot product) or "
            "tensorrt (symmetric int8 QDQ).",
            show_default="cpu",
        ),
    ] = None,
    depthwise: Annotated[
        bool | None,
        typer.Option(
            "--depthwise/--no-depthwise", help="Quantize depthwise convs.", show_default="depthwise"
        ),
    ] = None,
    bias_correction: Annotated[
        bool | None,
        typer.Option(
            "--bias-correction/--no-bias-correction",
            help="Correct the mean shift weight rounding causes (needs calibration).",
            show_default="bias-correction",
        ),
    ] = None,
    smooth: SmoothOpt = None,
    standard_ops: Annotated[
        bool,
        typer.Option(
            "--standard-ops",
            help="INT8: only standard ONNX ops (MatMulInteger, not ONNX Runtime's "
            "com.microsoft ops), for other runtimes.",
        ),
    ] = False,
    op_types: OpTypesOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    method: MethodOpt = None,
    percentile: PercentileOpt = None,
    batch_size: BatchOpt = 1,
    limit: LimitOpt = None,
    preprocess: PreprocessOpt = None,
    block_size: Annotated[
        int | None,
        typer.Option("--block-size", help="INT4: block along K (16..256).", show_default="32"),
    ] = None,
    symmetric: Annotated[
        bool | None,
        typer.Option(
            "--symmetric/--asymmetric",
            help="INT4 weights: zero point or not.",
            show_default="asymmetric",
        ),
    ] = None,
    algorithm: Annotated[
        str | None,
        typer.Option(
            "--algorithm",
            help="INT4: auto (default: gptq with --data, rtn with clip search without), rtn "
            "or gptq.",
        ),
    ] = None,
    embeddings: Annotated[
        bool | None,
        typer.Option(
            "--embeddings/--no-embeddings",
            help="INT4 Gather embedding tables. Default: a table tied to the output head reads "
            "the head's quantized weights (stored once), other tables are quantized too; "
            "--no-embeddings keeps tables float.",
            show_default=False,
        ),
    ] = None,
    accuracy_level: Annotated[
        int | None,
        typer.Option(
            "--accuracy-level",
            help="INT4 MatMulNBits accuracy_level: 4 int8 activations, 0 float. Default: "
            "chosen for this host (4 where int8 dot products are fast).",
        ),
    ] = None,
    compact_scales: Annotated[
        bool,
        typer.Option(
            "--compact-scales",
            help="INT4 matmulnbits: store a float32 model's block scales as float16 (0.5 bits "
            "per weight less at block 32), widened to float32 by ONNX Runtime's graph "
            "optimizations when it loads the model; do not run the file with them disabled.",
        ),
    ] = False,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            help="INT4 mixed precision: average bits per weight (4.5) or the most the file "
            "may weigh (120MB); each MatMul group becomes 4-bit (block 32 or 128), 8-bit or "
            "float, chosen by its output error on --data.",
        ),
    ] = None,
    mix: Annotated[
        str | None,
        typer.Option(
            "--mix",
            help="INT4 mixed precision preset, no data needed: k-quant (8-bit output head "
            "and some layers' attention Q/K/V and FFN down projections, like llama.cpp "
            "Q4_K_M).",
        ),
    ] = None,
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
    from quantcli.quantize.int8.config import Int8Config

    if o["recipe"] is not None:
        return _replay(o)
    if o["dynamic"] and o["format_"] not in (None, "dynamic"):
        raise InputError("--dynamic and --format are exclusive", hint="drop one of them")
    given = _given(o, INT4_ONLY)
    if given:
        raise InputError(f"{'/'.join(given)} {_are(given)} INT4 options", hint="add --bits 4")
    o = {**o, **{key: value for key, value in INT8_DEFAULTS.items() if o[key] is None}}
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
        standard_ops=o["standard_ops"],
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
    from quantcli.quantize.int8.recipe import load_recipe

    given = _given(o, INT8_ONLY | INT4_ONLY, keep=("calibration", "preprocess", "recipe"))
    if o["format_"] is not None:
        given.append("--format")
    given += [flag for key, flag in (("exclude", "--exclude"), ("limit", "--limit")) if o[key]]
    if o["batch_size"] != 1:
        given.append("--batch-size")
    if given:
        raise InputError(
            f"--recipe sets every conversion option; {'/'.join(given)} cannot change it",
            hint="drop them, or convert without --recipe",
        )
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


# Options of one kind of conversion only: given with the other --bits they are an error.
INT8_ONLY = {
    "calibration": "--calibration",
    "dynamic": "--dynamic",
    "per_channel": "--per-channel/--per-tensor",
    "activation_type": "--activation-type",
    "weight_type": "--weight-type",
    "symmetric_activations": "--symmetric-activations",
    "reduce_range": "--reduce-range",
    "target": "--target",
    "depthwise": "--depthwise/--no-depthwise",
    "bias_correction": "--bias-correction/--no-bias-correction",
    "smooth": "--smooth/--no-smooth",
    "standard_ops": "--standard-ops",
    "op_types": "--op-types",
    "include": "--include",
    "method": "--method",
    "percentile": "--percentile",
    "preprocess": "--preprocess",
    "recipe": "--recipe",
}
# False: not given
_OFF_FLAGS = {"dynamic", "reduce_range", "symmetric_activations", "standard_ops", "compact_scales"}
INT8_DEFAULTS = {
    "per_channel": True,
    "activation_type": "uint8",
    "weight_type": "int8",
    "target": "cpu",
    "depthwise": True,
    "bias_correction": True,
    "smooth": True,
    "method": DEFAULT_METHOD,
    "percentile": 99.99,
}
INT4_ONLY = {
    "block_size": "--block-size",
    "symmetric": "--symmetric/--asymmetric",
    "algorithm": "--algorithm",
    "embeddings": "--embeddings/--no-embeddings",
    "accuracy_level": "--accuracy-level",
    "compact_scales": "--compact-scales",
    "budget": "--budget",
    "mix": "--mix",
}


def _given(o: dict[str, Any], flags: dict[str, str], keep: tuple[str, ...] = ()) -> list[str]:
    """The options among `flags` the user gave (an off switch left off counts as not given)."""
    return [
        flag
        for key, flag in flags.items()
        if key not in keep and o[key] is not None and not (o[key] is False and key in _OFF_FLAGS)
    ]


def _are(flags: list[str]) -> str:
    return "are" if len(flags) > 1 else "is one of the"


def parse_budget(text: str | None) -> tuple[float | None, int | None]:
    """--budget: bits per weight (a plain number) or a size (120MB, 0.2GB, 90000000B)."""
    if text is None:
        return None, None
    value = text.strip().upper()
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)):
        if value.endswith(unit):
            try:
                return None, int(float(value[: -len(unit)]) * scale)
            except ValueError:
                break
    else:
        try:
            return float(value), None
        except ValueError:
            pass
    raise InputError(
        f"--budget '{text}' is neither bits per weight nor a size",
        hint="for example --budget 4.5 (bits per weight) or --budget 120MB",
    )


def _int4(**o: Any) -> Any:
    from quantcli.convert import convert_int4_file
    from quantcli.quantize.int4.config import Int4Config

    given = _given(o, INT8_ONLY)
    if given:
        raise InputError(
            f"{'/'.join(given)} {_are(given)} INT8 options", hint="drop them for --bits 4"
        )
    bpw, max_bytes = parse_budget(o["budget"])
    config = Int4Config(
        block_size=o["block_size"] or 32,
        symmetric=bool(o["symmetric"]),
        algorithm=o["algorithm"] or "auto",
        format=o["format_"] or "matmulnbits",
        accuracy_level=o["accuracy_level"],
        exclude=tuple(o["exclude"] or ()),
        embeddings=o["embeddings"],
        budget_bpw=bpw,
        max_bytes=max_bytes,
        mix=o["mix"],
        compact_scales=bool(o["compact_scales"]),
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
    if "int4" in doc:
        render_int4(doc["int4"])
    if "target" in doc:
        out.print(escape(target_line(doc["target"], doc["x86_saturation"])))
    print_table("Quantized nodes", ["op type", "nodes"], count_rows(doc["quantized"]))
    if doc["float"]:
        reasons = Counter(f"{e['op_type']}: {e['reason']}" for e in doc["float"])
        print_table("Left in float", ["why", "nodes"], count_rows(dict(reasons)))


def render_int4(info: dict[str, Any]) -> None:
    sym = "symmetric" if info["symmetric"] else "asymmetric"
    out.print(
        escape(f"INT4: {info['algorithm']}, {info['bits_per_weight']:.2f} bits per weight ({sym})")
    )
    for note in info["notes"]:
        out.print(escape(f"  {note}"))
    formats = info["parameters_by_format"]
    if len(formats) > 1 or info["budget"]:
        rows = [
            [
                layer["nodes"][0]
                + (f" +{len(layer['nodes']) - 1}" if len(layer["nodes"]) > 1 else ""),
                layer["role"],
                layer["format"],
                f"{layer['bits_per_weight']:.2f}",
            ]
            for layer in info["layers"]
        ]
        print_table("Bits per layer", ["nodes", "role", "format", "bits/weight"], rows)
    total = sum(formats.values()) or 1
    rows = [[name, f"{count:,}", f"{100 * count / total:.1f}%"] for name, count in formats.items()]
    print_table("Weights by format", ["format", "parameters", "share"], rows)


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
