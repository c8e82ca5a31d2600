//! Image → model input, as the model's `[input]` config says: resize policy, value scale, mean,
//! std and channel order, written straight into a CHW `f32` buffer. The [`Geometry`] records the
//! affine map from original pixels to model-input pixels so results can be mapped back.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

use super::Decoded;
use crate::model_config::{ChannelOrder, InputSpec, ResizeFilter, ResizePolicy};

/// Per axis: `input = original * scale + offset`, in pixel units (pixel edges, not centres).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub original_width: u32,
    pub original_height: u32,
    pub input_width: u32,
    pub input_height: u32,
    pub scale_x: f32,
    pub scale_y: f32,
    pub offset_x: f32,
    pub offset_y: f32,
}

impl Geometry {
    /// A `width × height` input that is its own original: no resize, no offset (warm-up
    /// blanks, already-preprocessed tensors).
    pub fn identity(width: u32, height: u32) -> Self {
        Geometry {
            original_width: width,
            original_height: height,
            input_width: width,
            input_height: height,
            scale_x: 1.0,
            scale_y: 1.0,
            offset_x: 0.0,
            offset_y: 0.0,
        }
    }

    /// Maps a point in model-input pixels back to the original image, clamped to its bounds.
    pub fn to_original(&self, x: f32, y: f32) -> (f32, f32) {
        let (ox, oy) = self.to_original_unclamped(x, y);
        (ox.clamp(0.0, self.original_width as f32), oy.clamp(0.0, self.original_height as f32))
    }

    /// [`Self::to_original`] without keeping the point inside the image: a rotated box's
    /// centre and corners may lie past its edges.
    pub fn to_original_unclamped(&self, x: f32, y: f32) -> (f32, f32) {
        ((x - self.offset_x) / self.scale_x, (y - self.offset_y) / self.scale_y)
    }
}

/// A model-ready image: CHW floats of `input_height × input_width`, plus its geometry.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub data: Vec<f32>,
    pub geometry: Geometry,
}

/// Where the resized image lands on the model-input canvas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placement {
    resized_width: u32,
    resized_height: u32,
    canvas_width: u32,
    canvas_height: u32,
    /// Position of the resized image's top-left corner on the canvas; negative for a crop.
    left: i64,
    top: i64,
}

fn placement(spec: &InputSpec, width: u32, height: u32) -> Placement {
    let (w, h) = (width as f64, height as f64);
    match spec.resize {
        ResizePolicy::ShorterSideCenterCrop => {
            // torchvision's Resize(int): the long side is truncated, not rounded.
            let short_target = spec.resize_shorter.unwrap_or(spec.width.min(spec.height));
            let (rw, rh) = if width <= height {
                (short_target, ((short_target as f64) * h / w) as u32)
            } else {
                (((short_target as f64) * w / h) as u32, short_target)
            };
            // torchvision's CenterCrop: Python's round(), which rounds halves to even.
            let left = ((rw as f64 - spec.width as f64) / 2.0).round_ties_even() as i64;
            let top = ((rh as f64 - spec.height as f64) / 2.0).round_ties_even() as i64;
            Placement {
                resized_width: rw.max(1),
                resized_height: rh.max(1),
                canvas_width: spec.width,
                canvas_height: spec.height,
                left: -left,
                top: -top,
            }
        }
        ResizePolicy::Stretch => Placement {
            resized_width: spec.width,
            resized_height: spec.height,
            canvas_width: spec.width,
            canvas_height: spec.height,
            left: 0,
            top: 0,
        },
        ResizePolicy::Letterbox => {
            // The ultralytics LetterBox arithmetic, so a user's own YOLO export sees the input
            // it was trained on.
            let r = (spec.width as f64 / w).min(spec.height as f64 / h);
            let rw = ((w * r).round() as u32).clamp(1, spec.width);
            let rh = ((h * r).round() as u32).clamp(1, spec.height);
            let dw = (spec.width - rw) as f64 / 2.0;
            let dh = (spec.height - rh) as f64 / 2.0;
            Placement {
                resized_width: rw,
                resized_height: rh,
                canvas_width: spec.width,
                canvas_height: spec.height,
                left: (dw - 0.1).round() as i64,
                top: (dh - 0.1).round() as i64,
            }
        }
        ResizePolicy::FitMultiple => {
            let max_side = spec.max_side.unwrap_or(spec.width.max(spec.height)) as f64;
            let multiple = spec.multiple.unwrap_or(32).max(1) as f64;
            let ratio = (max_side / w.max(h)).min(1.0);
            let round = |v: f64| (((v * ratio) / multiple).round() * multiple).max(multiple) as u32;
            let (rw, rh) = (round(w), round(h));
            Placement {
                resized_width: rw,
                resized_height: rh,
                canvas_width: rw,
                canvas_height: rh,
                left: 0,
                top: 0,
            }
        }
        ResizePolicy::Original => Placement {
            resized_width: width,
            resized_height: height,
            canvas_width: width,
            canvas_height: height,
            left: 0,
            top: 0,
        },
    }
}

#[derive(Debug, thiserror::Error)]
#[error("resizing failed: {0}")]
pub struct PreprocessError(String);

/// Above this many resized pixels only the part that lands on the canvas is resized: a
/// 10000 × 3 image resized to a shorter side of 256 would otherwise be 853333 × 256 (650 MB)
/// to crop 224 × 224 from. Below it the whole image is resized, exactly as torchvision does.
const FULL_RESIZE_MAX_PIXELS: u64 = 8_000_000;

/// Resizes, places and normalises `image` into a CHW float buffer for the model.
pub fn preprocess(image: &RgbImage, spec: &InputSpec) -> Result<PreparedImage, PreprocessError> {
    preprocess_as(image, image.dimensions(), spec)
}

/// [`preprocess`] for an image that may have been decoded at a reduced scale: the placement
/// and the geometry are those of the original size, so the model sees what it would see of
/// the full image and results map back to the uploaded image's own pixels.
pub fn preprocess_decoded(decoded: &Decoded, spec: &InputSpec) -> Result<PreparedImage, PreprocessError> {
    preprocess_as(&decoded.image, decoded.original, spec)
}

/// How much larger than the resize step's output a scaled decode stays, on each axis. The DCT
/// scaling averages blocks; the antialiased resize after it must still do most of the
/// filtering, or the model sees a visibly different image: decoded at exactly the resize size
/// (a 512 × 512 photo halved to 256 for a 256 shorter side), mobilenet_v2's top-5
/// probabilities moved by 0.045 on average; with this margin they stay within 0.02 (checked
/// in tests/python/test_scaled_decode.py). On a 12 MP photo it costs little: the Huffman
/// decoding, not the inverse DCT, is most of the time.
const SCALED_DECODE_MARGIN: u32 = 2;

/// The size a scaled decode must not go below for an image of `width × height`: the resize
/// step's output, times the margin; `None` when the model wants the image whole (`original`,
/// or scaled decoding turned off in its config).
pub fn decode_size_needed(spec: &InputSpec, width: u32, height: u32) -> Option<(u32, u32)> {
    if !spec.scaled_decode || spec.resize == ResizePolicy::Original {
        return None;
    }
    let place = placement(spec, width, height);
    Some((place.resized_width * SCALED_DECODE_MARGIN, place.resized_height * SCALED_DECODE_MARGIN))
}

fn preprocess_as(image: &RgbImage, (width, height): (u32, u32), spec: &InputSpec) -> Result<PreparedImage, PreprocessError> {
    let place = placement(spec, width, height);
    let resized_pixels = u64::from(place.resized_width) * u64::from(place.resized_height);
    let data = if resized_pixels > FULL_RESIZE_MAX_PIXELS {
        let (visible, source_crop) = visible_part(&place, image.width(), image.height());
        let resized = resize_rgb(image, visible.resized_width, visible.resized_height, Some(source_crop), spec.resize_filter)?;
        normalise_onto_canvas(resized.as_deref().unwrap_or(image.as_raw()), &visible, spec)
    } else {
        let resized = resize_rgb(image, place.resized_width, place.resized_height, None, spec.resize_filter)?;
        normalise_onto_canvas(resized.as_deref().unwrap_or(image.as_raw()), &place, spec)
    };
    let geometry = Geometry {
        original_width: width,
        original_height: height,
        input_width: place.canvas_width,
        input_height: place.canvas_height,
        scale_x: place.resized_width as f32 / width as f32,
        scale_y: place.resized_height as f32 / height as f32,
        offset_x: place.left as f32,
        offset_y: place.top as f32,
    };
    Ok(PreparedImage { data, geometry })
}

/// The part of the resized image that falls on the canvas, as a placement of its own, and the
/// source rectangle (left, top, width, height) it comes from.
fn visible_part(place: &Placement, width: u32, height: u32) -> (Placement, [f64; 4]) {
    let span = |offset: i64, resized: u32, canvas: u32| {
        let start = (-offset).clamp(0, i64::from(resized));
        let end = (i64::from(canvas) - offset).clamp(start, i64::from(resized));
        (start, (end - start).max(1))
    };
    let (x0, vw) = span(place.left, place.resized_width, place.canvas_width);
    let (y0, vh) = span(place.top, place.resized_height, place.canvas_height);
    let sx = f64::from(width) / f64::from(place.resized_width);
    let sy = f64::from(height) / f64::from(place.resized_height);
    let visible = Placement {
        resized_width: vw as u32,
        resized_height: vh as u32,
        left: place.left + x0,
        top: place.top + y0,
        ..*place
    };
    (visible, [x0 as f64 * sx, y0 as f64 * sy, vw as f64 * sx, vh as f64 * sy])
}

/// Bilinear resize, with antialiasing (Pillow's convolution, which torchvision's PIL path uses)
/// or without (OpenCV's `INTER_LINEAR`, as ultralytics resizes), of the whole image or of `crop`
/// (left, top, width, height in source pixels). `None` when nothing changes.
fn resize_rgb(
    image: &RgbImage,
    width: u32,
    height: u32,
    crop: Option<[f64; 4]>,
    filter: ResizeFilter,
) -> Result<Option<Vec<u8>>, PreprocessError> {
    if image.dimensions() == (width, height) && crop.is_none() {
        return Ok(None);
    }
    let src = ImageRef::new(image.width(), image.height(), image.as_raw(), PixelType::U8x3)
        .map_err(|e| PreprocessError(e.to_string()))?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    let algorithm = match filter {
        ResizeFilter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
        ResizeFilter::OpencvLinear => ResizeAlg::Interpolation(FilterType::Bilinear),
    };
    let mut options = ResizeOptions::new().resize_alg(algorithm);
    if let Some([left, top, w, h]) = crop {
        options = options.crop(left, top, w, h);
    }
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| PreprocessError(e.to_string()))?;
    Ok(Some(dst.into_vec()))
}

fn normalise_onto_canvas(resized: &[u8], place: &Placement, spec: &InputSpec) -> Vec<f32> {
    let (cw, ch) = (place.canvas_width as usize, place.canvas_height as usize);
    let plane = cw * ch;
    let channels: [usize; 3] = match spec.channel_order {
        ChannelOrder::Rgb => [0, 1, 2],
        ChannelOrder::Bgr => [2, 1, 0],
    };
    // One multiply-add per value: (v * scale - mean) / std == v * a + b.
    let mut a = [0f32; 3];
    let mut b = [0f32; 3];
    for out_c in 0..3 {
        let src_c = channels[out_c];
        a[out_c] = spec.scale / spec.std[src_c];
        b[out_c] = -spec.mean[src_c] / spec.std[src_c];
    }
    let mut data = vec![0f32; plane * 3];
    let pad = spec.pad_value as f32;
    for out_c in 0..3 {
        data[out_c * plane..(out_c + 1) * plane].fill(pad * a[out_c] + b[out_c]);
    }
    let rw = place.resized_width as i64;
    let rh = place.resized_height as i64;
    // The part of the canvas that the resized image covers.
    let x0 = place.left.max(0);
    let y0 = place.top.max(0);
    let x1 = (place.left + rw).min(cw as i64);
    let y1 = (place.top + rh).min(ch as i64);
    for y in y0..y1 {
        let src_row = ((y - place.top) * rw) as usize * 3;
        let dst_row = y as usize * cw;
        for x in x0..x1 {
            let src = src_row + (x - place.left) as usize * 3;
            let dst = dst_row + x as usize;
            for out_c in 0..3 {
                let value = resized[src + channels[out_c]] as f32;
                data[out_c * plane + dst] = value * a[out_c] + b[out_c];
            }
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn spec(resize: ResizePolicy, width: u32, height: u32) -> InputSpec {
        InputSpec {
            width,
            height,
            resize,
            resize_shorter: Some(256),
            max_side: Some(960),
            multiple: Some(32),
            pad_value: 114,
            scale: 1.0,
            mean: [0.0; 3],
            std: [1.0; 3],
            channel_order: ChannelOrder::Rgb,
            resize_filter: ResizeFilter::Bilinear,
            scaled_decode: true,
            pixel_datatype: Default::default(),
        }
    }

    #[test]
    fn opencv_linear_halves_by_averaging_pixel_pairs_as_cv2_does() {
        // cv2.resize(INTER_LINEAR) to half size samples at 2x + 0.5: the mean of pixels 2x and
        // 2x + 1. Pillow's antialiased bilinear spreads over four, so its answer differs.
        let row = [0u8, 100, 200, 40];
        let image = RgbImage::from_fn(4, 2, |x, _| Rgb([row[x as usize]; 3]));
        let linear = resize_rgb(&image, 2, 1, None, ResizeFilter::OpencvLinear).unwrap().unwrap();
        assert_eq!([linear[0], linear[3]], [50, 120]);
        let antialiased = resize_rgb(&image, 2, 1, None, ResizeFilter::Bilinear).unwrap().unwrap();
        assert_ne!([antialiased[0], antialiased[3]], [50, 120]);
    }

    #[test]
    fn shorter_side_then_centre_crop_matches_torchvision_arithmetic() {
        // 640×480: shorter side 480 → 256, long side int(256 * 640 / 480) = 341.
        let p = placement(&spec(ResizePolicy::ShorterSideCenterCrop, 224, 224), 640, 480);
        assert_eq!((p.resized_width, p.resized_height), (341, 256));
        // left = round((341 - 224) / 2) = round(58.5) = 58 (ties to even), top = 16.
        assert_eq!((p.left, p.top), (-58, -16));
    }

    #[test]
    fn extreme_aspect_ratios_resize_only_what_the_crop_keeps() {
        let mut img = RgbImage::from_pixel(10000, 3, Rgb([0, 0, 0]));
        // A white band in the middle third: the centre crop must see it.
        for x in 4000..6000 {
            for y in 0..3 {
                img.put_pixel(x, y, Rgb([255, 255, 255]));
            }
        }
        let mut s = spec(ResizePolicy::ShorterSideCenterCrop, 224, 224);
        s.resize_shorter = Some(256);
        let place = placement(&s, 10000, 3);
        assert!(u64::from(place.resized_width) * u64::from(place.resized_height) > FULL_RESIZE_MAX_PIXELS);
        let out = preprocess(&img, &s).unwrap();
        assert_eq!(out.data.len(), 3 * 224 * 224);
        assert!(out.data.iter().all(|v| (*v - 255.0).abs() < 1e-3), "the crop lies inside the white band");
        // The same arithmetic as the full resize for an ordinary image.
        let normal = placement(&s, 640, 480);
        let (visible, crop) = visible_part(&normal, 640, 480);
        assert_eq!((visible.resized_width, visible.resized_height), (224, 224));
        assert!((crop[0] - 58.0 * 640.0 / 341.0).abs() < 1e-9);
    }

    #[test]
    fn letterbox_centres_and_pads() {
        let p = placement(&spec(ResizePolicy::Letterbox, 640, 640), 1280, 720);
        assert_eq!((p.resized_width, p.resized_height), (640, 360));
        assert_eq!((p.left, p.top), (0, 140));
    }

    #[test]
    fn fit_multiple_rounds_each_side() {
        let p = placement(&spec(ResizePolicy::FitMultiple, 640, 640), 1000, 500);
        assert_eq!((p.resized_width, p.resized_height), (960, 480));
        let p = placement(&spec(ResizePolicy::FitMultiple, 640, 640), 10, 3);
        assert_eq!((p.resized_width, p.resized_height), (32, 32));
    }

    #[test]
    fn normalises_and_orders_channels() {
        let img = RgbImage::from_pixel(2, 2, Rgb([10, 20, 30]));
        let mut s = spec(ResizePolicy::Original, 2, 2);
        s.mean = [1.0, 2.0, 3.0];
        s.std = [2.0, 2.0, 2.0];
        let out = preprocess(&img, &s).unwrap();
        assert_eq!(out.data.len(), 12);
        assert_eq!(&out.data[0..4], &[4.5; 4]);
        assert_eq!(&out.data[8..12], &[13.5; 4]);
        s.channel_order = ChannelOrder::Bgr;
        let out = preprocess(&img, &s).unwrap();
        // First plane is blue now, normalised with the blue statistics.
        assert_eq!(out.data[0], (30.0 - 3.0) / 2.0);
    }

    #[test]
    fn letterbox_padding_gets_the_pad_value_and_geometry_maps_back() {
        let img = RgbImage::from_pixel(40, 20, Rgb([255, 255, 255]));
        let out = preprocess(&img, &spec(ResizePolicy::Letterbox, 32, 32)).unwrap();
        assert_eq!(out.data[0], 114.0); // top-left is padding
        assert_eq!(out.data[16 * 32 + 16], 255.0); // centre is image
        let g = out.geometry;
        assert_eq!((g.input_width, g.input_height), (32, 32));
        let (x, y) = g.to_original(32.0, 24.0);
        assert!((x - 40.0).abs() < 1e-4 && (y - 20.0).abs() < 1e-4, "{x} {y}");
        let (x, y) = g.to_original(0.0, 8.0);
        assert!(x.abs() < 1e-4 && y.abs() < 1e-4, "{x} {y}");
    }

    #[test]
    fn a_scaled_decode_needs_what_the_resize_step_makes() {
        let crop = spec(ResizePolicy::ShorterSideCenterCrop, 224, 224);
        // Twice what the resize makes: 341 × 256 for a 256 shorter side.
        assert_eq!(decode_size_needed(&crop, 4032, 3024), Some((682, 512)));
        assert_eq!(decode_size_needed(&spec(ResizePolicy::Stretch, 300, 300), 4032, 3024), Some((600, 600)));
        assert_eq!(decode_size_needed(&spec(ResizePolicy::Letterbox, 640, 640), 4032, 3024), Some((1280, 960)));
        assert_eq!(decode_size_needed(&spec(ResizePolicy::FitMultiple, 640, 640), 4032, 3024), Some((1920, 1472)));
        assert_eq!(decode_size_needed(&spec(ResizePolicy::Original, 640, 640), 4032, 3024), None);
        let off = InputSpec { scaled_decode: false, ..crop };
        assert_eq!(decode_size_needed(&off, 4032, 3024), None);
    }

    #[test]
    fn a_scaled_image_is_placed_and_mapped_as_its_original() {
        let spec = spec(ResizePolicy::ShorterSideCenterCrop, 224, 224);
        let full = RgbImage::from_pixel(1280, 960, Rgb([90, 90, 90]));
        let half = RgbImage::from_pixel(640, 480, Rgb([90, 90, 90]));
        let from_full = preprocess(&full, &spec).unwrap();
        let from_half = preprocess_decoded(&Decoded { image: half, original: (1280, 960) }, &spec).unwrap();
        assert_eq!(from_half.geometry, from_full.geometry);
        assert_eq!(from_half.data, from_full.data);
    }

    #[test]
    fn centre_crop_geometry_maps_input_centre_to_original_centre() {
        let img = RgbImage::from_pixel(640, 480, Rgb([0, 0, 0]));
        let out = preprocess(&img, &spec(ResizePolicy::ShorterSideCenterCrop, 224, 224)).unwrap();
        let (x, y) = out.geometry.to_original(112.0, 112.0);
        assert!((x - 320.0).abs() < 1.5 && (y - 240.0).abs() < 1.5, "{x} {y}");
    }
}
