//! Segmentation: a class-index map at model-input resolution, resampled onto the original
//! image, summarised per class, and encoded as a PNG or as COCO run-length encoding.

use base64::Engine as _;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use serde::{Deserialize, Serialize};

use super::label_for;
use crate::image::Geometry;

/// Class indices, row-major, `width × height`.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMap {
    pub width: u32,
    pub height: u32,
    pub labels: Vec<u8>,
    /// The probability of each pixel's class, when asked for (TorchServe's segmenter answer
    /// needs it); empty otherwise.
    pub confidence: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MaskFormat {
    #[default]
    Png,
    Rle,
    None,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassSummary {
    pub index: usize,
    pub label: String,
    pub pixels: u64,
    pub fraction: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RleEntry {
    pub index: usize,
    pub label: String,
    /// `[height, width]`, as pycocotools writes it.
    pub size: [u32; 2],
    /// pycocotools' compressed string form of the column-major run lengths.
    pub counts: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum EncodedMask {
    /// A single-channel PNG of class indices, base64.
    Png { width: u32, height: u32, data: String },
    /// One COCO RLE per class present.
    Rle { size: [u32; 2], classes: Vec<RleEntry> },
}

#[derive(Debug, Clone, Serialize)]
pub struct SegmentationResult {
    pub width: u32,
    pub height: u32,
    pub classes: Vec<ClassSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<EncodedMask>,
}

/// Nearest-neighbour resampling of the model's label map onto the original image: each
/// original pixel centre is mapped into model-input pixels and takes the label found there.
pub fn resample_to_original(map: &LabelMap, geometry: &Geometry) -> LabelMap {
    let (w, h) = (geometry.original_width, geometry.original_height);
    let column_source: Vec<usize> = (0..w)
        .map(|x| source_index((x as f32 + 0.5) * geometry.scale_x + geometry.offset_x, map.width))
        .collect();
    let mut labels = Vec::with_capacity(w as usize * h as usize);
    let mut confidence = Vec::with_capacity(if map.confidence.is_empty() { 0 } else { labels.capacity() });
    for y in 0..h {
        let sy = source_index((y as f32 + 0.5) * geometry.scale_y + geometry.offset_y, map.height);
        let start = sy * map.width as usize;
        let row = &map.labels[start..start + map.width as usize];
        labels.extend(column_source.iter().map(|&sx| row[sx]));
        if !map.confidence.is_empty() {
            let row = &map.confidence[start..start + map.width as usize];
            confidence.extend(column_source.iter().map(|&sx| row[sx]));
        }
    }
    LabelMap { width: w, height: h, labels, confidence }
}

fn source_index(coordinate: f32, size: u32) -> usize {
    (coordinate.floor().max(0.0) as usize).min(size as usize - 1)
}

/// Pixel count and fraction of each class present, by class index.
pub fn summarise(map: &LabelMap, labels: &[String]) -> Vec<ClassSummary> {
    let mut counts = [0u64; 256];
    for &l in &map.labels {
        counts[l as usize] += 1;
    }
    let total = map.labels.len().max(1) as f64;
    counts
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(index, &pixels)| ClassSummary {
            index,
            label: label_for(labels, index),
            pixels,
            fraction: pixels as f64 / total,
        })
        .collect()
}

pub fn encode_png(map: &LabelMap) -> Result<String, image::ImageError> {
    let mut png = Vec::new();
    PngEncoder::new(&mut png).write_image(&map.labels, map.width, map.height, ExtendedColorType::L8)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

/// Column-major run lengths of `class`'s binary mask, starting with a run of zeros.
pub fn run_lengths(map: &LabelMap, class: u8) -> Vec<u32> {
    let (w, h) = (map.width as usize, map.height as usize);
    let mut counts = Vec::new();
    let mut current = false;
    let mut run = 0u32;
    for x in 0..w {
        for y in 0..h {
            let on = map.labels[y * w + x] == class;
            if on != current {
                counts.push(run);
                run = 0;
                current = on;
            }
            run += 1;
        }
    }
    counts.push(run);
    counts
}

/// pycocotools' `rleToString`: each count (a delta from the count two before, after the
/// second) in 5-bit groups, with a continuation bit, offset into printable ASCII.
pub fn compress_counts(counts: &[u32]) -> String {
    let mut out = String::new();
    for (i, &count) in counts.iter().enumerate() {
        let mut x = count as i64;
        if i > 2 {
            x -= counts[i - 2] as i64;
        }
        loop {
            let mut c = (x & 0x1f) as u8;
            x >>= 5;
            let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            out.push((c + 48) as char);
            if !more {
                break;
            }
        }
    }
    out
}

pub fn encode_rle(map: &LabelMap, summary: &[ClassSummary]) -> EncodedMask {
    let size = [map.height, map.width];
    let classes = summary
        .iter()
        .map(|class| RleEntry {
            index: class.index,
            label: class.label.clone(),
            size,
            counts: compress_counts(&run_lengths(map, class.index as u8)),
        })
        .collect();
    EncodedMask::Rle { size, classes }
}

/// The whole `/v1` segmentation answer for one image, from its mask at original size.
pub fn encode_result(map: &LabelMap, labels: &[String], format: MaskFormat) -> Result<SegmentationResult, image::ImageError> {
    let classes = summarise(map, labels);
    let mask = match format {
        MaskFormat::Png => Some(EncodedMask::Png { width: map.width, height: map.height, data: encode_png(map)? }),
        MaskFormat::Rle => Some(encode_rle(map, &classes)),
        MaskFormat::None => None,
    };
    Ok(SegmentationResult { width: map.width, height: map.height, classes, mask })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_lengths_are_column_major_and_start_with_zeros() {
        // 2 rows × 3 columns:
        // 1 0 0
        // 1 1 0
        let map = LabelMap { width: 3, height: 2, labels: vec![1, 0, 0, 1, 1, 0], confidence: vec![] };
        // Column-major: 1 1 | 0 1 | 0 0 → runs: 0 zeros, 2 ones, 1 zero, 1 one, 2 zeros.
        assert_eq!(run_lengths(&map, 1), vec![0, 2, 1, 1, 2]);
        assert_eq!(run_lengths(&map, 0), vec![2, 1, 1, 2]);
    }

    #[test]
    fn compressed_counts_match_pycocotools() {
        // Values checked against pycocotools.mask.encode.
        assert_eq!(compress_counts(&[0, 2, 1, 1, 2]), "021O1");
        // A long run needs several 5-bit groups; deltas from two before may be negative.
        assert_eq!(compress_counts(&[100, 5, 3]), "T353");
        assert_eq!(compress_counts(&[1, 1, 1, 50, 2]), "111a11");
    }

    #[test]
    fn resamples_a_half_scale_map_onto_the_original() {
        let small = LabelMap { width: 2, height: 1, labels: vec![3, 7], confidence: vec![] };
        let g = Geometry { scale_x: 0.5, scale_y: 0.5, ..Geometry::identity(4, 2) };
        let big = resample_to_original(&small, &g);
        assert_eq!(big.labels, vec![3, 3, 7, 7, 3, 3, 7, 7]);
    }

    #[test]
    fn summary_counts_each_class_and_png_round_trips() {
        let map = LabelMap { width: 2, height: 2, labels: vec![0, 1, 1, 1], confidence: vec![] };
        let summary = summarise(&map, &["background".into(), "text".into()]);
        assert_eq!(summary.len(), 2);
        assert_eq!(summary[1].label, "text");
        assert_eq!(summary[1].pixels, 3);
        assert!((summary[1].fraction - 0.75).abs() < 1e-12);
        let png = base64::engine::general_purpose::STANDARD.decode(encode_png(&map).unwrap()).unwrap();
        let decoded = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!(decoded.into_raw(), vec![0, 1, 1, 1]);
    }
}
