//! Decoding of untrusted image bytes. The pixel limit is checked from the header, before any
//! pixel buffer is allocated, so a tiny file that declares huge dimensions costs nothing.
//!
//! A JPEG much larger than a model needs is decoded in the DCT domain at 1/2, 1/4 or 1/8 of its
//! size (as PIL's `draft()` and libjpeg-turbo's scaling factors do): the smallest scale that
//! still leaves at least the pixels the resize step needs on each axis. A phone photo then
//! costs its Huffman decoding and little else. Everything else, and any JPEG the scaled path
//! cannot take (CMYK, 16-bit, an error), goes through the full decoder as before.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_pixels: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("the image is empty (0 bytes)")]
    Empty,
    #[error("the bytes are not an image in a supported format (jpeg, png, gif, webp, bmp, tiff)")]
    UnknownFormat,
    #[error("the image is {width}×{height} = {pixels} pixels, over the limit of {limit}")]
    TooManyPixels { width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("the image has a zero dimension")]
    ZeroSize,
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
    #[error("the JPEG is truncated: it has no end-of-image marker")]
    TruncatedJpeg,
}

/// A JPEG's data ends with the end-of-image marker (`FF D9`), possibly followed by padding or
/// trailing metadata. The decoder pads a cut-off scan with grey and succeeds, so a file cut
/// short in transit would otherwise be classified as whatever half an image looks like.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    // Trailing bytes after EOI happen (camera padding, appended data); 64 KiB of them is plenty.
    let tail = &bytes[bytes.len().saturating_sub(64 * 1024)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Decoded pixels and the size of the image they stand for: `image` is smaller than
/// `original` when the JPEG was decoded at a reduced scale. Both are after EXIF orientation.
#[derive(Debug)]
pub struct Decoded {
    pub image: RgbImage,
    pub original: (u32, u32),
}

impl Decoded {
    pub fn is_scaled(&self) -> bool {
        self.image.dimensions() != self.original
    }

    /// The DCT scale it was decoded at, "1/2", "1/4" or "1/8" ("1" when whole).
    pub fn scale_name(&self) -> &'static str {
        let original = self.original.0.max(1);
        match (8 * self.image.width() + original / 2) / original {
            0..=1 => "1/8",
            2 => "1/4",
            3..=4 => "1/2",
            _ => "1",
        }
    }
}

/// Decodes `bytes` like [`decode_image`], except that a JPEG is decoded at the smallest DCT
/// scale that leaves at least `needed(width, height)` pixels on each axis, where width and
/// height are the image's own (oriented) size. `needed` returning `None` asks for full size.
pub fn decode_scaled(bytes: &[u8], limits: DecodeLimits, needed: impl Fn(u32, u32) -> Option<(u32, u32)>) -> Result<Decoded, DecodeError> {
    if let Some(decoded) = try_scaled_jpeg(bytes, limits, needed) {
        return Ok(decoded);
    }
    let image = decode_image(bytes, limits)?;
    let original = image.dimensions();
    Ok(Decoded { image, original })
}

/// The scaled path, or `None` where it does not apply or cannot decode the file: the full
/// decoder then takes it and reports any error exactly as it always has.
fn try_scaled_jpeg(bytes: &[u8], limits: DecodeLimits, needed: impl Fn(u32, u32) -> Option<(u32, u32)>) -> Option<Decoded> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) || !jpeg_is_complete(bytes) {
        return None;
    }
    let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    decoder.read_info().ok()?;
    let info = decoder.info()?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 || pixels > limits.max_pixels {
        return None;
    }
    if !matches!(info.pixel_format, jpeg_decoder::PixelFormat::RGB24 | jpeg_decoder::PixelFormat::L8) {
        return None;
    }
    let orientation = decoder.exif_data().and_then(Orientation::from_exif_chunk).unwrap_or(Orientation::NoTransforms);
    let turned = matches!(
        orientation,
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    );
    let original = if turned { (height, width) } else { (width, height) };
    let (need_w, need_h) = needed(original.0, original.1)?;
    let (need_w, need_h) = if turned { (need_h, need_w) } else { (need_w, need_h) };
    let eighths = dct_scale(width, height, need_w, need_h)?;
    let (out_w, out_h) = decoder.scale(scaled(width, eighths) as u16, scaled(height, eighths) as u16).ok()?;
    let (out_w, out_h) = (u32::from(out_w), u32::from(out_h));
    // The decoder picks its scale by one axis; keep its answer only when both suffice.
    if out_w < need_w || out_h < need_h || (out_w, out_h) == (width, height) {
        return None;
    }
    let data = decoder.decode().ok()?;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => RgbImage::from_fn(out_w, out_h, |x, y| {
            let v = data[(y * out_w + x) as usize];
            image::Rgb([v, v, v])
        }),
        _ => RgbImage::from_raw(out_w, out_h, data)?,
    };
    let mut image = DynamicImage::ImageRgb8(rgb);
    image.apply_orientation(orientation);
    Some(Decoded { image: image.into_rgb8(), original })
}

/// `size` decoded at `eighths`/8 of its size: the IDCT output rounds up.
fn scaled(size: u32, eighths: u32) -> u32 {
    (size * eighths).div_ceil(8)
}

/// The smallest DCT scale below full size (1, 2 or 4 eighths) that leaves at least
/// `need_w × need_h` pixels; `None` when only full size does.
fn dct_scale(width: u32, height: u32, need_w: u32, need_h: u32) -> Option<u32> {
    [1, 2, 4].into_iter().find(|&e| scaled(width, e) >= need_w && scaled(height, e) >= need_h)
}

/// Decodes `bytes` into 8-bit RGB with its EXIF orientation applied. Grey, alpha, palette,
/// 16-bit and CMYK sources all end up as RGB8; an animated GIF gives its first frame.
pub fn decode_image(bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    match reader.format() {
        None => return Err(DecodeError::UnknownFormat),
        Some(image::ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => return Err(DecodeError::TruncatedJpeg),
        Some(_) => {}
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(DecodeError::TooManyPixels { width, height, pixels, limit: limits.max_pixels });
    }
    if pixels == 0 {
        return Err(DecodeError::ZeroSize);
    }
    // A missing or unreadable EXIF block is not an error: the image is then taken as stored.
    let orientation = decoder.orientation().ok();
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb};

    const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 7680 * 4320 };

    fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_png_and_jpeg_to_rgb() {
        let mut img = RgbImage::new(7, 5);
        img.put_pixel(3, 2, Rgb([200, 10, 30]));
        let dynamic = DynamicImage::ImageRgb8(img);
        let png = decode_image(&encode(&dynamic, ImageFormat::Png), LIMITS).unwrap();
        assert_eq!(png.dimensions(), (7, 5));
        assert_eq!(png.get_pixel(3, 2), &Rgb([200, 10, 30]));
        let jpeg = decode_image(&encode(&dynamic, ImageFormat::Jpeg), LIMITS).unwrap();
        assert_eq!(jpeg.dimensions(), (7, 5));
    }

    #[test]
    fn converts_grey_and_alpha_to_rgb() {
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 3, image::Luma([77])));
        let rgb = decode_image(&encode(&grey, ImageFormat::Png), LIMITS).unwrap();
        assert_eq!(rgb.get_pixel(0, 0), &Rgb([77, 77, 77]));
        let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(2, 2, image::Rgba([1, 2, 3, 0])));
        let rgb = decode_image(&encode(&rgba, ImageFormat::Png), LIMITS).unwrap();
        assert_eq!(rgb.get_pixel(1, 1), &Rgb([1, 2, 3]));
    }

    #[test]
    fn rejects_empty_and_unknown_bytes() {
        assert_eq!(decode_image(b"", LIMITS), Err(DecodeError::Empty));
        assert_eq!(decode_image(b"<html>not an image</html>", LIMITS), Err(DecodeError::UnknownFormat));
    }

    #[test]
    fn rejects_a_jpeg_cut_short_that_the_decoder_would_pad() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(64, 64, |x, y| Rgb([(x * 4) as u8, (y * 4) as u8, 99])));
        let jpeg = encode(&img, ImageFormat::Jpeg);
        assert_eq!(decode_image(&jpeg[..jpeg.len() * 2 / 3], LIMITS), Err(DecodeError::TruncatedJpeg));
        let mut padded = jpeg.clone();
        padded.extend_from_slice(&[0u8; 100]);
        assert!(decode_image(&padded, LIMITS).is_ok(), "bytes after the end marker are tolerated");
    }

    fn noisy_jpeg(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| Rgb([(x % 251) as u8, (y % 241) as u8, ((x * 7 + y * 3) % 256) as u8]));
        encode(&DynamicImage::ImageRgb8(img), ImageFormat::Jpeg)
    }

    #[test]
    fn picks_the_smallest_dct_scale_that_leaves_enough_pixels() {
        assert_eq!(dct_scale(4032, 3024, 341, 256), Some(1)); // 504 × 378
        assert_eq!(dct_scale(4032, 3024, 300, 300), Some(1));
        assert_eq!(dct_scale(4032, 3024, 960, 720), Some(2)); // 1008 × 756
        assert_eq!(dct_scale(4032, 3024, 1100, 600), Some(4)); // 2016 × 1512
        assert_eq!(dct_scale(4032, 3024, 2100, 100), None);
        assert_eq!(scaled(451, 1), 57);
    }

    #[test]
    fn a_large_jpeg_decodes_scaled_and_keeps_its_original_size() {
        let jpeg = noisy_jpeg(1600, 1200);
        let decoded = decode_scaled(&jpeg, LIMITS, |w, h| {
            assert_eq!((w, h), (1600, 1200));
            Some((300, 200))
        })
        .unwrap();
        assert_eq!(decoded.original, (1600, 1200));
        assert_eq!(decoded.image.dimensions(), (400, 300));
        assert!(decoded.is_scaled());
        assert_eq!(decoded.scale_name(), "1/4");
        // Asking for full size, or for more than any reduced scale gives, decodes it whole.
        assert_eq!(decode_scaled(&jpeg, LIMITS, |_, _| None).unwrap().image.dimensions(), (1600, 1200));
        assert_eq!(decode_scaled(&jpeg, LIMITS, |_, _| Some((900, 10))).unwrap().image.dimensions(), (1600, 1200));
        // Other formats always decode whole.
        let png = encode(&DynamicImage::ImageRgb8(RgbImage::new(1600, 1200)), ImageFormat::Png);
        assert!(!decode_scaled(&png, LIMITS, |_, _| Some((10, 10))).unwrap().is_scaled());
    }

    #[test]
    fn the_scaled_path_keeps_the_limits_and_refusals() {
        let jpeg = noisy_jpeg(1600, 1200);
        let small = DecodeLimits { max_pixels: 1_000_000 };
        let err = decode_scaled(&jpeg, small, |_, _| Some((100, 100))).unwrap_err();
        assert!(matches!(err, DecodeError::TooManyPixels { pixels: 1_920_000, .. }), "{err:?}");
        let err = decode_scaled(&jpeg[..jpeg.len() * 2 / 3], LIMITS, |_, _| Some((100, 100))).unwrap_err();
        assert_eq!(err, DecodeError::TruncatedJpeg);
    }

    #[test]
    fn rejects_truncated_png() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, Rgb([9, 9, 9])));
        let png = encode(&img, ImageFormat::Png);
        let err = decode_image(&png[..png.len() / 2], LIMITS).unwrap_err();
        assert!(matches!(err, DecodeError::Corrupt(_)), "{err:?}");
    }

    #[test]
    fn rejects_a_declared_size_over_the_limit_before_decoding() {
        // A valid 1×1 PNG whose header is patched to claim 100000×100000 pixels; the CRC no
        // longer matches, but the size check must fire first.
        let img = DynamicImage::ImageRgb8(RgbImage::new(1, 1));
        let mut png = encode(&img, ImageFormat::Png);
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let err = decode_image(&png, LIMITS).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooManyPixels { .. }) || matches!(err, DecodeError::Corrupt(_)),
            "{err:?}"
        );
        let small = DecodeLimits { max_pixels: 10 };
        let img = DynamicImage::ImageRgb8(RgbImage::new(4, 4));
        let err = decode_image(&encode(&img, ImageFormat::Png), small).unwrap_err();
        assert!(matches!(err, DecodeError::TooManyPixels { pixels: 16, .. }), "{err:?}");
    }
}
