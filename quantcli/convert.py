"""`convert_file`: the library function behind `quantcli convert` (INT8 and INT4)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantcli.calibrate.config import CalibrationConfig
from quantcli.calibrate.runner import Progress
from quantcli.calibrate.table import load_table
from quantcli.data import DataSource, ImageOptions, open_data
from quantcli.errors import InputError
from quantcli.graph.io import (
    check_model_path,
    check_output_path,
    save_model,
)
from quantcli.graph.mapped import MAP_ABOVE, file_size, load_model_mapped
from quantcli.graph.signature import input_specs
from quantcli.quantize.int8.config import Int8Config
from quantcli.validate import output_validator


@dataclass
class ConvertSummary:
    input: Path
    output: Path
    bits: int
    format: str
    quantized_by_type: dict[str, int]
    float_nodes: list[tuple[str, str, str]]
    size_before: int
    size_after: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "quantcli.convert/1",
            "input": str(self.input),
            "output": str(self.output),
            "bits": self.bits,
            "format": self.format,
            "quantized": self.quantized_by_type,
            "quantized_total": sum(self.quantized_by_type.values()),
            "float": [{"name": n, "op_type": o, "reason": r} for n, o, r in self.float_nodes],
            "size_before": self.size_before,
            "size_after": self.size_after,
            "size_ratio": self.size_after / self.size_before if self.size_before else None,
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
            **self.details,
        }


def _validation_samples(data: DataSource | None, model: Any, count: int = 2) -> list:
    source = data if data is not None else open_data(f"random:{count}", input_specs(model))
    samples = []
    for batch in source.batches(1):
        samples.append(batch.feeds)
        if len(samples) >= count:
            break
    return samples


def convert_int8_file(
    model_path: Path,
    output: Path,
    config: Int8Config,
    *,
    data_spec: str | None = None,
    table_path: Path | None = None,
    calibration: CalibrationConfig | None = None,
    images: ImageOptions | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertSummary:
    from quantcli.quantize.int8.pipeline import quantize_int8

    start = time.perf_counter()
    if config.format == "dynamic" and (data_spec or table_path):
        raise InputError(
            "--dynamic needs no calibration", hint="drop --data/--calibration, or drop --dynamic"
        )
    if data_spec and table_path:
        raise InputError("pass --data or --calibration, not both")
    check_model_path(Path(model_path))  # a missing input is the first thing to say
    sources = [model_path, *(Path(p) for p in (data_spec, table_path) if p)]
    check_output_path(output, inputs=sources, force=force)
    loaded = load_model_mapped(model_path, above=MAP_ABOVE)  # large weights stay in the file
    calibration = calibration or CalibrationConfig()
    data = None
    if data_spec:
        data = open_data(
            data_spec, input_specs(loaded.model), images=images, limit=calibration.limit
        )
    table = load_table(table_path) if table_path else None
    warnings = []
    if data is not None and data.synthetic:
        warnings.append("random calibration data: ranges are not representative")
    result = quantize_int8(
        loaded, config, table=table, data=data, calibration=calibration, progress=progress
    )
    save_model(
        result.model,
        output,
        inputs=[model_path],
        force=force,
        validate=output_validator(_validation_samples(data, loaded.model)),
        external_data=loaded.external_data,
        release=True,  # not used after: validation need not run beside its weights
    )
    return ConvertSummary(
        input=model_path,
        output=output,
        bits=8,
        format=config.format,
        quantized_by_type=result.quantized_by_type,
        float_nodes=result.float_nodes,
        size_before=loaded.size_bytes,
        size_after=file_size(output),
        seconds=time.perf_counter() - start,
        warnings=warnings + result.warnings,
        details={
            "target": config.target,
            "x86_saturation": result.saturation.to_dict() if result.saturation else None,
        },
    )


def convert_int4_file(
    model_path: Path,
    output: Path,
    config: Any,
    *,
    data_spec: str | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertSummary:
    from quantcli.quantize.detect import check_not_quantized
    from quantcli.quantize.int4.convert import quantize_int4

    start = time.perf_counter()
    check_model_path(Path(model_path))
    sources = [model_path, *([Path(data_spec)] if data_spec else [])]
    check_output_path(output, inputs=sources, force=force)
    # A single-file model's weights stay in the file, memory-mapped (one copy at most).
    loaded = load_model_mapped(model_path)
    check_not_quantized(loaded.model)
    data = None
    if data_spec:
        data = open_data(data_spec, input_specs(loaded.model), limit=limit)
    samples = _validation_samples(data, loaded.model)
    result = quantize_int4(loaded.model, config, data, batch_size, progress)
    save_model(
        result.model,
        output,
        inputs=[model_path],
        force=force,
        validate=output_validator(samples),
        external_data=loaded.external_data,
        release=True,  # not used after: validation need not run beside its weights
    )
    size_after = file_size(output)
    warnings = list(result.warnings)
    if data is not None and data.synthetic:
        warnings.append("random calibration data: GPTQ and the budget need real samples")
    if config.max_bytes is not None and size_after > config.max_bytes:
        warnings.append(
            f"the written model is {size_after / 1e6:.2f} MB, over the {config.max_bytes / 1e6:.2f}"
            " MB budget (the graph itself is larger than estimated)"
        )
    counts: dict[str, int] = {}
    for cand in result.quantized:
        counts[cand.op_type] = counts.get(cand.op_type, 0) + 1
    layers = [
        {
            "nodes": [c.node for c in r.unit.members + r.unit.tables],
            "role": r.unit.role,
            "format": r.choice.name,
            "parameters": r.unit.params,
            "bytes": r.bytes,
            "bits_per_weight": round(8 * r.bytes / r.unit.params, 3) if r.unit.params else 0,
            **({"tied_table": True} if r.unit.tied and not r.choice.is_float else {}),
        }
        for r in result.units
    ]
    formats: dict[str, int] = {}
    for r in result.units:
        formats[r.choice.name] = formats.get(r.choice.name, 0) + r.unit.params
    return ConvertSummary(
        input=model_path,
        output=output,
        bits=4,
        format=config.format,
        quantized_by_type=counts,
        float_nodes=result.float_nodes,
        size_before=loaded.size_bytes,
        size_after=size_after,
        seconds=time.perf_counter() - start,
        warnings=warnings,
        details={
            "int4": {
                "weights": len(result.quantized),
                "parameters": result.params,
                "bits_per_weight": round(result.bits_per_weight, 3),
                "parameters_by_format": formats,
                "block_size": config.block_size,
                "symmetric": config.symmetric,
                "algorithm": result.algorithm,
                "accuracy_level": result.accuracy_level,
                "budget": _budget_doc(config, result),
                "notes": result.notes,
                "layers": layers,
            }
        },
    )


def _budget_doc(config: Any, result: Any) -> dict[str, Any] | None:
    if config.mix is not None:
        return {"mix": config.mix}
    if config.budget_bpw is not None:
        return {"bits_per_weight": config.budget_bpw, "bytes": result.budget_bytes}
    if config.max_bytes is not None:
        return {"max_bytes": config.max_bytes, "weight_bytes": result.budget_bytes}
    return None
