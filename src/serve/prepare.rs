//! A request's images, as every protocol hands them to the core, and their way to model
//! inputs: decoding (scaled where the model needs less than the file holds), preprocessing,
//! and what tells them apart for the response cache. CPU work: it runs on the CPU pool.

use axum::body::Bytes;
use base64::Engine as _;
use image::RgbImage;

use crate::error::ApiError;
use crate::image::{decode_image, decode_scaled, decode_size_needed, preprocess_decoded, DecodeLimits, Geometry, PreparedImage};
use crate::metrics as m;
use crate::model_config::{InputSpec, ModelConfig, ResizePolicy};
use crate::tasks::slicing::{self, Slicing, Tile};

/// A request's images, in order, in the form its protocol carried them.
pub enum ImageInput {
    /// Encoded files (JPEG, PNG, WebP, ...): /v1 uploads, V2 and gRPC `BYTES`, TorchServe bodies.
    Encoded(Vec<Bytes>),
    /// RGB pixels already decoded (V2 and gRPC `UINT8 [N, H, W, 3]`).
    Pixels(PixelBatch),
    /// Model inputs already preprocessed (V2 and gRPC `FP32 [N, 3, H, W]`).
    Preprocessed(TensorBatch),
}

/// `count` RGB images of one size, row-major, three bytes a pixel.
pub struct PixelBatch {
    /// Shared, so the cache's identities are slices of it, not copies.
    pub data: Bytes,
    pub count: usize,
    pub width: u32,
    pub height: u32,
}

/// `count` preprocessed images of one size, each `[3, height, width]`.
pub struct TensorBatch {
    pub data: Vec<f32>,
    pub count: usize,
    pub width: u32,
    pub height: u32,
}

/// A request's images as the response cache tells them apart: per image, the bytes that decide
/// its result (the encoded file; or the pixels with their shape).
pub type ImageIdentities = Vec<Vec<Bytes>>;

impl ImageInput {
    /// What the cache keys each image by; `None` for preprocessed tensors, which it does not
    /// keep. Asked only when the cache is on.
    pub fn identities(&self) -> Option<ImageIdentities> {
        match self {
            ImageInput::Encoded(images) => Some(images.iter().map(|image| vec![image.clone()]).collect()),
            ImageInput::Pixels(batch) => {
                let plane = batch.width as usize * batch.height as usize * 3;
                let shape = Bytes::from([i64::from(batch.height).to_le_bytes(), i64::from(batch.width).to_le_bytes()].concat());
                Some((0..batch.count).map(|i| vec![shape.clone(), batch.data.slice(i * plane..(i + 1) * plane)]).collect())
            }
            ImageInput::Preprocessed(_) => None,
        }
    }
}

impl PixelBatch {
    /// The batch as RGB images.
    pub fn images(self) -> Result<Vec<RgbImage>, ApiError> {
        let plane = self.width as usize * self.height as usize * 3;
        (0..self.count)
            .map(|i| {
                let pixels = self.data[i * plane..(i + 1) * plane].to_vec();
                RgbImage::from_raw(self.width, self.height, pixels).ok_or_else(|| ApiError::BadRequest("pixel count mismatch".into()))
            })
            .collect()
    }
}

/// Every image as the model takes it, and the first decoded image when `keep_original` (an
/// overlay is drawn on it). A JPEG larger than the model needs is decoded at a reduced scale,
/// except when an overlay is drawn (it is drawn on the full image).
pub fn prepare(
    input: ImageInput,
    config: &ModelConfig,
    limits: DecodeLimits,
    keep_original: bool,
) -> Result<(Vec<PreparedImage>, Option<RgbImage>), ApiError> {
    match input {
        ImageInput::Encoded(images) => prepare_encoded(&images, config, limits, keep_original),
        ImageInput::Pixels(batch) => Ok((preprocess_images(&batch.images()?, &config.input)?, None)),
        ImageInput::Preprocessed(batch) => Ok((preprocessed(batch, config)?, None)),
    }
}

/// Every image decoded whole, at full resolution (a pipeline cuts its crops from them).
/// Preprocessed tensors fit no two models, so a pipeline does not take them.
pub fn decode_whole(input: ImageInput, limits: DecodeLimits) -> Result<Vec<RgbImage>, ApiError> {
    match input {
        ImageInput::Encoded(images) => images
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let which = if images.len() > 1 { format!("image {i}: ") } else { String::new() };
                tracing::info_span!("decode", bytes = bytes.len())
                    .in_scope(|| decode_image(bytes, limits))
                    .map_err(|e| ApiError::InvalidImage(format!("{which}{e}")))
            })
            .collect(),
        ImageInput::Pixels(batch) => batch.images(),
        ImageInput::Preprocessed(_) => Err(ApiError::BadRequest("a pipeline takes encoded images or RGB pixels".into())),
    }
}

fn prepare_encoded(
    images: &[Bytes],
    config: &ModelConfig,
    limits: DecodeLimits,
    keep_original: bool,
) -> Result<(Vec<PreparedImage>, Option<RgbImage>), ApiError> {
    let mut prepared = Vec::with_capacity(images.len());
    let mut original = None;
    for (i, bytes) in images.iter().enumerate() {
        let which = if images.len() > 1 { format!("image {i}: ") } else { String::new() };
        let needed = |w, h| if keep_original { None } else { decode_size_needed(&config.input, w, h) };
        let span = tracing::info_span!("decode", bytes = bytes.len(), width = tracing::field::Empty, height = tracing::field::Empty);
        let decoded = span
            .in_scope(|| decode_scaled(bytes, limits, needed))
            .map_err(|e| ApiError::InvalidImage(format!("{which}{e}")))?;
        span.record("width", i64::from(decoded.original.0)).record("height", i64::from(decoded.original.1));
        drop(span);
        if decoded.is_scaled() {
            metrics::counter!(m::SCALED_DECODES, "scale" => decoded.scale_name()).increment(1);
        }
        let preprocessed = tracing::info_span!("preprocess").in_scope(|| preprocess_decoded(&decoded, &config.input));
        prepared.push(preprocessed.map_err(|e| ApiError::Internal(format!("{which}{e}")))?);
        if keep_original && original.is_none() {
            original = Some(decoded.image);
        }
    }
    Ok((prepared, original))
}

/// Every image cut into the tiles `slicing` asks for, each tile prepared as an image of its own
/// (the whole photo last, as one more tile, with `full_image`), from one full-resolution decode
/// of each photo; with the tiles of each image, in order, and the first decoded image when
/// `keep_original`. A photo that would make more than [`slicing::MAX_TILES`] tiles is refused.
pub fn prepare_sliced(
    input: ImageInput,
    config: &ModelConfig,
    limits: DecodeLimits,
    keep_original: bool,
    slicing: &Slicing,
) -> Result<(Vec<PreparedImage>, Vec<Vec<Tile>>, Option<RgbImage>), ApiError> {
    if matches!(input, ImageInput::Preprocessed(_)) {
        return Err(ApiError::BadRequest("'slice' cuts tiles from the photo: send an encoded image or RGB pixels, not preprocessed FP32 tensors".into()));
    }
    let images = decode_whole(input, limits)?;
    let (prepared, layout) = slice_decoded(&images, config, slicing)?;
    let original = if keep_original { images.into_iter().next() } else { None };
    Ok((prepared, layout, original))
}

/// Decoded images (a request's, a pipeline's) cut into their tiles and each tile prepared for
/// the model, with the tiles of each image in order: [`prepare_sliced`] past the decode.
pub fn slice_decoded(images: &[RgbImage], config: &ModelConfig, slicing: &Slicing) -> Result<(Vec<PreparedImage>, Vec<Vec<Tile>>), ApiError> {
    let fixed_input = !matches!(config.input.resize, ResizePolicy::Original | ResizePolicy::FitMultiple);
    let (tile_width, tile_height) = slicing.tile.resolve(config.input.width, config.input.height, fixed_input);
    let mut prepared = Vec::new();
    let mut layout = Vec::with_capacity(images.len());
    for (i, image) in images.iter().enumerate() {
        let (width, height) = image.dimensions();
        let count = slicing::tile_count(width, height, tile_width, tile_height, slicing.overlap);
        if count > slicing::MAX_TILES {
            return Err(ApiError::BadRequest(format!(
                "image {i}: {width}×{height} in tiles of {tile_width}×{tile_height} is {count} tiles, over the {} a request may cut; use larger tiles",
                slicing::MAX_TILES
            )));
        }
        let whole = Tile { x: 0, y: 0, width, height };
        let mut cut = slicing::tiles(width, height, tile_width, tile_height, slicing.overlap);
        if slicing.full_image && cut != [whole] {
            cut.push(whole);
        }
        let _span = tracing::info_span!("preprocess", tiles = cut.len()).entered();
        for tile in &cut {
            let one = if *tile == whole {
                crate::image::preprocess(image, &config.input)
            } else {
                let crop = image::imageops::crop_imm(image, tile.x, tile.y, tile.width, tile.height).to_image();
                crate::image::preprocess(&crop, &config.input)
            };
            prepared.push(one.map_err(|e| ApiError::Internal(format!("image {i}: {e}")))?);
        }
        layout.push(cut);
    }
    Ok((prepared, layout))
}

/// Already-decoded RGB images (pixels, a pipeline's images and crops) through a model's
/// preprocessing; a failure there is the server's, not the client's.
pub fn preprocess_images(images: &[RgbImage], spec: &InputSpec) -> Result<Vec<PreparedImage>, ApiError> {
    images
        .iter()
        .map(|image| crate::image::preprocess(image, spec).map_err(|e| ApiError::Internal(e.to_string())))
        .collect()
}

/// Preprocessed tensors, once their size is the model's (a model that resizes to a fixed
/// size takes only that size).
fn preprocessed(batch: TensorBatch, config: &ModelConfig) -> Result<Vec<PreparedImage>, ApiError> {
    let TensorBatch { data, count, width: w, height: h } = batch;
    let fixed = !matches!(config.input.resize, ResizePolicy::Original | ResizePolicy::FitMultiple);
    if fixed && (w, h) != (config.input.width, config.input.height) {
        return Err(ApiError::BadRequest(format!("FP32 input must be {}×{} for this model, got {w}×{h}", config.input.width, config.input.height)));
    }
    let plane = 3 * h as usize * w as usize;
    Ok((0..count).map(|i| PreparedImage { data: data[i * plane..(i + 1) * plane].to_vec(), geometry: Geometry::identity(w, h) }).collect())
}

/// Standard base64, with or without padding, optionally as a `data:` URL.
pub fn decode_base64(text: &str) -> Result<Bytes, base64::DecodeError> {
    let payload = match text.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => text,
    };
    let cleaned: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(cleaned).map(Bytes::from)
}
