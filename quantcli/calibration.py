"""`calibrate_file`: the library function behind `quantcli calibrate` (it plans, so it sits
above calibrate/, which never imports quantize/)."""

from __future__ import annotations

from pathlib import Path

from quantcli.calibrate.config import CalibrationConfig
from quantcli.calibrate.runner import Progress
from quantcli.calibrate.table import CalibrationTable
from quantcli.data import DataSource, ImageOptions, open_data
from quantcli.graph.mapped import MAP_ABOVE, load_model_mapped
from quantcli.graph.signature import input_specs
from quantcli.quantize.detect import check_not_quantized
from quantcli.quantize.int8.config import Int8Config
from quantcli.quantize.int8.pipeline import calibrate_plan
from quantcli.quantize.int8.prepare import prepare_for_int8


def calibrate_file(
    model_path: Path,
    data_spec: str,
    config: CalibrationConfig,
    int8: Int8Config | None = None,
    *,
    images: ImageOptions | None = None,
    progress: Progress | None = None,
) -> tuple[CalibrationTable, DataSource]:
    """Calibrate exactly the tensors that INT8 conversion with `int8` would quantize."""
    loaded = load_model_mapped(model_path, above=MAP_ABOVE)
    check_not_quantized(loaded.model)
    data = open_data(
        data_spec,
        input_specs(loaded.model),
        images=images,
        shard=config.shard,
        limit=config.limit,
    )
    int8 = int8 or Int8Config()
    prepared, plan = prepare_for_int8(loaded.model, int8)
    table = calibrate_plan(prepared, loaded.path, plan, int8, data, config, progress)
    return table, data
