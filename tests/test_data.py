"""bnlab.data: IDX parsing, the checks on every file, the download path and the real copy.

Small IDX files are written here with ``struct`` and ``gzip`` (an encoder independent of the
parser); downloads are served by a local HTTP server on 127.0.0.1, so no test needs the network.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import platformdirs
import pooch
import pytest
import torch

import bnlab.data.fashion_mnist as fm
from bnlab.data import (
    CLASS_NAMES,
    DATA_DIR_ENV,
    DataError,
    FashionMNIST,
    load_fashion_mnist,
    resolve_data_dir,
    to_float_batches,
)
from bnlab.data.fashion_mnist import DataFile, DatasetSpec

NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
H, W = 5, 4  # small, non-square, so a transposed reader would fail
N_TRAIN, N_TEST, N_CLASSES = 12, 7, 10


# ---------------------------------------------------------------- writing small IDX files


def idx_bytes(array: np.ndarray, *, magic: int | None = None) -> bytes:
    """IDX encoding written independently of the parser: struct header + C-order bytes."""
    magic = (0x08 << 8) | array.ndim if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class Tiny:
    """A small dataset: its arrays, the gzip bytes of each file, and the spec they satisfy."""

    arrays: dict[str, np.ndarray]
    blobs: dict[str, bytes]
    spec: DatasetSpec

    def write(self, directory: Path, skip: tuple[str, ...] = ()) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for name, blob in self.blobs.items():
            if name not in skip:
                (directory / name).write_bytes(blob)
        return directory


def make_tiny(mirrors: tuple[str, ...] = ("http://127.0.0.1:9/",)) -> Tiny:
    rng = np.random.default_rng(0)
    arrays = {
        NAMES[0]: rng.integers(0, 256, (N_TRAIN, H, W), dtype=np.uint8),
        NAMES[1]: (np.arange(N_TRAIN) * 7 % N_CLASSES).astype(np.uint8),
        NAMES[2]: rng.integers(0, 256, (N_TEST, H, W), dtype=np.uint8),
        NAMES[3]: (np.arange(N_TEST) * 3 % N_CLASSES).astype(np.uint8),
    }
    blobs = {name: gzip.compress(idx_bytes(a), mtime=0) for name, a in arrays.items()}
    files = [DataFile(name, md5(blobs[name]), arrays[name].shape) for name in NAMES]
    spec = replace(
        fm.FASHION_MNIST_SPEC,
        train_images=files[0],
        train_labels=files[1],
        test_images=files[2],
        test_labels=files[3],
        mirrors=mirrors,
        cache_name="tiny",
    )
    return Tiny(arrays, blobs, spec)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> Tiny:
    """The loader pointed at the small dataset's spec (files, MD5s, counts, mirrors)."""
    t = make_tiny()
    monkeypatch.setattr(fm, "FASHION_MNIST_SPEC", t.spec)
    return t


def assert_matches(ds: FashionMNIST, t: Tiny) -> None:
    for tensor, name in zip(
        (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels), NAMES, strict=True
    ):
        assert torch.equal(tensor, torch.from_numpy(t.arrays[name].astype(tensor.numpy().dtype)))
    assert ds.train_images.dtype == ds.test_images.dtype == torch.uint8
    assert ds.train_labels.dtype == ds.test_labels.dtype == torch.int64


# ---------------------------------------------------------------- good files


def test_good_files_load_exactly(tiny: Tiny, tmp_path: Path) -> None:
    d = tiny.write(tmp_path / "copy")
    ds = load_fashion_mnist(d, download=False)
    assert_matches(ds, tiny)
    assert ds.train_images.shape == (N_TRAIN, H, W) and ds.test_labels.shape == (N_TEST,)
    assert ds.classes == CLASS_NAMES and len(CLASS_NAMES) == 10
    assert ds.source == d and ds.official
    ds.train_images[0, 0, 0] = 1  # writable: the tensors own their memory


def test_explicit_dir_beats_env(
    tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tiny.write(tmp_path / "copy")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    assert load_fashion_mnist(d, download=False).source == d
    monkeypatch.setenv(DATA_DIR_ENV, str(d))
    assert load_fashion_mnist(download=False).source == d


def test_data_dir_type_is_checked() -> None:
    with pytest.raises(TypeError, match="data_dir"):
        load_fashion_mnist(3)  # type: ignore[arg-type]


def test_unofficial_images_accepted_with_one_notice(
    tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # the same pixels re-compressed at another level: different bytes, same content
    d = tiny.write(tmp_path / "copy")
    recompressed = gzip.compress(idx_bytes(tiny.arrays[NAMES[0]]), compresslevel=1, mtime=1)
    assert md5(recompressed) != tiny.spec.train_images.md5
    (d / NAMES[0]).write_bytes(recompressed)
    with caplog.at_level(logging.WARNING, logger="bnlab.data"):
        ds = load_fashion_mnist(d, download=False)
    assert_matches(ds, tiny)
    assert not ds.official
    records = [r for r in caplog.records if r.name == "bnlab.data"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    msg = records[0].getMessage()
    assert "not the official bytes" in msg and NAMES[0] in msg and NAMES[2] not in msg
    assert "\n" not in msg


def test_unofficial_labels_refused(tiny: Tiny, tmp_path: Path) -> None:
    d = tiny.write(tmp_path / "copy")
    (d / NAMES[3]).write_bytes(gzip.compress(idx_bytes(tiny.arrays[NAMES[3]]), mtime=5))
    with pytest.raises(DataError, match=f"{NAMES[3]}.*official label file"):
        load_fashion_mnist(d, download=False)


# ---------------------------------------------------------------- bad files, one case each


def _gz(a: np.ndarray, **kw: int) -> bytes:
    return gzip.compress(idx_bytes(a, **kw), mtime=0)


def _flip_last(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


Damage = Callable[[Tiny], dict[str, bytes]]  # files to overwrite in a good copy

# case -> (damage, the file the error must name, a phrase the message must contain)
BAD: dict[str, tuple[Damage, str, str]] = {
    "not gzip": (
        lambda t: {NAMES[0]: idx_bytes(t.arrays[NAMES[0]])},
        NAMES[0],
        "uncompressed IDX file",
    ),
    "not gzip, empty": (lambda t: {NAMES[1]: b""}, NAMES[1], "an empty file"),
    "truncated gzip": (
        lambda t: {NAMES[2]: t.blobs[NAMES[2]][:40]},
        NAMES[2],
        "truncated or corrupted",
    ),
    "corrupt gzip trailer": (
        lambda t: {NAMES[3]: t.blobs[NAMES[3]][:-8] + bytes(8)},
        NAMES[3],
        "truncated or corrupted",
    ),
    "wrong magic, labels in the image file": (
        lambda t: {NAMES[0]: t.blobs[NAMES[1]]},
        NAMES[0],
        "expected IDX magic 0x00000803 (unsigned bytes, 3 dimensions), got 0x00000801 "
        "(a label file)",
    ),
    "wrong magic, element type": (
        lambda t: {NAMES[1]: _gz(t.arrays[NAMES[1]], magic=0x0D01)},  # 0x0D: float32 elements
        NAMES[1],
        "got 0x00000d01",
    ),
    "payload shorter than header": (
        lambda t: {NAMES[2]: gzip.compress(idx_bytes(t.arrays[NAMES[2]])[:-3])},
        NAMES[2],
        f"holds {N_TEST * H * W - 3} (truncated",
    ),
    "wrong dims": (
        lambda t: {NAMES[0]: _gz(t.arrays[NAMES[0]][:, :, :-1])},
        NAMES[0],
        f"expected images of {H}×{W} pixels, got {H}×{W - 1}",
    ),
    "image/label count mismatch": (
        lambda t: {NAMES[3]: _gz(t.arrays[NAMES[3]][:-1])},
        NAMES[2],
        f"holds {N_TEST} images but {{d}}/{NAMES[3]} holds {N_TEST - 1} labels",
    ),
    "count differs from the split": (
        lambda t: {n: _gz(t.arrays[n][:-1]) for n in NAMES[2:]},  # agree, but one short
        NAMES[2],
        f"expected {N_TEST} records",
    ),
    "label out of range": (
        lambda t: {NAMES[1]: _gz(np.r_[t.arrays[NAMES[1]][:-1], N_CLASSES].astype(np.uint8))},
        NAMES[1],
        f"expected labels in 0..9 (10 classes), got {N_CLASSES} at index {N_TRAIN - 1}",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_named(case: str, tiny: Tiny, tmp_path: Path) -> None:
    damage, named, phrase = BAD[case]
    d = tiny.write(tmp_path / "copy")
    for name, blob in damage(tiny).items():
        (d / name).write_bytes(blob)
    with pytest.raises(DataError) as err:
        load_fashion_mnist(d, download=False)
    msg = str(err.value)
    assert msg.startswith(str(d / named)), msg
    assert phrase.format(d=d) in msg, msg
    assert "replace" in msg.lower(), msg  # every message carries a fix
    assert err.value.path == d / named


@pytest.mark.parametrize("name", NAMES)
def test_missing_file_is_named(name: str, tiny: Tiny, tmp_path: Path) -> None:
    d = tiny.write(tmp_path / "copy", skip=(name,))
    with pytest.raises(DataError) as err:
        load_fashion_mnist(d, download=False)
    msg = str(err.value)
    assert name in msg and str(d) in msg and "download=True" in msg
    assert sum(n in msg for n in NAMES) == 1  # only the missing one


def test_env_dir_is_never_downloaded_into(
    tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Server
) -> None:
    monkeypatch.setattr(fm, "FASHION_MNIST_SPEC", replace(tiny.spec, mirrors=(server.url("good"),)))
    d = tiny.write(tmp_path / "env-copy", skip=(NAMES[1],))
    monkeypatch.setenv(DATA_DIR_ENV, str(d))
    with pytest.raises(DataError) as err:
        load_fashion_mnist()  # download=True, but the env var names a copy the user manages
    msg = str(err.value)
    assert NAMES[1] in msg and f"{DATA_DIR_ENV}={d}" in msg and "--data-dir" in msg
    assert server.requests == [] and not (d / NAMES[1]).exists()


# ---------------------------------------------------------------- downloads, served locally


class Server:
    """Serves ``root/<mirror>/<file>`` on 127.0.0.1 and records every path requested."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        record = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                record.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.root = root
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, mirror: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mirror}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s = Server(tmp_path / "www")
    yield s
    s.close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("first_mirror", ["corrupt", "missing"])
def test_download_falls_back_to_mirror_and_verifies_md5(
    first_mirror: str, tiny: Tiny, tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny.write(server.root / "good")
    if first_mirror == "corrupt":  # every file served with one flipped byte
        for name, blob in tiny.blobs.items():
            (server.root / "bad").mkdir(parents=True, exist_ok=True)
            (server.root / "bad" / name).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    spec = replace(tiny.spec, mirrors=(server.url("bad"), server.url("good")))
    monkeypatch.setattr(fm, "FASHION_MNIST_SPEC", spec)
    d = tmp_path / "new" / "dir"
    d.mkdir(parents=True)
    ds = load_fashion_mnist(d, progress=False)
    assert_matches(ds, tiny)
    assert ds.official and ds.source == d
    assert server.requests == [f"/{m}/{n}" for n in NAMES for m in ("bad", "good")]
    assert sorted(p.name for p in d.iterdir()) == sorted(NAMES)  # no temporary files left
    for name in NAMES:
        assert md5((d / name).read_bytes()) == md5(tiny.blobs[name])


def test_download_fails_when_no_mirror_has_the_right_bytes(
    tiny: Tiny, tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = server.root / "bad"
    bad.mkdir(parents=True)
    for name, blob in tiny.blobs.items():
        (bad / name).write_bytes(blob[::-1])
    spec = replace(tiny.spec, mirrors=(server.url("bad"), server.url("bad")))
    monkeypatch.setattr(fm, "FASHION_MNIST_SPEC", spec)
    d = tmp_path / "dl"
    d.mkdir()
    with pytest.raises(DataError) as err:
        load_fashion_mnist(d, progress=False)
    msg = str(err.value)
    assert NAMES[0] in msg and msg.count("MD5 mismatch") == 2 and tiny.spec.train_images.md5 in msg
    assert list(d.iterdir()) == []  # a file that fails its MD5 is never kept


def test_existing_files_are_neither_downloaded_nor_overwritten(
    tiny: Tiny, tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny.write(server.root / "good")
    monkeypatch.setattr(fm, "FASHION_MNIST_SPEC", replace(tiny.spec, mirrors=(server.url("good"),)))
    d = tiny.write(tmp_path / "partial", skip=(NAMES[2],))
    # a local re-compressed copy of the training images, which pooch would "update"
    local = gzip.compress(idx_bytes(tiny.arrays[NAMES[0]]), compresslevel=1, mtime=3)
    (d / NAMES[0]).write_bytes(local)
    ds = load_fashion_mnist(d, progress=False)
    assert server.requests == [f"/good/{NAMES[2]}"]
    assert (d / NAMES[0]).read_bytes() == local and not ds.official
    assert_matches(ds, tiny)


def test_offline_without_a_copy_gives_one_clear_message(
    tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = replace(tiny.spec, mirrors=(closed_port_url(), closed_port_url()))
    monkeypatch.setattr(fm, "FASHION_MNIST_SPEC", spec)
    d = tmp_path / "offline"
    d.mkdir()
    with pytest.raises(DataError) as err:
        load_fashion_mnist(d, progress=False)
    msg = str(err.value)
    assert "--data-dir" in msg and DATA_DIR_ENV in msg and str(d) in msg
    assert all(n in msg for n in NAMES) and "ConnectionError" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback
    assert "\n" not in msg and len(msg) < 1000


@pytest.mark.parametrize("how", ["argument", "env"])
def test_a_data_dir_that_is_not_there_is_refused_not_made(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    typo = tmp_path / "fashion-mnsit"
    if how == "env":
        monkeypatch.setenv(DATA_DIR_ENV, str(typo))
    with pytest.raises(DataError, match=r"does not exist") as err:
        load_fashion_mnist(typo if how == "argument" else None, progress=False)
    assert not typo.exists()
    msg = str(err.value)
    assert str(typo) in msg and "\n" not in msg
    assert ("mkdir -p" in msg) == (how == "argument")
    typo.write_text("")
    with pytest.raises(DataError, match=r"is a file, not a directory"):
        load_fashion_mnist(typo if how == "argument" else None, progress=False)


def test_cache_dir_is_the_default_download_target(
    tiny: Tiny, tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny.write(server.root / "good")
    monkeypatch.setattr(fm, "FASHION_MNIST_SPEC", replace(tiny.spec, mirrors=(server.url("good"),)))
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    calls: list[str] = []

    def fake_cache(appname: str) -> str:
        calls.append(appname)
        return str(tmp_path / "cache" / appname)

    monkeypatch.setattr(platformdirs, "user_cache_dir", fake_cache)
    ds = load_fashion_mnist(progress=False)
    assert calls and set(calls) == {"bnlab"}
    assert ds.source == tmp_path / "cache" / "bnlab" / "tiny" and ds.official
    assert_matches(ds, tiny)
    server.requests.clear()
    load_fashion_mnist(progress=False)  # second call: everything is local
    assert server.requests == []


@pytest.mark.parametrize("progress", [False, True])
def test_progress_flag(
    progress: bool,
    tiny: Tiny,
    tmp_path: Path,
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    tiny.write(server.root / "good")
    monkeypatch.setattr(fm, "FASHION_MNIST_SPEC", replace(tiny.spec, mirrors=(server.url("good"),)))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    pooch.get_logger().addHandler(handler)
    (tmp_path / "dl").mkdir()
    try:
        load_fashion_mnist(tmp_path / "dl", progress=progress)
    finally:
        pooch.get_logger().removeHandler(handler)
    err = capfd.readouterr().err
    # pooch logs each download at INFO, and tqdm draws its bar on stderr
    assert (len(records) == len(NAMES) and NAMES[0] in records[0]) == progress, records
    assert ("100%" in err) == progress, err


# ---------------------------------------------------------------- to_float_batches


def test_to_float_batches_matches_float64_division() -> None:
    x = torch.arange(256, dtype=torch.uint8).repeat(3).reshape(3, 16, 16)
    y = to_float_batches(x)
    assert y.shape == (3, 1, 16, 16) and y.dtype == torch.float32 and y.device == x.device
    torch.testing.assert_close(y.double(), x.double().unsqueeze(1) / 255.0, rtol=0, atol=1e-7)
    assert y.min() == 0 and y.max() == 1
    y64 = to_float_batches(x, "cpu", dtype=torch.float64)
    assert torch.equal(y64, x.double().unsqueeze(1) / 255.0)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (torch.zeros(2, 4, 4), TypeError),
        (np.zeros((2, 4, 4), dtype=np.uint8), TypeError),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), ValueError),
    ],
)
def test_to_float_batches_rejects(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="images: expected"):
        to_float_batches(bad)  # type: ignore[arg-type]


def test_to_float_batches_needs_a_float_dtype() -> None:
    with pytest.raises(TypeError, match="dtype: expected a floating dtype"):
        to_float_batches(torch.zeros(1, 2, 2, dtype=torch.uint8), dtype=torch.int32)


# ---------------------------------------------------------------- the real copy


@pytest.fixture(scope="module")
def real(real_data_dir: Path) -> FashionMNIST:
    """The real copy, found as users' runs find it (tests/conftest.py: skipped where it is not
    there, failed instead under BNLAB_REQUIRE_DATA=1, as in CI)."""
    return load_fashion_mnist(download=False)


def test_real_copy_shapes_and_dtypes(real: FashionMNIST) -> None:
    assert real.source == resolve_data_dir()[0]
    assert tuple(real.train_images.shape) == (60000, 28, 28)
    assert tuple(real.test_images.shape) == (10000, 28, 28)
    assert tuple(real.train_labels.shape) == (60000,) and tuple(real.test_labels.shape) == (10000,)
    assert real.train_images.dtype == real.test_images.dtype == torch.uint8
    assert real.train_labels.dtype == real.test_labels.dtype == torch.int64
    assert real.classes == CLASS_NAMES


def test_real_copy_label_counts_and_pixel_statistics(real: FashionMNIST) -> None:
    # the balanced split the dataset's authors publish, and their pixel statistics
    assert torch.equal(torch.bincount(real.train_labels, minlength=10), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(real.test_labels, minlength=10), torch.full((10,), 1000))
    # exact integer sums (pixels are 0..255), so no float reduction over 47M values
    moments = {}
    for split, x in (("train", real.train_images), ("test", real.test_images)):
        n, s1, s2 = x.numel(), int(x.sum(dtype=torch.int64)), int(x.long().square().sum())
        mean = s1 / n / 255
        std = ((s2 - s1 * s1 / n) / (n - 1)) ** 0.5 / 255
        moments[split] = (mean, std)
    assert moments["train"] == pytest.approx((0.2861, 0.3528), abs=2e-4)
    assert moments["test"] == pytest.approx((0.2869, 0.3540), abs=2e-4)


def test_real_copy_official_flag_matches_its_checksums(real: FashionMNIST) -> None:
    published = {f.name: f.md5 for f in fm.FASHION_MNIST_SPEC.files}
    on_disk = {n: md5((real.source / n).read_bytes()) for n in NAMES}
    assert real.official == (on_disk == published)
    for n in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert on_disk[n] == published[n]  # the loader refuses other labels


def test_published_checksums() -> None:
    # the MD5s listed with the dataset (zalandoresearch/fashion-mnist README, torchvision)
    assert {f.name: f.md5 for f in fm.FASHION_MNIST_SPEC.files} == {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
