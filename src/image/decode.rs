//! Decoding of untrusted image bytes. The pixel limit is checked from the header, before any
//! pixel buffer is allocated, so a tiny file that declares huge dimensions costs nothing.

use std::io::Cursor;

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
