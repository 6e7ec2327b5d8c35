"""JPEG decoding on the training device (`data.image_decode = "device"`).

The reader's workers only check each JPEG's header (`decode.jpeg_for_device`) and ship its bytes with the batch
(`Batch.encoded_images`, in host memory); `Trainer.to_device` calls `decode_batch` once the rest of the batch is on
the device: every JPEG of the batch in one batched `torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on a
GPU; it takes host tensors), then a resize to image_size x image_size there, written into `Batch.images`
[B, N, 3, S, S] uint8. Any device works: on the CPU it is torchvision's libjpeg-turbo, or PIL where torchvision is
not installed, which is how the tests cover this file on CPU hosts.

The resize follows the CPU path (`decode.decode_image`: PIL `draft`, then a bilinear resize): PIL's draft has
libjpeg decode at 1/8, 1/4 or 1/2 scale (the largest that keeps both sides >= S), which is close to an average
over s x s blocks of the full decode; so here each full decode is averaged over s x s blocks (`avg_pool2d`), then
resized by `interpolate(mode="bilinear", antialias=True)` (PIL's resize filter), rounded to uint8. The two paths
are not bit-equal (libjpeg's scaled IDCT is not a box filter, and the decoders upsample chroma differently);
TOLERANCE says how far apart they were measured and what tests/test_device_decode.py holds them to.

nvJPEG decodes a JPEG cut short in its scan without an error (grey or garbage for the missing part), so the
workers refuse those (`decode.jpeg_for_device`: no end-of-image marker after the scan), as the CPU decoder does.

Cost (H200, torchvision 0.26, benchmarks/results/data_loader-2026-12-02-h200-16core-device-decode.md): 15 ms for
512 JPEGs of 224 x 224 in the batched call, the host thread busy throughout but the GIL released; progressive JPEGs
take nvJPEG's one-by-one path (164 us each), which is why the workers decode those on the CPU. Called in
`Trainer.to_device`, the decode runs on the training thread; to keep it off the step, call `to_device` for the next
batch from another thread.

A JPEG the batched call cannot decode fails the whole call; the JPEGs are then decoded one by one to find which.
A sample with a bad image is a bad sample, `bad_image`: under data.bad_input = "error" a BadSample naming the
shard, key and field is raised; under "skip" its row becomes invalid (`Batch.valid` False, no images, as the
padding rows: the losses and metrics leave it out) and it is counted in the stream's skip counts. The batch keeps
its size, so ranks still take equal batches; the reader's position is untouched, so resume stays exact.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config.schema import ConfigError
from trainer.data.batch import Batch, EncodedImages
from trainer.data.decode import BadSample

log = logging.getLogger(__name__)

TOLERANCE = {
    "resized": {"mean_abs": 1.5, "max_abs": 48},
    "same_size": {"mean_abs": 3.0, "max_abs": 128},
}
"""How far the device path's pixels may be from the CPU path's, in uint8 levels, on the synthetic dataset's JPEGs:
the mean absolute difference over a batch's pixels and the largest single one (tests/test_device_decode.py).
`resized`: JPEGs at least twice image_size a side (PIL's draft reduces them, here the block means). `same_size`:
no reduction, where the decoders differ in full: nvJPEG repeats 4:2:0 chroma samples, libjpeg interpolates them
("fancy upsampling"), so saturated colour edges differ by up to ~100 levels (libjpeg on the CPU, torchvision's or
PIL's, gives the same pixels exactly). Measured on an H200 (torchvision 0.26, 2026-12-02), synthetic covers:
64->24 mean 0.2 / max 13, 224->24 0.12 / 4, 224->64 0.05 / 12, 300->64 0.12 / 9; no reduction: 224->224
0.83 / 101, 64->64 2.8 / 100, 300->224 (bilinear only) 0.31 / 63. On noisy photo-like JPEGs of 8 x 8 colour blocks
(the worst case for chroma): 0.2-0.4 / 5 reduced, 9.2 / 168 at 224->224. The CPU decoders here (full decode, then
block means) are further from PIL's draft when reducing than nvJPEG is (64->24: 1.2-1.3 / 28), as libjpeg's
scaled decode reads the chroma samples as they are, and so does a block mean of nvJPEG's repeated ones."""
LOG_FIRST = 5
"""Bad images found on the device that are logged (per process); all are counted."""

Decoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]


# ------------------------------------------------------------------------------------------------ decoders


def torchvision_decoder(device: torch.device) -> Decoder:
    """torchvision's decode_jpeg on a list of host uint8 tensors (nvJPEG, batched, for a CUDA device); RGB out.
    Raises ImportError without torchvision."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))

    return decode


def pil_decode(jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reference decoder for the CPU when torchvision is missing: PIL at full scale, [3, H, W] uint8 each.
    Raises on any image it cannot decode, as the batched decoders do."""
    from PIL import Image

    out = []
    for jpeg in jpegs:
        with Image.open(io.BytesIO(jpeg.numpy().tobytes())) as image:
            out.append(torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy()))
    return out


@functools.cache  # one decoder per device, not one per batch
def decoder_for(device: torch.device) -> Decoder:
    try:
        return torchvision_decoder(device)
    except ImportError:
        if device.type != "cpu":
            raise ConfigError(
                f'data.image_decode = "device" on {device} needs torchvision (its decode_jpeg); it is not '
                'installed: use data.image_decode = "cpu" or "auto"'
            ) from None
        return pil_decode


@functools.cache
def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 20)).save(buf, format="JPEG")
    return buf.getvalue()


@functools.cache
def decodes_on(device: torch.device) -> bool:
    """Whether JPEGs decode on `device` here (torchvision installed, built with nvJPEG for CUDA): one tiny JPEG is
    tried, once per process and device."""
    try:
        tiny = torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)
        return decoder_for(device)([tiny])[0].shape == (3, 16, 16)
    except Exception as err:  # noqa: BLE001 (any failure means: not here)
        log.info("JPEG decoding on %s is not available: %s", device, err)
        return False


def batch_device() -> torch.device:
    """The device the trainer puts batches on: the CUDA device of an NCCL process group (`init_distributed`), else
    the CPU (gloo, or no process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_image_decode(setting: str, device: torch.device | str | None = None) -> bool:
    """data.image_decode -> whether JPEGs are left to the device. `device`: where the batches go (None:
    `batch_device()`). auto: on a CUDA device where torchvision decodes JPEG."""
    if setting == "cpu":
        return False
    device = torch.device(device) if device is not None else batch_device()
    if setting == "device":
        if device.type == "cuda" and not decodes_on(device):
            raise ConfigError(
                f'data.image_decode = "device": torchvision cannot decode JPEG on {device} here (not installed, or '
                'built without nvJPEG); use "cpu" or "auto"'
            )
        return True
    return device.type == "cuda" and decodes_on(device)


# ------------------------------------------------------------------------------------------------ resize


def draft_scale(height: int, width: int, size: int) -> int:
    """The reduction PIL's `draft` asks libjpeg for: the largest of 8, 4, 2, 1 within both sides' ratio to size."""
    ratio = min(width // size, height // size)
    return next(s for s in (8, 4, 2, 1) if ratio >= s)


def resize_like_cpu(images: torch.Tensor, size: int) -> torch.Tensor:
    """[n, 3, h, w] uint8 (one shape) -> [n, 3, size, size] uint8, as `decode.decode_image` resizes: the draft
    reduction (s x s block means), then an antialiased bilinear resize unless the size is already right."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    x = images.float()
    s = draft_scale(h, w, size)
    if s > 1:
        x = F.avg_pool2d(x, kernel_size=s, stride=s, ceil_mode=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------ the batch


def decode_batch(batch: Batch, decoder: Decoder | None = None) -> Batch:
    """The batch with its JPEGs decoded into `images` on the batch's device (that of `labels`); a batch with none
    to decode (already decoded, CPU-decoded, cache-served) comes back as it is. `decoder`: the JPEG decoder
    (default: torchvision's for the device, PIL on a CPU without it)."""
    encoded = batch.encoded_images
    if encoded is None:
        return batch
    device = batch.labels.device
    decoder = decoder or decoder_for(device)
    size = encoded.size
    rows, slots = batch.image_mask.shape
    images = batch.images
    if images.shape[-1] == 0:
        images = torch.zeros(rows, slots, 3, size, size, dtype=torch.uint8, device=device)
    elif images.device.type == "cpu":
        images = images.clone()  # .to("cpu") shares the host batch's tensor: leave that one as it was
    jpegs = encoded.jpegs()
    decoded, bad = decode_all(decoder, jpegs)
    place(images, encoded, decoded, size)
    if not bad:
        return replace(batch, images=images, encoded_images=None)
    return invalidate(batch, images, encoded, bad, device)


def decode_all(
    decoder: Decoder, jpegs: list[torch.Tensor]
) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """Every JPEG in one call; if that fails, one by one: the decoded images (None for a bad one) and the errors
    by JPEG index."""
    try:
        return list(decoder(jpegs)), {}
    except Exception:  # noqa: BLE001 (nvJPEG, libjpeg and PIL raise different types; each is retried alone)
        pass
    decoded: list[torch.Tensor | None] = []
    bad: dict[int, str] = {}
    for k, jpeg in enumerate(jpegs):
        try:
            decoded.append(decoder([jpeg])[0])
        except Exception as err:  # noqa: BLE001
            decoded.append(None)
            bad[k] = f"{type(err).__name__}: {err}".strip()[:300]
    if not bad:  # the batch failed but no single image does: not a bad input; the single decodes serve
        log.warning("decoding %d JPEGs together failed, but each alone decodes", len(jpegs))
    return decoded, bad


def place(
    images: torch.Tensor, encoded: EncodedImages, decoded: list[torch.Tensor | None], size: int
) -> None:
    """Resize the decoded images, those of one shape together, and write them to their (row, slot)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(decoded):
        if image is not None:
            groups.setdefault(tuple(image.shape), []).append(k)
    for members in groups.values():
        stacked = torch.stack([decoded[k] for k in members]).to(images.device)  # type: ignore[misc]
        at = encoded.slots[members].to(images.device, non_blocking=True)
        images[at[:, 0], at[:, 1]] = resize_like_cpu(stacked, size)


_logged = 0


def invalidate(
    batch: Batch, images: torch.Tensor, encoded: EncodedImages, bad: dict[int, str], device: torch.device
) -> Batch:
    """The bad JPEGs' samples under the policy: raise (error), or invalid rows counted as `bad_image` (skip)."""
    global _logged
    errors = [
        BadSample(*encoded.sources[k], "bad_image", f"the decoder on {device}: {why}")
        for k, why in bad.items()
    ]
    if encoded.policy == "error":
        raise errors[0]
    bad_rows = sorted({int(encoded.slots[k, 0]) for k in bad})
    for err in errors:
        _logged += 1
        if _logged <= LOG_FIRST:
            log.warning("skipping bad sample: %s", err)
    if encoded.skipped is not None:
        encoded.skipped["bad_image"] += len(bad_rows)
    index = torch.tensor(bad_rows, dtype=torch.int64).to(device, non_blocking=True)
    valid, image_mask = batch.valid.clone(), batch.image_mask.clone()
    valid[index] = False
    image_mask[index] = False
    images[index] = 0
    skipped = dict(batch.skipped)
    skipped["bad_image"] = skipped.get("bad_image", 0) + len(bad_rows)
    return replace(
        batch, images=images, image_mask=image_mask, valid=valid, encoded_images=None, skipped=skipped
    )
