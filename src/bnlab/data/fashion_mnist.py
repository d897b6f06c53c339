"""Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, arXiv:1708.07747), held in memory as uint8 tensors.

60,000 training and 10,000 test images, 28×28 grayscale, in 10 classes, stored as four gzipped
IDX files (see :mod:`bnlab.data.idx`). :func:`load_fashion_mnist` finds them, downloads the missing
ones where that makes sense, checks every file and returns one :class:`FashionMNIST`.

Where it looks, first match wins:

    1. ``data_dir`` argument           an existing directory: missing files are downloaded into it
                                       (``download=True``); a path that is not there is refused
                                       (a typo should not become an empty folder)
    2. ``$BNLAB_DATA_DIR``              a copy you manage: never downloads, never writes
    3. ``user_cache_dir("bnlab")/fashion-mnist``   download missing files into it

A file that exists is never overwritten or downloaded again. Downloads go through pooch: the
official location first, then a mirror, each file checked against its published MD5.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import platformdirs
import torch
from torch import Tensor

from bnlab.data.idx import DataError, read_idx_gz

DATA_DIR_ENV: Final = "BNLAB_DATA_DIR"
CLASS_NAMES: Final[tuple[str, ...]] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# The notice for a copy whose image bytes differ from the official ones goes here, at WARNING.
logger = logging.getLogger("bnlab.data")


@dataclass(frozen=True)
class DataFile:
    """One gzipped IDX file: its name, published MD5 (of the ``.gz`` bytes) and array shape."""

    name: str
    md5: str
    shape: tuple[int, ...]  # (N,) labels, (N, H, W) images


@dataclass(frozen=True)
class DatasetSpec:
    """What the loader expects: the four files, the class names, and where to download them."""

    title: str
    train_images: DataFile
    train_labels: DataFile
    test_images: DataFile
    test_labels: DataFile
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]  # base URLs, tried in order; the official location first
    cache_name: str  # sub-directory of the user cache directory

    @property
    def files(self) -> tuple[DataFile, DataFile, DataFile, DataFile]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


FASHION_MNIST_SPEC: Final = DatasetSpec(
    title="Fashion-MNIST",
    train_images=DataFile(
        "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", (60000, 28, 28)
    ),
    train_labels=DataFile(
        "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", (60000,)
    ),
    test_images=DataFile(
        "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", (10000, 28, 28)
    ),
    test_labels=DataFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", (10000,)),
    classes=CLASS_NAMES,
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    ),
    cache_name="fashion-mnist",
)

Origin = Literal["argument", "env", "cache"]


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == has no single truth value
class FashionMNIST:
    """The whole dataset in memory. Images are uint8 in [0, 255]; labels index ``classes``."""

    train_images: Tensor  # uint8 (60000, 28, 28)
    train_labels: Tensor  # int64 (60000,)
    test_images: Tensor  # uint8 (10000, 28, 28)
    test_labels: Tensor  # int64 (10000,)
    classes: tuple[str, ...]  # the 10 class names, in label order
    source: Path  # directory the files were read from
    official: bool  # True when all four files have the official MD5s

    def __repr__(self) -> str:
        return (
            f"FashionMNIST(train={tuple(self.train_images.shape)}, "
            f"test={tuple(self.test_images.shape)}, classes={len(self.classes)}, "
            f"source={str(self.source)!r}, official={self.official})"
        )


def cache_dir() -> Path:
    """The per-user download directory, ``platformdirs.user_cache_dir("bnlab")/fashion-mnist``."""
    return Path(platformdirs.user_cache_dir("bnlab")) / FASHION_MNIST_SPEC.cache_name


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> tuple[Path, Origin]:
    """The directory :func:`load_fashion_mnist` reads, and which rule chose it (module doc)."""
    if data_dir is not None:
        if not isinstance(data_dir, str | os.PathLike):
            raise TypeError(
                f"data_dir: expected a path (str or os.PathLike) or None, got "
                f"{type(data_dir).__name__}. Pass e.g. data_dir='~/data/fashion-mnist'."
            )
        return Path(data_dir).expanduser(), "argument"
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser(), "env"
    return cache_dir(), "cache"


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> FashionMNIST:
    """Load Fashion-MNIST into memory (about 55 MB of uint8), checking every file.

    Args:
        data_dir: directory holding the four ``.gz`` files; default ``$BNLAB_DATA_DIR``, else the
            user cache directory (see the module docstring for the order).
        download: fetch missing files into ``data_dir`` or the cache directory. A directory given
            by ``$BNLAB_DATA_DIR`` is never written to.
        progress: show pooch's download log and a progress bar while downloading.

    Every file must be gzip, carry the right IDX magic and dimensions, and the image and label
    counts must agree with each other and with the dataset. The label files must be the official
    bytes. Image files whose bytes differ from the official ones are accepted after these checks
    and reported once on the ``bnlab.data`` logger at WARNING ("not the official bytes");
    ``official`` in the result says whether all four files are the official ones.

    Raises:
        DataError: a file is missing and cannot be downloaded, or a file is bad; the message
            names the file and the fix.
    """
    spec = FASHION_MNIST_SPEC
    directory, origin = resolve_data_dir(data_dir)
    if origin != "cache" and not directory.is_dir():
        raise DataError(_no_directory_message(spec, directory, origin), directory)
    missing = [f for f in spec.files if not (directory / f.name).exists()]
    if missing:
        if origin == "env" or not download:
            raise DataError(_missing_message(spec, directory, origin, missing), directory)
        _download(spec, directory, missing, progress=progress)

    fix_tail = " or delete it and run again to download it" if origin != "env" and download else ""
    arrays: list[np.ndarray] = []
    digests: list[str] = []
    for f in spec.files:
        fix = (
            f"Replace it with the official file ({spec.mirrors[0]}{f.name}, MD5 {f.md5}){fix_tail}."
        )
        array, digest = read_idx_gz(directory / f.name, ndim=len(f.shape), fix=fix)
        arrays.append(array)
        digests.append(digest)
    _check(spec, directory, arrays, digests)

    unofficial = [f.name for f, d in zip(spec.files, digests, strict=True) if d != f.md5]
    if unofficial:
        logger.warning(
            "%s in %s: %s %s not the official bytes (MD5 differs); accepted after checking "
            "headers, shapes, counts, label range and the official label checksums.",
            spec.title,
            directory,
            " and ".join(unofficial),
            "is" if len(unofficial) == 1 else "are",
        )
    # copies: frombuffer views are read-only and would pin the decompressed buffers
    train_images, test_images = (torch.from_numpy(a.copy()) for a in arrays[0::2])
    train_labels, test_labels = (torch.from_numpy(a.astype(np.int64)) for a in arrays[1::2])
    return FashionMNIST(
        train_images=train_images,  # (60000, 28, 28) uint8
        train_labels=train_labels,  # (60000,) int64
        test_images=test_images,
        test_labels=test_labels,
        classes=spec.classes,
        source=directory,
        official=not unofficial,
    )


def _check(
    spec: DatasetSpec, directory: Path, arrays: list[np.ndarray], digests: list[str]
) -> None:
    """Shapes, counts, label range and label checksums, the most specific problem first."""
    files = spec.files
    for images_at, labels_at in ((0, 1), (2, 3)):
        fi, fl = files[images_at], files[labels_at]
        xi, yl = arrays[images_at], arrays[labels_at]
        pi, pl = directory / fi.name, directory / fl.name
        if xi.shape[1:] != fi.shape[1:]:
            raise DataError(
                f"{pi}: expected images of {_hw(fi.shape[1:])} pixels, got {_hw(xi.shape[1:])}. "
                f"This is not {spec.title}: replace it with the official file "
                f"({spec.mirrors[0]}{fi.name}).",
                pi,
            )
        if xi.shape[0] != yl.shape[0]:
            raise DataError(
                f"{pi} holds {xi.shape[0]} images but {pl} holds {yl.shape[0]} labels; "
                "they must match one to one. Replace both with the official files "
                f"({spec.mirrors[0]}{fi.name}, {fl.name}).",
                pi,
            )
        for f, a, p in ((fi, xi, pi), (fl, yl, pl)):
            if a.shape[0] != f.shape[0]:
                raise DataError(
                    f"{p}: expected {f.shape[0]} records in the {spec.title} "
                    f"{'training' if images_at == 0 else 'test'} split, got {a.shape[0]}. "
                    f"Replace it with the official file ({spec.mirrors[0]}{f.name}).",
                    p,
                )
        if yl.size and int(yl.max()) >= len(spec.classes):
            bad = int(np.flatnonzero(yl >= len(spec.classes))[0])
            raise DataError(
                f"{pl}: expected labels in 0..{len(spec.classes) - 1} ({len(spec.classes)} "
                f"classes), got {int(yl[bad])} at index {bad}. Replace it with the official file "
                f"({spec.mirrors[0]}{fl.name}).",
                pl,
            )
    for f, d in zip(files, digests, strict=True):
        if len(f.shape) == 1 and d != f.md5:  # label files
            p = directory / f.name
            raise DataError(
                f"{p}: expected the official label file (MD5 {f.md5}), got MD5 {d}. A copy may "
                "re-compress the images, but its labels must be the official bytes so that "
                "every image keeps its official label. Replace it with the official file "
                f"({spec.mirrors[0]}{f.name}).",
                p,
            )


def _hw(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def _missing_message(
    spec: DatasetSpec, directory: Path, origin: Origin, missing: list[DataFile]
) -> str:
    names = ", ".join(f.name for f in missing)
    where = {
        "env": f"{DATA_DIR_ENV}={directory}",
        "argument": f"the data directory {directory}",
        "cache": f"the cache directory {directory}",
    }[origin]
    how = (
        f"Put the {spec.title} files there, point {DATA_DIR_ENV} (or --data-dir) at a directory "
        f"that has them, or unset {DATA_DIR_ENV} to download into {cache_dir()}."
        if origin == "env"
        else f"Put the {spec.title} files there, or call with download=True to fetch them from "
        f"{spec.mirrors[0]}."
    )
    return f"{spec.title}: {where} lacks {names}. {how}"


def _no_directory_message(spec: DatasetSpec, directory: Path, origin: Origin) -> str:
    """A directory named by the user that is not there: most often a typo, so it is not made."""
    what = "is a file, not a directory" if directory.exists() else "does not exist"
    if origin == "env":
        return (
            f"{spec.title}: {DATA_DIR_ENV}={directory} {what}. Point {DATA_DIR_ENV} at the "
            f"directory that holds the four files, or unset it to download into {cache_dir()}."
        )
    return (
        f"{spec.title}: the data directory {directory} {what}. Check the path; to download "
        f"{spec.title} into a new directory, create it first (mkdir -p {directory}), or leave "
        f"the directory out to use ${DATA_DIR_ENV} or the per-user cache ({cache_dir()})."
    )


@contextmanager
def _quiet_pooch(quiet: bool) -> Iterator[None]:
    """Silence pooch's "Downloading data from ..." log while ``quiet``.

    Its logger sits outside the logging tree, so ``setLevel`` would not reset its
    ``isEnabledFor`` cache; ``disabled`` is checked on every record.
    """
    import pooch

    log = pooch.get_logger()
    was = log.disabled
    log.disabled = was or quiet
    try:
        yield
    finally:
        log.disabled = was


def _download(
    spec: DatasetSpec, directory: Path, missing: list[DataFile], *, progress: bool
) -> None:
    """Fetch each missing file, trying the mirrors in order; pooch checks the MD5 and only
    moves a file into place once it matches, so a failed try leaves nothing behind."""
    import pooch

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"{spec.title}: cannot create {directory} to download into ({e.strerror}). Pass a "
            f"writable directory with --data-dir, or set {DATA_DIR_ENV} to a copy of the files.",
            directory,
        ) from None
    with _quiet_pooch(not progress):
        for f in missing:
            failures: list[str] = []
            for base in spec.mirrors:
                try:
                    pooch.retrieve(
                        base + f.name,
                        known_hash=f"md5:{f.md5}",
                        fname=f.name,
                        path=directory,
                        downloader=pooch.HTTPDownloader(progressbar=progress, chunk_size=1 << 16),
                    )
                    break
                # requests' errors are OSErrors; pooch raises ValueError on an MD5 mismatch
                except (OSError, ValueError) as e:
                    failures.append(f"{base}: {_short(e)}")
            else:
                raise DataError(
                    _download_message(spec, directory, f, failures), directory
                ) from None


def _short(e: BaseException) -> str:
    """One phrase per failed try; the full requests traceback means nothing to a CLI user."""
    if isinstance(e, ValueError) and "hash" in str(e).lower():
        return "MD5 mismatch, file discarded"
    response = getattr(e, "response", None)  # requests.HTTPError carries the reply
    if response is not None and getattr(response, "status_code", None) is not None:
        return f"HTTP {response.status_code}"
    return type(e).__name__


def _download_message(spec: DatasetSpec, directory: Path, f: DataFile, failures: list[str]) -> str:
    names = ", ".join(g.name for g in spec.files)
    return (
        f"{spec.title}: could not download {f.name} (MD5 {f.md5}) from any mirror: "
        f"{'; '.join(failures)}. If this machine is offline, copy the four files ({names}) into "
        f"{directory}, or point to a directory that has them with --data-dir DIR or "
        f"{DATA_DIR_ENV}=DIR."
    )


def to_float_batches(
    images: Tensor,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """x = images / 255: uint8 images (N, H, W) -> float (N, 1, H, W) in [0, 1] on ``device``.

    The uint8 tensor moves to the device first (4× fewer bytes than float32), then converts.
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        came = f"dtype {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(
            f"images: expected a uint8 tensor such as FashionMNIST.train_images, got {came}. "
            "Images already in [0, 1] need no conversion."
        )
    if images.ndim != 3:
        raise ValueError(
            f"images: expected shape (N, H, W), got {tuple(images.shape)}. Index a batch as "
            "images[i:j], or add the batch axis with images.unsqueeze(0)."
        )
    if not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating dtype such as torch.float32, got {dtype}.")
    x = images.to(device, non_blocking=True)  # (N, H, W) uint8
    return x.unsqueeze(1).to(dtype).div_(255)  # (N, 1, H, W)


__all__ = [
    "CLASS_NAMES",
    "DATA_DIR_ENV",
    "FASHION_MNIST_SPEC",
    "DataFile",
    "DatasetSpec",
    "FashionMNIST",
    "cache_dir",
    "load_fashion_mnist",
    "resolve_data_dir",
    "to_float_batches",
]
