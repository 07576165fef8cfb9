"""A directory of images, preprocessed into one model input. Pillow is optional and
imported only here, when image data is actually used."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.data.base import Arrays, Chunk
from quantcli.data.validate import single_input
from quantcli.errors import DataError
from quantcli.graph.signature import TensorSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_RESIZE = ("resize", "resize-crop")
_LAYOUTS = ("NCHW", "NHWC")
_CHANNELS = {"RGB": 3, "BGR": 3, "L": 1}


def _choice(name: str, value: str, allowed: tuple[str, ...] | dict[str, int]) -> None:
    if value not in allowed:
        raise DataError(f"invalid image {name} '{value}'", hint=f"use one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class ImageOptions:
    """Preprocessing: resize, x * scale, then (x - mean) / std per channel, then layout."""

    size: tuple[int, int] | None = None  # (H, W); None: from the model input's fixed dims
    resize: str = "resize-crop"  # "resize" (stretch) | "resize-crop" (shorter side, center crop)
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)  # 1 or C values
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"  # or "NHWC"
    channels: str = "RGB"  # or "BGR" or "L" (grayscale)

    def __post_init__(self) -> None:
        _choice("resize", self.resize, _RESIZE)
        _choice("layout", self.layout, _LAYOUTS)
        _choice("channels", self.channels, _CHANNELS)
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise DataError(f"invalid image size {self.size}", hint="give (height, width) >= 1")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, self.num_channels):
                raise DataError(
                    f"image {name} has {len(values)} values but {self.channels} images have "
                    f"{self.num_channels} channel(s)",
                    hint=f"give 1 or {self.num_channels} values",
                )
        if not all(math.isfinite(s) and s != 0 for s in self.std):
            raise DataError(f"image std {self.std} has a zero or non-finite value")

    @property
    def num_channels(self) -> int:
        return _CHANNELS[self.channels]


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError(
            "reading images needs Pillow, which is not installed",
            hint='pip install "quantcli[images]"',
        ) from e
    return Image


def _target_size(spec: TensorSpec, opts: ImageOptions) -> tuple[int, int]:
    shape = spec.shape
    if shape is not None and len(shape) != 4:
        raise DataError(
            f"image data needs a 4-D input ({opts.layout}); "
            f"input '{spec.name}' has shape {spec.shape_text()}",
            hint="use .npz or .npy data for this model",
        )
    channel_dim = None if shape is None else shape[1 if opts.layout == "NCHW" else 3]
    if isinstance(channel_dim, int) and channel_dim != opts.num_channels:
        raise DataError(
            f"input '{spec.name}' takes {channel_dim} channel(s) in {opts.layout} layout, "
            f"but {opts.channels} images have {opts.num_channels}",
            hint="choose the image channels and layout that match the model",
        )
    if opts.size is not None:
        return opts.size
    hw = None if shape is None else (shape[2:4] if opts.layout == "NCHW" else shape[1:3])
    if hw is None or not all(isinstance(d, int) for d in hw):
        raise DataError(
            f"input '{spec.name}' has shape {spec.shape_text()} with no fixed height and width",
            hint="pass the image size (height, width) explicitly",
        )
    return int(hw[0]), int(hw[1])


def _resize(img: Any, height: int, width: int, mode: str) -> Any:
    if img.size == (width, height):
        return img
    bilinear = _pil().Resampling.BILINEAR
    if mode == "resize":
        return img.resize((width, height), bilinear)
    # scale so the image covers the target (the shorter side fits), then crop the center
    w, h = img.size
    s = max(width / w, height / h)
    rw, rh = max(width, round(w * s)), max(height, round(h * s))
    left, top = (rw - width) // 2, (rh - height) // 2
    return img.resize((rw, rh), bilinear).crop((left, top, left + width, top + height))


def read_image(path: Path, channels: str) -> Any:
    image = _pil()
    try:
        with image.open(path) as img:
            return img.convert("L" if channels == "L" else "RGB")
    except (OSError, ValueError, image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}", hint="remove or replace the file") from e


def preprocess(img: Any, size: tuple[int, int], opts: ImageOptions) -> np.ndarray:
    """A Pillow image to a float32 array of one sample (CHW or HWC)."""
    x = np.asarray(_resize(img, size[0], size[1], opts.resize), dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if opts.channels == "BGR":
        x = x[:, :, ::-1]
    mean = np.asarray(opts.mean, dtype=np.float32)
    std = np.asarray(opts.std, dtype=np.float32)
    x = (x * np.float32(opts.scale) - mean) / std
    if opts.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def _load(path: Path, name: str, size: tuple[int, int], opts: ImageOptions) -> Arrays:
    return {name: preprocess(read_image(path, opts.channels), size, opts)[None]}


def image_chunks(paths: list[Path], inputs: list[TensorSpec], opts: ImageOptions) -> list[Chunk]:
    spec = single_input(inputs, "a directory of images")
    _pil()  # fail now, not at the first batch, when Pillow is missing
    size = _target_size(spec, opts)
    return [Chunk(1, partial(_load, p, spec.name, size, opts), p.name) for p in paths]
