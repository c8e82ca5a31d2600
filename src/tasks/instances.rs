//! Instance segmentation: each detection carries a binary mask. Masks travel as the region of
//! the image their pixels occupy (a 20-instance answer on a 12 MP photo would otherwise hold 20
//! full-size planes), are mapped back to the original image like label maps, and are encoded
//! per detection as COCO compressed RLE (pycocotools' bytes), outer polygons, or a PNG of the
//! region.

use base64::Engine as _;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, GrayImage, ImageEncoder};
use imageproc::contours::{find_contours, BorderType};
use imageproc::geometry::approximate_polygon_dp;
use imageproc::point::Point;
use serde::Serialize;

use super::detection::{self, Candidate, Detection};
use super::prototypes::{CoefficientCandidate, Prototypes};
use super::segmentation::compress_counts;
use crate::image::Geometry;

/// A binary mask cut to the rectangle its pixels occupy, on a canvas of known size. An empty
/// mask has a 0 × 0 region.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionMask {
    pub canvas_width: u32,
    pub canvas_height: u32,
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
    /// 0 or 1 per region pixel, row-major.
    pub bits: Vec<u8>,
}

impl RegionMask {
    pub fn empty(canvas_width: u32, canvas_height: u32) -> Self {
        RegionMask { canvas_width, canvas_height, left: 0, top: 0, width: 0, height: 0, bits: Vec::new() }
    }

    /// Whether canvas pixel (x, y) is set.
    pub fn contains(&self, x: u32, y: u32) -> bool {
        x >= self.left
            && y >= self.top
            && x < self.left + self.width
            && y < self.top + self.height
            && self.bits[((y - self.top) * self.width + (x - self.left)) as usize] != 0
    }

    pub fn area(&self) -> u64 {
        self.bits.iter().map(|&b| u64::from(b)).sum()
    }

    /// The same mask cut to the rows and columns that hold a set pixel.
    pub fn tightened(self) -> Self {
        let (w, h) = (self.width as usize, self.height as usize);
        let rows: Vec<bool> = (0..h).map(|y| self.bits[y * w..(y + 1) * w].iter().any(|&b| b != 0)).collect();
        let cols: Vec<bool> = (0..w).map(|x| (0..h).any(|y| self.bits[y * w + x] != 0)).collect();
        let (Some(y0), Some(y1)) = (rows.iter().position(|&r| r), rows.iter().rposition(|&r| r)) else {
            return RegionMask::empty(self.canvas_width, self.canvas_height);
        };
        let x0 = cols.iter().position(|&c| c).expect("a set row has a set column");
        let x1 = cols.iter().rposition(|&c| c).expect("a set row has a set column");
        let bits = (y0..=y1).flat_map(|y| self.bits[y * w + x0..=y * w + x1].iter().copied()).collect();
        RegionMask {
            left: self.left + x0 as u32,
            top: self.top + y0 as u32,
            width: (x1 - x0 + 1) as u32,
            height: (y1 - y0 + 1) as u32,
            bits,
            ..self
        }
    }

    /// The same mask on a larger canvas (`canvas_width × canvas_height`), its region moved
    /// right by `dx` and down by `dy`: a tile's mask in its photo's pixels.
    pub fn moved(self, dx: u32, dy: u32, canvas_width: u32, canvas_height: u32) -> Self {
        if self.width == 0 {
            return RegionMask::empty(canvas_width, canvas_height);
        }
        RegionMask { canvas_width, canvas_height, left: self.left + dx, top: self.top + dy, ..self }
    }

    /// The pixels set in either mask (of one canvas), on the region that holds both.
    pub fn union(&self, other: &RegionMask) -> Self {
        if other.width == 0 {
            return self.clone();
        }
        if self.width == 0 {
            return other.clone();
        }
        let (left, top) = (self.left.min(other.left), self.top.min(other.top));
        let right = (self.left + self.width).max(other.left + other.width);
        let bottom = (self.top + self.height).max(other.top + other.height);
        let (width, height) = (right - left, bottom - top);
        let mut bits = Vec::with_capacity((width * height) as usize);
        for y in top..bottom {
            for x in left..right {
                bits.push(u8::from(self.contains(x, y) || other.contains(x, y)));
            }
        }
        RegionMask { canvas_width: self.canvas_width, canvas_height: self.canvas_height, left, top, width, height, bits }
    }

    /// Onto the original image: each original pixel centre is mapped into model-input pixels
    /// and takes the bit found there (nearest neighbour, as label maps are resampled). Taken by
    /// value: torchvision's masks are already in original pixels and pass through uncopied.
    pub fn into_original(self, geometry: &Geometry) -> Self {
        let (ow, oh) = (geometry.original_width, geometry.original_height);
        if self.width == 0 {
            return RegionMask::empty(ow, oh);
        }
        let unchanged = (geometry.scale_x, geometry.scale_y, geometry.offset_x, geometry.offset_y) == (1.0, 1.0, 0.0, 0.0);
        if unchanged && (self.canvas_width, self.canvas_height) == (ow, oh) {
            return self;
        }
        // The region's corners in original pixels, grown by a pixel for rounding.
        let (x0, y0) = geometry.to_original(self.left as f32, self.top as f32);
        let (x1, y1) = geometry.to_original((self.left + self.width) as f32, (self.top + self.height) as f32);
        let clamp = |v: f32, size: u32| (v.max(0.0) as u32).min(size);
        let (left, top) = (clamp(x0.floor() - 1.0, ow), clamp(y0.floor() - 1.0, oh));
        let (right, bottom) = (clamp(x1.ceil() + 1.0, ow), clamp(y1.ceil() + 1.0, oh));
        let (width, height) = (right.saturating_sub(left), bottom.saturating_sub(top));
        // As segmentation's label maps: the pixel the centre falls in, edges clamped.
        let source = |coordinate: f32, size: u32| (coordinate.floor().max(0.0) as u32).min(size.saturating_sub(1));
        let mut bits = Vec::with_capacity((width * height) as usize);
        for y in top..bottom {
            let sy = source((y as f32 + 0.5) * geometry.scale_y + geometry.offset_y, self.canvas_height);
            for x in left..right {
                let sx = source((x as f32 + 0.5) * geometry.scale_x + geometry.offset_x, self.canvas_width);
                bits.push(u8::from(self.contains(sx, sy)));
            }
        }
        RegionMask { canvas_width: ow, canvas_height: oh, left, top, width, height, bits }.tightened()
    }
}

/// A candidate box with its mask, in model-input pixels, before suppression.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceCandidate {
    pub candidate: Candidate,
    pub mask: RegionMask,
}

/// One kept instance in original pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub detection: Detection,
    pub mask: RegionMask,
}

/// Threshold, class-aware NMS and the cap as for boxes, then boxes and masks in original pixels.
pub fn finish_instances(
    candidates: Vec<InstanceCandidate>,
    geometry: &Geometry,
    labels: &[String],
    score_threshold: f32,
    iou_threshold: f32,
    max_detections: usize,
) -> Vec<Instance> {
    let (boxes, masks): (Vec<Candidate>, Vec<RegionMask>) =
        candidates.into_iter().filter(|c| c.candidate.score >= score_threshold).map(|c| (c.candidate, c.mask)).unzip();
    // Each kept mask moved out once (nms_indices names every position at most once).
    let mut masks: Vec<Option<RegionMask>> = masks.into_iter().map(Some).collect();
    finish_with(&boxes, geometry, labels, iou_threshold, max_detections, |i| masks[i].take())
}

/// [`finish_instances`] for a `-seg` head's candidates: masks are made from the prototypes
/// for the kept boxes only, and a kept box whose mask sets no pixel is dropped, as
/// ultralytics' predictor drops it.
pub fn finish_prototype_instances(
    candidates: Vec<CoefficientCandidate>,
    prototypes: &Prototypes,
    geometry: &Geometry,
    labels: &[String],
    score_threshold: f32,
    iou_threshold: f32,
    max_detections: usize,
) -> Vec<Instance> {
    let candidates: Vec<CoefficientCandidate> = candidates.into_iter().filter(|c| c.candidate.score >= score_threshold).collect();
    let boxes: Vec<Candidate> = candidates.iter().map(|c| c.candidate).collect();
    finish_with(&boxes, geometry, labels, iou_threshold, max_detections, |i| {
        Some(prototypes.mask(&candidates[i].coefficients, &boxes[i], geometry.input_width, geometry.input_height))
            .filter(|mask| mask.width > 0)
    })
}

/// NMS over `boxes` (already thresholded), then each kept box with `mask_of(its position)`,
/// both in original pixels; a box `mask_of` has no mask for is dropped.
fn finish_with(
    boxes: &[Candidate],
    geometry: &Geometry,
    labels: &[String],
    iou_threshold: f32,
    max_detections: usize,
    mut mask_of: impl FnMut(usize) -> Option<RegionMask>,
) -> Vec<Instance> {
    let kept = detection::nms_indices(boxes, iou_threshold, max_detections);
    let kept_boxes: Vec<Candidate> = kept.iter().map(|&i| boxes[i]).collect();
    detection::to_detections(&kept_boxes, geometry, labels)
        .into_iter()
        .zip(&kept)
        .filter_map(|(detection, &i)| Some(Instance { detection, mask: mask_of(i)?.into_original(geometry) }))
        .collect()
}

/// Column-major run lengths of the mask on its whole canvas, starting with a run of zeros:
/// what `pycocotools.mask.encode` counts on a Fortran-ordered `H × W` array. Columns outside the
/// region are one run of zeros each, so the cost is the region's, not the canvas's.
pub fn run_lengths(mask: &RegionMask) -> Vec<u32> {
    let (width, height) = (mask.width as usize, mask.height as usize);
    // Where each region column changes value, found row by row (contiguous reads; walking
    // row-major bits down each column measured 3.8 ms for 20 masks of 250 × 300).
    let mut changes: Vec<Vec<u32>> = vec![Vec::new(); width];
    let blank = vec![0u8; width];
    let mut above: &[u8] = &blank;
    for (row, bits) in mask.bits.chunks_exact(width.max(1)).enumerate() {
        if bits != above {
            for (column, (now, before)) in bits.iter().zip(above).enumerate() {
                if now != before {
                    changes[column].push(row as u32);
                }
            }
        }
        above = bits;
    }
    let mut runs = Runs { counts: Vec::new(), current: false, run: 0 };
    let below = u64::from(mask.canvas_height - mask.top - mask.height);
    for x in 0..mask.canvas_width {
        if x < mask.left || x >= mask.left + mask.width {
            runs.add(false, u64::from(mask.canvas_height));
            continue;
        }
        runs.add(false, u64::from(mask.top));
        let (mut on, mut start) = (false, 0u32);
        for &row in &changes[(x - mask.left) as usize] {
            runs.add(on, u64::from(row - start));
            (on, start) = (!on, row);
        }
        runs.add(on, (height as u32 - start) as u64);
        runs.add(false, below);
    }
    runs.counts.push(runs.run as u32);
    runs.counts
}

/// The mask's COCO compressed RLE string (pycocotools' `counts`).
pub fn rle_counts(mask: &RegionMask) -> String {
    compress_counts(&run_lengths(mask))
}

/// Alternating runs being counted, zeros first.
struct Runs {
    counts: Vec<u32>,
    current: bool,
    run: u64,
}

impl Runs {
    fn add(&mut self, on: bool, length: u64) {
        if length == 0 {
            return;
        }
        if on != self.current {
            self.counts.push(self.run as u32);
            self.run = 0;
            self.current = on;
        }
        self.run += length;
    }
}

/// The outer contours of the mask of three points or more, each simplified (Douglas–Peucker,
/// tolerance raised until all of them together hold at most `max_points`; where many small
/// pieces still do not fit, the pieces with the most points that do), in the mask's canvas
/// pixels.
pub fn polygons(mask: &RegionMask, max_points: usize) -> Vec<Vec<[f32; 2]>> {
    if mask.width == 0 {
        return Vec::new();
    }
    // One pixel of background around the region, so contours touching its edge close.
    let mut padded = GrayImage::new(mask.width + 2, mask.height + 2);
    for y in 0..mask.height {
        for x in 0..mask.width {
            if mask.bits[(y * mask.width + x) as usize] != 0 {
                padded.put_pixel(x + 1, y + 1, image::Luma([255]));
            }
        }
    }
    // Specks of one or two pixels have contours of one or two points: COCO's polygon format
    // (and pycocotools' frPyObjects) needs three, so they are left out.
    let outer: Vec<Vec<Point<i32>>> = find_contours::<i32>(&padded)
        .into_iter()
        .filter(|c| c.border_type == BorderType::Outer && c.points.len() >= 3)
        .map(|c| c.points)
        .collect();
    let mut epsilon = 0.5;
    loop {
        let simplified: Vec<Vec<Point<i32>>> = outer
            .iter()
            .map(|points| approximate_polygon_dp(points, epsilon, true))
            .filter(|points| points.len() >= 3)
            .collect();
        let total: usize = simplified.iter().map(Vec::len).sum();
        if total <= max_points || epsilon > f64::from(mask.width.max(mask.height)) {
            // Still over (many small pieces): the pieces with the most points, while they fit.
            let mut pieces = simplified;
            pieces.sort_by_key(|p| std::cmp::Reverse(p.len()));
            let mut used = 0;
            pieces.retain(|p| {
                let fits = used + p.len() <= max_points;
                used += if fits { p.len() } else { 0 };
                fits
            });
            let (dx, dy) = (mask.left as f32 - 1.0, mask.top as f32 - 1.0);
            return pieces
                .into_iter()
                .map(|points| points.into_iter().map(|p| [p.x as f32 + dx, p.y as f32 + dy]).collect())
                .collect();
        }
        epsilon *= 2.0;
    }
}

/// The region as a single-channel PNG (255 where set), base64.
pub fn region_png(mask: &RegionMask) -> Result<String, image::ImageError> {
    let mut png = Vec::new();
    let pixels: Vec<u8> = mask.bits.iter().map(|&b| b * 255).collect();
    PngEncoder::new(&mut png).write_image(&pixels, mask.width, mask.height, ExtendedColorType::L8)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

/// Most polygon points per instance: enough for a person's outline, small on the wire.
pub const MAX_POLYGON_POINTS: usize = 200;

/// How an instance's mask is written in `/v1` answers (`mask_format`).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum EncodedInstanceMask {
    /// COCO compressed RLE over the whole image: `pycocotools.mask.decode` reads it back.
    Rle { size: [u32; 2], counts: String },
    /// Outer contours, `[[x, y], ...]` each, in original pixels.
    Polygon { polygons: Vec<Vec<[f32; 2]>> },
    /// The region's pixels as a PNG (255 set, 0 not), placed at `left`, `top`.
    Png { left: u32, top: u32, width: u32, height: u32, data: String },
}

/// One instance of a `/v1` answer: the detection's fields, its mask's area and its mask.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceResult {
    #[serde(flatten)]
    pub detection: Detection,
    /// Pixels set in the mask.
    pub area: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<EncodedInstanceMask>,
}

/// Which encoding `/v1` answers for instance masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceMaskFormat {
    Rle,
    Polygon,
    Png,
    None,
}

pub fn encode_instance(instance: &Instance, format: InstanceMaskFormat) -> Result<InstanceResult, image::ImageError> {
    let mask = &instance.mask;
    let encoded = match format {
        InstanceMaskFormat::Rle => Some(EncodedInstanceMask::Rle {
            size: [mask.canvas_height, mask.canvas_width],
            counts: rle_counts(mask),
        }),
        InstanceMaskFormat::Polygon => Some(EncodedInstanceMask::Polygon { polygons: polygons(mask, MAX_POLYGON_POINTS) }),
        InstanceMaskFormat::Png => Some(EncodedInstanceMask::Png {
            left: mask.left,
            top: mask.top,
            width: mask.width,
            height: mask.height,
            data: if mask.width == 0 { String::new() } else { region_png(mask)? },
        }),
        InstanceMaskFormat::None => None,
    };
    Ok(InstanceResult { detection: instance.detection.clone(), area: mask.area(), mask: encoded })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4 × 3 canvas with pixels (1, 0), (1, 1) and (2, 1) set.
    fn small() -> RegionMask {
        RegionMask { canvas_width: 4, canvas_height: 3, left: 1, top: 0, width: 2, height: 2, bits: vec![1, 0, 1, 1] }
    }

    #[test]
    fn run_lengths_count_the_whole_canvas_column_major() {
        // Columns: x=0 all off (3), x=1 on at y=0,1 then off, x=2 off, on at 1, off; x=3 off.
        assert_eq!(run_lengths(&small()), [3, 2, 2, 1, 4]);
        assert_eq!(run_lengths(&RegionMask::empty(4, 3)), [12]);
        let full = RegionMask { canvas_width: 2, canvas_height: 2, left: 0, top: 0, width: 2, height: 2, bits: vec![1; 4] };
        assert_eq!(run_lengths(&full), [0, 4]);
    }

    #[test]
    fn tightening_cuts_to_the_set_pixels_and_empty_stays_empty() {
        let loose = RegionMask { canvas_width: 5, canvas_height: 5, left: 1, top: 1, width: 3, height: 3, bits: vec![0, 0, 0, 0, 1, 1, 0, 0, 0] };
        let tight = loose.tightened();
        assert_eq!((tight.left, tight.top, tight.width, tight.height, tight.bits.clone()), (2, 2, 2, 1, vec![1, 1]));
        let none = RegionMask { bits: vec![0; 9], ..tight.clone() };
        assert_eq!(RegionMask { width: 3, height: 3, ..none }.tightened().width, 0);
    }

    #[test]
    fn masks_map_back_through_a_half_scale() {
        // The model saw the 8 × 6 image at 4 × 3.
        let geometry = Geometry { scale_x: 0.5, scale_y: 0.5, ..Geometry::identity(8, 6) };
        let original = small().into_original(&geometry);
        assert_eq!((original.canvas_width, original.canvas_height), (8, 6));
        assert_eq!((original.left, original.top, original.width, original.height), (2, 0, 4, 4));
        assert_eq!(original.area(), 12);
        assert!(original.contains(2, 0) && original.contains(5, 3) && !original.contains(4, 0));
    }

    #[test]
    fn a_square_polygon_and_a_png_region() {
        let square = RegionMask { canvas_width: 10, canvas_height: 10, left: 2, top: 3, width: 4, height: 4, bits: vec![1; 16] };
        let polygons = polygons(&square, 200);
        assert_eq!(polygons.len(), 1);
        let xs: Vec<f32> = polygons[0].iter().map(|p| p[0]).collect();
        let ys: Vec<f32> = polygons[0].iter().map(|p| p[1]).collect();
        assert_eq!((xs.iter().cloned().fold(f32::MAX, f32::min), xs.iter().cloned().fold(f32::MIN, f32::max)), (2.0, 5.0));
        assert_eq!((ys.iter().cloned().fold(f32::MAX, f32::min), ys.iter().cloned().fold(f32::MIN, f32::max)), (3.0, 6.0));
        assert!(polygons[0].len() <= 8, "{polygons:?}");
        let png = base64::engine::general_purpose::STANDARD.decode(region_png(&square).unwrap()).unwrap();
        let decoded = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!(decoded.dimensions(), (4, 4));
        assert!(decoded.pixels().all(|p| p.0[0] == 255));
    }

    #[test]
    fn polygons_stay_within_their_point_budget() {
        // A comb: many teeth, many contour points.
        let (w, h) = (120u32, 20u32);
        let bits: Vec<u8> = (0..w * h).map(|i| u8::from((i % w) % 4 < 2 || i / w > 15)).collect();
        let comb = RegionMask { canvas_width: w, canvas_height: h, left: 0, top: 0, width: w, height: h, bits };
        let total: usize = polygons(&comb, 40).iter().map(Vec::len).sum();
        assert!(total <= 40, "{total} points");
    }

    #[test]
    fn suppression_keeps_each_masks_own_instance() {
        let c = |x: f32, score: f32| Candidate { x1: x, y1: 0.0, x2: x + 2.0, y2: 2.0, score, class: 1 };
        let m = |left: u32| RegionMask { canvas_width: 10, canvas_height: 3, left, top: 0, width: 1, height: 1, bits: vec![1] };
        let candidates = vec![
            InstanceCandidate { candidate: c(0.0, 0.6), mask: m(0) },
            InstanceCandidate { candidate: c(0.1, 0.9), mask: m(1) },
            InstanceCandidate { candidate: c(6.0, 0.7), mask: m(6) },
            InstanceCandidate { candidate: c(8.0, 0.2), mask: m(8) },
        ];
        let kept = finish_instances(candidates, &Geometry::identity(10, 3), &[], 0.5, 0.5, 10);
        assert_eq!(kept.iter().map(|i| (i.detection.score, i.mask.left)).collect::<Vec<_>>(), [(0.9, 1), (0.7, 6)]);
    }

    #[test]
    fn prototype_instances_get_masks_after_suppression_and_empty_ones_are_dropped() {
        let planes = Prototypes { channels: 1, width: 4, height: 4, values: vec![1.0; 16], cut: 0.0 };
        let c = |x: f32, score: f32, weight: f32| CoefficientCandidate {
            candidate: Candidate { x1: x, y1: 0.0, x2: x + 4.0, y2: 4.0, score, class: 0 },
            coefficients: vec![weight],
        };
        let candidates = vec![
            c(0.0, 0.9, 1.0),
            c(0.5, 0.8, 1.0),  // suppressed by the first
            c(8.0, 0.7, -1.0), // kept by NMS, but its mask sets nothing: dropped
            c(12.0, 0.6, 1.0),
        ];
        let kept = finish_prototype_instances(candidates, &planes, &Geometry::identity(16, 16), &[], 0.5, 0.5, 10);
        assert_eq!(kept.iter().map(|i| (i.detection.score, i.mask.left, i.mask.area())).collect::<Vec<_>>(), [(0.9, 0, 16), (0.6, 12, 16)]);
    }
}
