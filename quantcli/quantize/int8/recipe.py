"""A recipe: everything `convert` needs to rebuild a model byte for byte, as JSON.

`quantcli tune` writes one beside its winner; `quantcli convert MODEL --recipe R.json
--data CALIB` replays it without searching (CI rebuilds the same file). The recipe names
the model it was made for by fingerprint; another model is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from quantcli.calibrate.config import CalibrationConfig
from quantcli.errors import InputError
from quantcli.quantize.int8.config import Int8Config

SCHEMA = "quantcli.recipe/1"


@dataclass(frozen=True)
class Recipe:
    model_fingerprint: str
    int8: Int8Config
    calibration: CalibrationConfig

    def to_dict(self) -> dict[str, Any]:
        int8 = asdict(self.int8)
        int8["node_formats"] = dict(self.int8.node_formats)
        for key in ("op_types", "include", "exclude"):
            int8[key] = None if int8[key] is None else list(int8[key])
        calibration = asdict(self.calibration)
        calibration.pop("shard")
        return {
            "schema": SCHEMA,
            "model_fingerprint": self.model_fingerprint,
            "int8": int8,
            "calibration": calibration,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Recipe:
        if doc.get("schema") != SCHEMA:
            raise InputError(
                f"not a quantcli recipe (schema {doc.get('schema')!r})",
                hint="pass the recipe.json that quantcli tune wrote",
            )
        int8 = dict(_known(doc.get("int8", {}), Int8Config, "int8"))
        int8["node_formats"] = tuple(sorted(int8.get("node_formats", {}).items()))
        for key in ("include", "exclude"):
            int8[key] = tuple(int8.get(key) or ())
        if int8.get("op_types") is not None:
            int8["op_types"] = tuple(int8["op_types"])
        calibration = _known(doc.get("calibration", {}), CalibrationConfig, "calibration")
        return cls(
            str(doc["model_fingerprint"]), Int8Config(**int8), CalibrationConfig(**calibration)
        )

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        tmp.replace(path)


def _known(values: dict[str, Any], kind: type, section: str) -> dict[str, Any]:
    """An unknown key is an error, never ignored."""
    allowed = {f.name for f in fields(kind)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise InputError(
            f"the recipe's {section} section has unknown keys: {', '.join(unknown)}",
            hint="write recipes with quantcli tune, or fix the key names",
        )
    return values


def load_recipe(path: Path) -> Recipe:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"recipe {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the recipe {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path} is not a recipe (a JSON object is expected)")
    try:
        return Recipe.from_dict(doc)
    except (KeyError, TypeError) as exc:
        raise InputError(f"the recipe {path} is incomplete or malformed: {exc}") from None
