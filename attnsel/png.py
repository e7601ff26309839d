"""A minimal PNG writer (8-bit RGB, zlib + struct): the command needs no imaging library."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def to_uint8_hwc(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) or (1, 3, H, W) floats in [-1, 1] -> (H, W, 3) uint8."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).contiguous()


def encode_png(pixels: torch.Tensor) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 tensor."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 tensor, got {pixels.dtype} {tuple(pixels.shape)}")
    height, width, _ = pixels.shape
    raw = pixels.cpu().numpy().tobytes()
    stride = width * 3
    # Filter type 0 (None) before every scanline.
    scanlines = b"".join(b"\x00" + raw[y * stride : (y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit depth, colour type 2 (RGB)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(scanlines, 9)) + _chunk(b"IEND", b"")


def write_png(path: str | Path, image: torch.Tensor) -> Path:
    """Write an image tensor ((3, H, W) / (1, 3, H, W) in [-1, 1], or (H, W, 3) uint8) as a PNG file."""
    pixels = image if image.dtype == torch.uint8 else to_uint8_hwc(image)
    path = Path(path)
    path.write_bytes(encode_png(pixels))
    return path


def read_png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; raises ValueError if the file is not a PNG."""
    data = Path(path).read_bytes()[:33]
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    return width, height
