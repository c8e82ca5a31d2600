//! Decoding of untrusted image bytes. The pixel limit is checked from the header, before any
//! pixel buffer is allocated, so a tiny file that declares huge dimensions costs nothing.
//!
//! A JPEG much larger than a model needs is decoded in the DCT domain at 1/2, 1/4 or 1/8 of its
//! size (as PIL's `draft()` and libjpeg-turbo's scaling factors do): the smallest scale that
//! still leaves at least the pixels the resize step needs on each axis. A phone photo then
//! costs its Huffman decoding and little else. Everything else, and any JPEG the scaled path
//! cannot take (CMYK, 16-bit, an error), goes through the full decoder as before.

use std::cell::RefCell;
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

/// The most scans a progressive JPEG may have on the scaled path. libjpeg-turbo's guard against
/// files made of thousands of tiny scans (each one a pass over the whole image); real encoders
/// write about ten. A file over it is left to the full decoder, which has its own limits.
const MAX_PROGRESSIVE_SCANS: u32 = 500;

thread_local! {
    /// One libjpeg-turbo decompressor per decoding thread: creating one allocates its state,
    /// and a thread decodes one image at a time.
    static TURBOJPEG: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
}

/// The scaled path, or `None` where it does not apply or cannot decode the file: the full
/// decoder then takes it and reports any error exactly as it always has.
///
/// libjpeg-turbo decodes here (as in PIL's `draft()`): its Huffman decoder is what a scaled
/// decode mostly costs. It reports any warning (corrupt data, a premature end) as an error, so
/// it never hands back a padded image.
fn try_scaled_jpeg(bytes: &[u8], limits: DecodeLimits, needed: impl Fn(u32, u32) -> Option<(u32, u32)>) -> Option<Decoded> {
    if !bytes.starts_with(&[0xFF, 0xD8, 0xFF]) || !jpeg_is_complete(bytes) {
        return None;
    }
    TURBOJPEG.with_borrow_mut(|slot| {
        if slot.is_none() {
            let mut decompressor = turbojpeg::Decompressor::new().ok()?;
            decompressor.set_scan_limit(MAX_PROGRESSIVE_SCANS).ok()?;
            *slot = Some(decompressor);
        }
        let decompressor = slot.as_mut()?;
        // The header is the file's own size whatever scaling factor a previous decode left set.
        let header = decompressor.read_header(bytes).ok()?;
        let (width, height) = (u32::try_from(header.width).ok()?, u32::try_from(header.height).ok()?);
        let pixels = u64::from(width) * u64::from(height);
        if pixels == 0 || pixels > limits.max_pixels || header.is_lossless {
            return None;
        }
        // CMYK and YCCK have no RGB conversion in libjpeg-turbo; the full decoder does it.
        if !matches!(header.colorspace, turbojpeg::Colorspace::YCbCr | turbojpeg::Colorspace::Gray | turbojpeg::Colorspace::RGB) {
            return None;
        }
        let orientation = exif_orientation(bytes);
        let turned = matches!(
            orientation,
            Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
        );
        let original = if turned { (height, width) } else { (width, height) };
        let (need_w, need_h) = needed(original.0, original.1)?;
        let (need_w, need_h) = if turned { (need_h, need_w) } else { (need_w, need_h) };
        let eighths = dct_scale(width, height, need_w, need_h)?;
        let factor = turbojpeg::ScalingFactor::new(eighths as usize, 8);
        decompressor.set_scaling_factor(factor).ok()?;
        let (out_w, out_h) = (factor.scale(header.width), factor.scale(header.height));
        let mut rgb = turbojpeg::Image {
            pixels: vec![0u8; out_w.checked_mul(out_h)?.checked_mul(3)?],
            width: out_w,
            pitch: 3 * out_w,
            height: out_h,
            format: turbojpeg::PixelFormat::RGB,
        };
        decompressor.decompress(bytes, rgb.as_deref_mut()).ok()?;
        let rgb = RgbImage::from_raw(u32::try_from(out_w).ok()?, u32::try_from(out_h).ok()?, rgb.pixels)?;
        let mut image = DynamicImage::ImageRgb8(rgb);
        image.apply_orientation(orientation);
        Some(Decoded { image: image.into_rgb8(), original })
    })
}

/// The EXIF orientation of a JPEG, read from its headers alone by the same parser that
/// `image` uses for full decoding, so that both paths turn a photo the same way.
fn exif_orientation(bytes: &[u8]) -> Orientation {
    let mut headers = zune_jpeg::JpegDecoder::new(Cursor::new(bytes));
    if headers.decode_headers().is_err() {
        return Orientation::NoTransforms;
    }
    headers.exif().and_then(|exif| Orientation::from_exif_chunk(exif)).unwrap_or(Orientation::NoTransforms)
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

    /// `jpeg` with an EXIF block (APP1, big-endian TIFF, one IFD entry) giving `orientation`.
    fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&(tiff.len() as u16 + 2).to_be_bytes());
        out.extend_from_slice(&tiff);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    /// Mean absolute difference between `small` and `large` shrunk to `small`'s size.
    fn mean_difference(small: &RgbImage, large: &RgbImage) -> f64 {
        let shrunk = image::imageops::resize(large, small.width(), small.height(), image::imageops::FilterType::Triangle);
        let total: u64 = small.as_raw().iter().zip(shrunk.as_raw()).map(|(a, b)| u64::from(a.abs_diff(*b))).sum();
        total as f64 / small.as_raw().len() as f64
    }

    #[test]
    fn the_scaled_path_turns_by_exif_and_matches_the_full_decode() {
        let photo = RgbImage::from_fn(1600, 1200, |x, y| Rgb([(x / 7) as u8, (y / 5) as u8, ((x + y) / 11) as u8]));
        let jpeg = encode(&DynamicImage::ImageRgb8(photo), ImageFormat::Jpeg);
        for orientation in [1u16, 3, 6, 8] {
            let oriented = with_exif_orientation(&jpeg, orientation);
            let full = decode_image(&oriented, LIMITS).unwrap();
            let scaled = decode_scaled(&oriented, LIMITS, |_, _| Some((150, 150))).unwrap();
            assert_eq!(scaled.original, full.dimensions(), "orientation {orientation}");
            assert_eq!(scaled.scale_name(), "1/8");
            let turned = matches!(orientation, 6 | 8);
            assert_eq!(scaled.image.dimensions(), if turned { (150, 200) } else { (200, 150) });
            let difference = mean_difference(&scaled.image, &full);
            assert!(difference < 3.0, "orientation {orientation}: mean difference {difference}");
        }
    }

    #[test]
    fn a_grey_jpeg_decodes_scaled_to_rgb() {
        let grey = image::GrayImage::from_fn(1200, 900, |x, y| image::Luma([((x * 3 + y) / 16) as u8]));
        let jpeg = encode(&DynamicImage::ImageLuma8(grey), ImageFormat::Jpeg);
        let full = decode_image(&jpeg, LIMITS).unwrap();
        let scaled = decode_scaled(&jpeg, LIMITS, |_, _| Some((300, 200))).unwrap();
        assert_eq!(scaled.scale_name(), "1/4");
        assert!(scaled.image.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
        assert!(mean_difference(&scaled.image, &full) < 3.0);
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
