//! Instance masks from prototypes, as ultralytics' `-seg` heads make them: each detection
//! carries coefficients over a few prototype planes at a quarter of the input's resolution; its
//! mask is their weighted sum, upsampled bilinearly to the input, cut at zero and cropped to its
//! box (ultralytics' `process_mask`, the predictor's default). Masks are made only for the
//! detections NMS keeps, and only over the pixels of their box.

use super::detection::Candidate;
use super::instances::RegionMask;

/// One image's prototype planes `[channels, height, width]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Prototypes {
    pub channels: usize,
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
    /// Mask logits above this are the instance's: the config's probability threshold as a logit
    /// (0 for ultralytics' 0.5).
    pub cut: f32,
}

/// A candidate box with its mask coefficients, in model-input pixels, before suppression.
#[derive(Debug, Clone, PartialEq)]
pub struct CoefficientCandidate {
    pub candidate: Candidate,
    pub coefficients: Vec<f32>,
}

/// The logit of a probability threshold.
pub fn logit(probability: f32) -> f32 {
    (probability / (1.0 - probability)).ln()
}

/// PyTorch's bilinear taps from `input` cells to `output` pixels (`align_corners=False`, the
/// output size given): for each output pixel its lower cell, its upper cell and the upper's
/// weight, computed as `upsample_bilinear2d`'s CPU kernel does, in `f32`.
fn taps(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let source = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let lower = (source.floor() as usize).min(input - 1);
            let upper = if lower < input - 1 { lower + 1 } else { lower };
            (lower, upper, (source - lower as f32).clamp(0.0, 1.0))
        })
        .collect()
}

/// The pixels `[lower, upper)` of a box's edges keeps on an axis of `size` pixels, as
/// ultralytics' `crop_mask` keeps pixel `i` where `lower <= i < upper`: first and last.
fn kept_pixels(lower: f32, upper: f32, size: usize) -> Option<(usize, usize)> {
    let first = lower.ceil().max(0.0) as usize;
    let past = (upper.ceil().max(0.0) as usize).min(size);
    (first < past).then(|| (first, past - 1))
}

impl Prototypes {
    /// The mask of the detection `candidate` with `coefficients` on the `input_width ×
    /// input_height` canvas the model saw, cut to the pixels it sets. As ultralytics 8.4's
    /// `process_mask(..., upsample=True)`: the logit plane upsampled bilinearly
    /// (`align_corners=False`), cut, then cropped to the box; computed only over the box.
    pub fn mask(&self, coefficients: &[f32], candidate: &Candidate, input_width: u32, input_height: u32) -> RegionMask {
        let (width, height) = (input_width as usize, input_height as usize);
        let empty = RegionMask::empty(input_width, input_height);
        if coefficients.len() != self.channels || self.width == 0 || self.height == 0 || width == 0 || height == 0 {
            return empty;
        }
        let (Some((x0, x1)), Some((y0, y1))) =
            (kept_pixels(candidate.x1, candidate.x2, width), kept_pixels(candidate.y1, candidate.y2, height))
        else {
            return empty;
        };
        let (across, down) = (taps(self.width, width), taps(self.height, height));
        // The cells the box's pixels read: the weighted sum over them only.
        let (c0, c1, r0, r1) = (across[x0].0, across[x1].1, down[y0].0, down[y1].1);
        let (cells_wide, plane) = (c1 - c0 + 1, self.width * self.height);
        let mut logits = vec![0f32; cells_wide * (r1 - r0 + 1)];
        for (k, &weight) in coefficients.iter().enumerate() {
            let channel = &self.values[k * plane..(k + 1) * plane];
            for (r, row) in (r0..=r1).zip(logits.chunks_exact_mut(cells_wide)) {
                for (value, &cell) in row.iter_mut().zip(&channel[r * self.width + c0..=r * self.width + c1]) {
                    *value += weight * cell;
                }
            }
        }
        let cell = |r: usize, c: usize| logits[(r - r0) * cells_wide + (c - c0)];
        let mut bits = Vec::with_capacity((x1 - x0 + 1) * (y1 - y0 + 1));
        for &(top, bottom, v) in &down[y0..=y1] {
            for &(left, right, u) in &across[x0..=x1] {
                let value = (1.0 - v) * ((1.0 - u) * cell(top, left) + u * cell(top, right))
                    + v * ((1.0 - u) * cell(bottom, left) + u * cell(bottom, right));
                bits.push(u8::from(value > self.cut));
            }
        }
        RegionMask {
            canvas_width: input_width,
            canvas_height: input_height,
            left: x0 as u32,
            top: y0 as u32,
            width: (x1 - x0 + 1) as u32,
            height: (y1 - y0 + 1) as u32,
            bits,
        }
        .tightened()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(x1: f32, y1: f32, x2: f32, y2: f32) -> Candidate {
        Candidate { x1, y1, x2, y2, score: 0.9, class: 0 }
    }

    /// One channel of 4 × 4 cells, all alike: the mask is the whole box or nothing.
    fn uniform(value: f32) -> Prototypes {
        Prototypes { channels: 1, width: 4, height: 4, values: vec![value; 16], cut: 0.0 }
    }

    #[test]
    fn taps_match_pytorchs_half_pixel_rule() {
        // 2 cells to 8 pixels: sources -0.375 and -0.125 (clamped to 0), 0.125, ... 1.375; past
        // the last cell both taps are it. Interpolating [0, 1] gives PyTorch's
        // 0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1.
        let t = taps(2, 8);
        let blended: Vec<f32> = t.iter().map(|&(lower, upper, w)| (1.0 - w) * lower as f32 + w * upper as f32).collect();
        assert_eq!(blended, [0.0, 0.0, 0.125, 0.375, 0.625, 0.875, 1.0, 1.0]);
        assert_eq!((t[1], t[6].0, t[6].1), ((0, 1, 0.0), 1, 1));
    }

    #[test]
    fn the_mask_is_the_box_where_the_logits_pass_the_cut() {
        // Pixel i is kept where x1 <= i < x2: 4.2..12 keeps pixels 5..=11.
        let mask = uniform(1.0).mask(&[1.0], &boxed(4.2, 4.0, 12.0, 12.5), 16, 16);
        assert_eq!((mask.left, mask.top, mask.width, mask.height), (5, 4, 7, 9));
        assert_eq!(mask.area(), 7 * 9);
        // A negative coefficient puts every logit below the cut: nothing is set.
        assert_eq!(uniform(1.0).mask(&[-1.0], &boxed(4.0, 4.0, 12.0, 12.0), 16, 16).width, 0);
    }

    #[test]
    fn boxes_outside_or_between_pixels_give_empty_masks() {
        assert_eq!(uniform(1.0).mask(&[1.0], &boxed(4.5, 4.5, 4.9, 4.9), 16, 16).width, 0);
        assert_eq!(uniform(1.0).mask(&[1.0], &boxed(-30.0, -30.0, -20.0, -20.0), 16, 16).width, 0);
        // Past the canvas is cut to it.
        assert_eq!(uniform(1.0).mask(&[1.0], &boxed(10.0, 10.0, 99.0, 99.0), 16, 16).area(), 36);
        // Coefficients of the wrong length are no mask rather than a panic.
        assert_eq!(uniform(1.0).mask(&[1.0, 2.0], &boxed(0.0, 0.0, 16.0, 16.0), 16, 16).width, 0);
    }

    #[test]
    fn channels_are_weighted_and_summed() {
        // Channel 0 positive on the left half, channel 1 positive on the right half.
        let mut values = vec![0f32; 32];
        for r in 0..4 {
            for c in 0..4 {
                values[r * 4 + c] = if c < 2 { 1.0 } else { -1.0 };
                values[16 + r * 4 + c] = if c < 2 { -1.0 } else { 1.0 };
            }
        }
        let planes = Prototypes { channels: 2, width: 4, height: 4, values, cut: 0.0 };
        let whole = boxed(0.0, 0.0, 16.0, 16.0);
        let left = planes.mask(&[1.0, 0.0], &whole, 16, 16);
        let right = planes.mask(&[0.0, 2.0], &whole, 16, 16);
        assert!(left.contains(1, 5) && !left.contains(14, 5));
        assert!(right.contains(14, 5) && !right.contains(1, 5));
        // Left and right halves split at the middle, where the blend crosses zero.
        assert_eq!(left.area() + right.area(), 16 * 16);
    }

    #[test]
    fn the_cut_is_the_thresholds_logit() {
        assert_eq!(logit(0.5), 0.0);
        assert!((logit(0.9) - 9f32.ln()).abs() < 1e-6);
        let strict = Prototypes { cut: logit(0.9), ..uniform(1.0) };
        // sigmoid(1) = 0.73 < 0.9: nothing passes.
        assert_eq!(strict.mask(&[1.0], &boxed(0.0, 0.0, 16.0, 16.0), 16, 16).width, 0);
    }
}
