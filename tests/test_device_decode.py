"""JPEGs decoded on the training device (`data.image_decode = "device"`, trainer/data/device_decode.py): the same
pixels as the CPU path within the stated tolerance, a JPEG the device cannot decode is a bad sample (an invalid,
counted row under `skip`, an error naming shard, key and field under `error`), decoding twice does nothing, and a
short training run gives the CPU path's losses. The device module runs on any device, so these run on the CPU
(torchvision's decoder, or PIL's where torchvision is not installed); the nvJPEG check needs CUDA."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import small_config
from trainer.config.schema import ConfigError
from trainer.data.batch import Batch
from trainer.data.collate import encoded_images
from trainer.data.decode import BadSample, EncodedJpeg, decode_image, jpeg_for_device, jpeg_header
from trainer.data.device_decode import TOLERANCE, decode_batch, decodes_on, resolve_image_decode
from trainer.data.reader import make_batch_stream
from trainer.dataset_tools.synth.generate import synthesize

SOURCE_SIZE = 64
"""The synthetic JPEGs' side here, resized to data.image_size = 24: PIL's draft halves them first."""
DEVICE = ["data.image_decode=device"]


@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 samples whose item JPEGs are 64 x 64 (the reader resizes them to 24 x 24)."""
    out = tmp_path_factory.mktemp("device_decode") / "data"
    cfg = small_config(out, *sized())
    synthesize(cfg.data.synth, out, vocab_size=cfg.data.vocab_size, progress=False)
    return out


def sized(*overrides: str) -> list[str]:
    return [
        "data.synth.num_samples=600",
        "data.synth.samples_per_shard=150",
        f"data.synth.image_size={SOURCE_SIZE}",
        *overrides,
    ]


def first_batch(dataset: Path, *overrides: str) -> Batch:
    return next(iter(make_batch_stream(small_config(dataset, *sized(*overrides)), "eval")))


def jpeg(size: int = 128, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.kron(
        rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def with_jpeg(batch: Batch, k: int, data: bytes) -> Batch:
    """The host batch with its k-th JPEG's bytes replaced (bypassing the reader's header check)."""
    enc = batch.encoded_images
    assert enc is not None
    parts = [
        (int(row), int(slot), EncodedJpeg(data if i == k else enc.jpeg(i).numpy().tobytes(), *enc.sources[i]))
        for i, (row, slot) in enumerate(enc.slots.tolist())
    ]
    return replace(batch, encoded_images=encoded_images(parts, enc.size, enc.policy))


def truncated(data: bytes) -> bytes:
    """Cut in the middle of the scan data (after the header, which PIL reads up to the scan)."""
    with Image.open(io.BytesIO(data)) as image:
        scan = image.fp.tell()
    return data[: (scan + len(data)) // 2]


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    d = (a.int() - b.int()).abs()
    return float(d.float().mean()), int(d.max())


# ------------------------------------------------------------------------------------------------ pixels


def test_device_module_gives_the_cpu_paths_pixels_within_the_tolerance(jpeg_dataset: Path) -> None:
    cpu = first_batch(jpeg_dataset)
    host = first_batch(jpeg_dataset, *DEVICE)
    enc = host.encoded_images
    assert cpu.encoded_images is None and enc is not None
    assert host.images.shape[-1] == 0  # no pixels travel: only the JPEGs' bytes
    assert enc.count == int(cpu.image_mask.sum()) > 0 and enc.data.dtype == torch.uint8
    assert all(field == "jpg" and shard.endswith(".tar") for shard, _, field in enc.sources)
    out = decode_batch(host.to("cpu"))
    assert out.encoded_images is None and out.images.shape == cpu.images.shape
    assert torch.equal(out.image_mask, cpu.image_mask) and torch.equal(out.valid, cpu.valid)
    mean, largest = difference(out.images, cpu.images)
    tolerance = TOLERANCE["resized"]  # 64 -> 24
    assert mean <= tolerance["mean_abs"] and largest <= tolerance["max_abs"], (mean, largest)
    print(f"device module on cpu vs the CPU path: mean {mean:.3f}, max {largest}")


def test_without_a_resize_libjpeg_gives_the_cpu_paths_pixels(jpeg_dataset: Path) -> None:
    size = [f"data.image_size={SOURCE_SIZE}"]
    cpu, host = first_batch(jpeg_dataset, *size), first_batch(jpeg_dataset, *size, *DEVICE)
    mean, largest = difference(decode_batch(host).images, cpu.images)
    assert mean <= 0.5 and largest <= 16  # libjpeg both ways (nvJPEG: TOLERANCE["same_size"])


def test_decoding_a_decoded_batch_does_nothing(jpeg_dataset: Path) -> None:
    host = first_batch(jpeg_dataset, *DEVICE)
    once = decode_batch(host.to("cpu"))
    assert decode_batch(once) is once
    assert decode_batch(once.to("cpu")).images is once.images
    assert host.encoded_images is not None and host.images.shape[-1] == 0  # the host batch is left as it was


def test_the_encoded_jpegs_stay_on_the_host_when_the_batch_moves(jpeg_dataset: Path) -> None:
    host = first_batch(jpeg_dataset, *DEVICE)
    moved = host.to("cpu")
    assert moved.encoded_images is host.encoded_images


# ------------------------------------------------------------------------------------------------ bad JPEGs


def test_a_jpeg_the_device_cannot_decode_invalidates_its_row_and_is_counted(jpeg_dataset: Path) -> None:
    good = first_batch(jpeg_dataset, *DEVICE, "data.bad_input=skip")
    enc = good.encoded_images
    assert enc is not None
    k = 3
    row = int(enc.slots[k, 0])
    bad = with_jpeg(good, k, truncated(enc.jpeg(k).numpy().tobytes()))
    bad.encoded_images.skipped = counts = Counter({"corrupt_tar": 2})  # type: ignore[union-attr]
    reference = decode_batch(good)
    out = decode_batch(bad)
    assert not bool(out.valid[row]) and int(out.valid.sum()) == good.size - 1
    assert not bool(out.image_mask[row].any()) and not bool(out.images[row].any())
    others = torch.arange(good.size) != row
    assert torch.equal(out.images[others], reference.images[others])
    assert torch.equal(out.image_mask[others], reference.image_mask[others])
    assert counts == Counter({"corrupt_tar": 2, "bad_image": 1})
    assert out.skipped.get("bad_image") == 1


def test_the_stream_counts_bad_images_found_on_the_device(jpeg_dataset: Path) -> None:
    """The stream attaches its own counter to each batch it yields, so its report and checkpoint hold them."""
    stream = make_batch_stream(small_config(jpeg_dataset, *sized(*DEVICE, "data.bad_input=skip")), "eval")
    batch = next(iter(stream))
    assert batch.encoded_images is not None and batch.encoded_images.skipped is stream.skipped
    bad = with_jpeg(batch, 0, truncated(jpeg()))
    bad.encoded_images.skipped = batch.encoded_images.skipped  # type: ignore[union-attr]
    decode_batch(bad)
    assert stream.skipped["bad_image"] == 1 and "bad_image=1" in stream.report()
    assert stream.state_dict()["skipped"]["bad_image"] == 1


def test_under_error_a_bad_jpeg_names_shard_key_and_field(jpeg_dataset: Path) -> None:
    good = first_batch(jpeg_dataset, *DEVICE, "data.bad_input=error")
    enc = good.encoded_images
    assert enc is not None
    shard, key, field = enc.sources[5]
    bad = with_jpeg(good, 5, b"\xff\xd8\xff\xe0" + bytes(200))  # a JPEG start, then nothing decodable
    with pytest.raises(BadSample) as caught:
        decode_batch(bad)
    err = caught.value
    assert (err.shard, err.key, err.field, err.reason) == (shard, key, field, "bad_image")
    assert shard in str(err) and repr(key) in str(err) and "bad_image" in str(err)


def test_the_workers_check_each_jpeg_they_leave_to_the_device() -> None:
    data = jpeg()
    assert jpeg_for_device(data) is True
    header = jpeg_header(data)
    with Image.open(io.BytesIO(data)) as image:  # the marker walk reads what PIL reads
        assert header is not None and (header.width, header.height) == image.size
        assert header.scan == image.fp.tell() and header.frame == 0xC0 and len(header.components) == 3
    with pytest.raises(ValueError, match="truncated"):
        jpeg_for_device(
            truncated(data)
        )  # cut in its scan: refused by the reader, which then skips the sample
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(png, format="PNG")
    assert jpeg_for_device(png.getvalue()) is False  # decoded on the CPU, as before
    cmyk = io.BytesIO()
    Image.new("CMYK", (32, 32), (1, 2, 3, 4)).save(cmyk, format="JPEG")
    assert jpeg_for_device(cmyk.getvalue()) is False
    progressive = io.BytesIO()
    Image.open(io.BytesIO(data)).save(progressive, format="JPEG", progressive=True)
    assert jpeg_for_device(progressive.getvalue()) is False  # left to libjpeg on the CPU
    grey = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("L").save(grey, format="JPEG")
    assert jpeg_for_device(grey.getvalue()) is True
    with pytest.raises(ValueError, match="claims"):
        jpeg_for_device(
            data[:163] + (60000).to_bytes(2, "big") + data[165:]
        )  # a forged height: too few bytes
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    assert jpeg_for_device(gif.getvalue()) is False  # the CPU path refuses it, as before
    with pytest.raises(ValueError, match="not JPEG or PNG"):
        decode_image(gif.getvalue(), 24)


def test_a_truncated_jpeg_in_a_shard_is_a_reader_skip_in_device_mode(
    small_dataset: Path, tmp_path: Path
) -> None:
    """What the workers' check finds the reader drops as before, so its batches stay full of good samples."""
    from tests.test_bad_input import corrupt, good_samples, write_dataset

    good = good_samples(small_dataset, 4)
    samples = [good[0], (good[1][0], corrupt("bad_image", good[1][1])), *good[2:]]
    data = write_dataset(small_dataset, tmp_path / "d", samples)
    with pytest.raises(BadSample) as caught:
        list(make_batch_stream(small_config(data, *DEVICE), "eval"))
    assert (caught.value.key, caught.value.field, caught.value.reason) == (good[1][0], "jpg", "bad_image")
    stream = make_batch_stream(small_config(data, *DEVICE, "data.bad_input=skip"), "eval")
    batches = [decode_batch(b) for b in stream]
    assert sum(int(b.valid.sum()) for b in batches) == 3 and stream.skipped == {"bad_image": 1}


def test_a_png_is_decoded_by_the_workers_beside_the_jpegs_left_to_the_device(
    small_dataset: Path, tmp_path: Path
) -> None:
    from tests.test_bad_input import good_samples, write_dataset

    good = good_samples(small_dataset, 4)
    key, members = good[1]
    png = io.BytesIO()
    Image.open(io.BytesIO(members["jpg"])).save(png, format="PNG")
    members = {**{k: v for k, v in members.items() if k != "jpg"}, "png": png.getvalue()}
    data = write_dataset(small_dataset, tmp_path / "d", [good[0], (key, members), *good[2:]])
    cpu = next(iter(make_batch_stream(small_config(data), "eval")))
    host = next(iter(make_batch_stream(small_config(data, *DEVICE), "eval")))
    assert host.encoded_images is not None and host.encoded_images.count == 3
    assert host.images.shape == cpu.images.shape  # pixels travel: the PNG's
    assert torch.equal(host.images[1], cpu.images[1]) and not bool(host.images[0].any())
    out = decode_batch(host)
    assert not bool(host.images[0].any())  # the host batch's tensor is not written to
    mean, largest = difference(out.images, cpu.images)
    assert mean <= 0.5 and largest <= 16  # 24 -> 24, libjpeg both ways
    assert torch.equal(out.image_mask, cpu.image_mask)


def test_auto_and_device_resolve_by_where_the_batches_go() -> None:
    assert resolve_image_decode("cpu", "cpu") is False
    assert resolve_image_decode("auto", "cpu") is False  # the CPU path stays for CPU runs
    assert resolve_image_decode("device", "cpu") is True  # allowed: decoded in the training process
    assert resolve_image_decode("auto") is False  # no NCCL process group: the batches stay on the CPU
    if torch.cuda.is_available():
        cuda = torch.device("cuda", 0)
        assert resolve_image_decode("auto", cuda) is decodes_on(cuda)


def test_the_config_field_is_checked() -> None:
    with pytest.raises(ConfigError, match="image_decode"):
        small_config("x", "data.image_decode=gpu")


# ------------------------------------------------------------------------------------------------ training


def _losses(dataset: str, out: str, overrides: list[str]) -> None:
    from tests.test_content_source import _trainer

    t = _trainer(dataset, [*sized(), "training.steps=4", *overrides], out)
    losses = [float(t.train_step(batch)) for batch, _ in zip(t.train_stream, range(4))]
    on_device = t.train_stream.dataset.settings.limits.jpeg_on_device
    Path(out, "losses.json").write_text(json.dumps({"losses": losses, "on_device": on_device}))


@pytest.mark.slow
def test_training_with_device_decoding_gives_the_cpu_paths_losses(jpeg_dataset: Path, tmp_path: Path) -> None:
    from tests.test_content_source import in_process

    losses = {}
    for mode in ("cpu", "device"):
        out = tmp_path / mode
        in_process(_losses, str(jpeg_dataset), str(out), [f"data.image_decode={mode}"])
        got = json.loads((out / "losses.json").read_text())
        assert got["on_device"] == (mode == "device")
        losses[mode] = got["losses"]
    print(f"losses: {losses}")
    assert losses["device"] == pytest.approx(losses["cpu"], rel=5e-3), losses


# ------------------------------------------------------------------------------------------------ nvJPEG


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_gives_the_cpu_paths_pixels_within_the_tolerance(jpeg_dataset: Path) -> None:
    device = torch.device("cuda", 0)
    if not decodes_on(device):
        pytest.skip("torchvision cannot decode JPEG on CUDA here (not installed, or built without nvJPEG)")
    for size in (24, SOURCE_SIZE):
        cpu = first_batch(jpeg_dataset, f"data.image_size={size}")
        host = first_batch(jpeg_dataset, f"data.image_size={size}", *DEVICE)
        out = decode_batch(host.to(device))
        assert out.images.device.type == "cuda" and out.encoded_images is None
        mean, largest = difference(out.images.cpu(), cpu.images)
        print(f"nvJPEG vs the CPU path at {size}: mean {mean:.3f}, max {largest}")
        tolerance = TOLERANCE["resized" if size * 2 <= SOURCE_SIZE else "same_size"]
        assert mean <= tolerance["mean_abs"] and largest <= tolerance["max_abs"], (size, mean, largest)
    # nvJPEG decodes a JPEG cut in its scan without an error (the workers refuse those); a broken header it refuses
    bad = with_jpeg(host, 2, b"\xff\xd8\xff\xe0" + bytes(200))
    bad.encoded_images.policy = "skip"  # type: ignore[union-attr]
    out = decode_batch(bad.to(device))
    row = int(host.encoded_images.slots[2, 0])  # type: ignore[union-attr]
    assert not bool(out.valid[row]) and int(out.valid.sum()) == host.size - 1
