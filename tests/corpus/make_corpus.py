"""Writes the bad-input corpus into tests/corpus/files/ (committed; rerun only to change it).

accepted/  images that are odd but valid: every one must be answered 200.
rejected/  broken files and decompression bombs: every one must be answered 400 with the JSON
           error shape, before any large allocation.
"""
import io
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

OUT = pathlib.Path(__file__).resolve().parent / "files"


def save(folder, name, data):
    path = OUT / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def photo(width, height, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    rgb = (rgb + rng.integers(0, 20, rgb.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def png_with_size(width, height):
    """A valid 1 × 1 PNG whose header claims width × height (CRC fixed, so only the size lies)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:12 + 4 + 13]))
    data[12 + 4 + 13:12 + 4 + 13 + 4] = struct.pack(">I", crc)
    return bytes(data)


def jpeg_with_size(width, height):
    data = bytearray(encode(photo(8, 8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_with_size(width, height):
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    first_image = data.index(b"\x2c")
    data[first_image + 5:first_image + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def main():
    base = photo(96, 64)
    save("accepted", "tiny_1x1.png", encode(photo(1, 1), "PNG"))
    save("accepted", "wide_10000x3.png", encode(photo(10000, 3), "PNG"))
    save("accepted", "tall_3x10000.png", encode(photo(3, 10000), "PNG"))
    save("accepted", "cmyk.jpg", encode(base.convert("CMYK"), "JPEG"))
    gray16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    save("accepted", "gray_16bit.png", encode(gray16, "PNG"))
    rgb16 = np.asarray(base, dtype=np.uint16) * 257
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    header = struct.pack(">IIBBBBB", 96, 64, 16, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    save("accepted", "rgb_16bit.png", b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    save("accepted", "gray.png", encode(base.convert("L"), "PNG"))
    save("accepted", "gray_alpha.png", encode(base.convert("LA"), "PNG"))
    save("accepted", "rgba.png", encode(base.convert("RGBA"), "PNG"))
    save("accepted", "palette.png", encode(base.convert("P", palette=Image.ADAPTIVE), "PNG"))
    frames = [photo(48, 32, seed) for seed in range(3)]
    save("accepted", "animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0))
    save("accepted", "photo.webp", encode(base, "WEBP"))
    save("accepted", "photo.bmp", encode(base, "BMP"))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        save("accepted", f"exif_orientation_{orientation}.jpg", encode(base, "JPEG", exif=exif.tobytes()))

    jpeg = encode(photo(64, 64), "JPEG")
    png = encode(photo(64, 64), "PNG")
    gif = encode(photo(64, 64).convert("P"), "GIF")
    save("rejected", "truncated_header.jpg", jpeg[:200])
    save("rejected", "truncated_scan.jpg", jpeg[: len(jpeg) * 2 // 3])
    save("rejected", "truncated.png", png[: len(png) // 2])
    save("rejected", "truncated.gif", gif[:40])
    corrupt = bytearray(png)
    idat = corrupt.index(b"IDAT")
    for i in range(idat + 8, idat + 40):
        corrupt[i] ^= 0x5A
    save("rejected", "corrupt_data.png", bytes(corrupt))
    save("rejected", "no_image_marker.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    save("rejected", "random_bytes.bin", np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    save("rejected", "page.html", b"<!doctype html><html><body><h1>not an image</h1></body></html>")
    save("rejected", "empty.bin", b"")
    save("rejected", "bomb_100000x100000.png", png_with_size(100_000, 100_000))
    save("rejected", "bomb_60000x60000.jpg", jpeg_with_size(60_000, 60_000))
    save("rejected", "bomb_65535x65535.gif", gif_with_size(65_535, 65_535))


if __name__ == "__main__":
    main()
