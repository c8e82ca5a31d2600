//! Sliced detection (SAHI): a big photo cut into overlapping tiles, each tile detected at the
//! model's own scale, the tiles' boxes (and instance masks) moved into the photo's pixels and
//! merged. Small objects
//! that vanish when a 12 MP photo is shrunk to 300 × 300 keep their pixels in a tile.
//!
//! The tiling and both merges follow `sahi` 0.12 (`slicing.get_slice_bboxes`,
//! `postprocess.combine`), so a user moving from a client-side SAHI loop gets the same boxes;
//! `tests/python/test_sliced.py` holds the server to `sahi`'s own merge.

use super::detection::{BoundingBox, Detection};
use super::instances::{Instance, RegionMask};

/// What a request asks of slicing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slicing {
    pub tile: TileSize,
    /// The fraction of a tile its neighbour overlaps, per axis (SAHI's `overlap_*_ratio`).
    pub overlap: f64,
    pub merge: Merge,
    pub metric: MatchMetric,
    /// Two boxes of one class match when their metric is at least this.
    pub match_threshold: f32,
    /// Also detect on the whole photo and merge its boxes in (SAHI's `perform_standard_pred`).
    pub full_image: bool,
}

impl Default for Slicing {
    /// SAHI's defaults for `get_sliced_prediction`, but for `full_image`: SAHI runs the whole
    /// image too unless told not to; here that extra forward is asked for.
    fn default() -> Self {
        Slicing { tile: TileSize::Auto, overlap: 0.2, merge: Merge::Nmm, metric: MatchMetric::Ios, match_threshold: 0.5, full_image: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileSize {
    /// The model's own input size (for a model fed at its own size, 640 × 640).
    Auto,
    Fixed { width: u32, height: u32 },
}

/// The side of an `auto` tile for a model with no fixed input size (torchvision detectors,
/// which resize inside): the size most detectors are trained at.
const AUTO_SIDE: u32 = 640;
/// Tiles smaller than this find nothing a detector can use; larger than the decode limit, no
/// photo needs slicing.
pub const TILE_SIDE: (u32, u32) = (32, 8192);
pub const OVERLAP: (f64, f64) = (0.0, 0.9);
/// Past this many tiles an image is refused, not queued: 1,024 tiles of 640² is a 400 MP photo.
pub const MAX_TILES: usize = 1024;

/// How the tiles' boxes become one list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Keep the best box of each matching group, drop the rest (SAHI's `NMS`).
    Nms,
    /// Greedy non-maximum merging (SAHI's `GREEDYNMM`): the best box of each group grows to
    /// the union of the boxes that match it, so an object cut by a tile edge is one box again.
    Nmm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchMetric {
    /// Intersection over union.
    Iou,
    /// Intersection over the smaller box: a half object at a tile edge matches the whole one.
    Ios,
}

impl TileSize {
    /// Reads `auto`, `512` or `512x384` (width × height).
    pub fn parse(text: &str) -> Option<TileSize> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("auto") {
            return Some(TileSize::Auto);
        }
        let (w, h) = match text.split_once(['x', 'X', '×']) {
            Some((w, h)) => (w.trim().parse().ok()?, h.trim().parse().ok()?),
            None => {
                let side = text.parse().ok()?;
                (side, side)
            }
        };
        let valid = |s: u32| (TILE_SIDE.0..=TILE_SIDE.1).contains(&s);
        (valid(w) && valid(h)).then_some(TileSize::Fixed { width: w, height: h })
    }

    /// The tile in pixels, for a model whose input is `model_width × model_height` when
    /// `fixed_input` (0 × 0 or not fixed: [`AUTO_SIDE`]).
    pub fn resolve(self, model_width: u32, model_height: u32, fixed_input: bool) -> (u32, u32) {
        match self {
            TileSize::Fixed { width, height } => (width, height),
            TileSize::Auto if fixed_input && model_width > 0 && model_height > 0 => (model_width, model_height),
            TileSize::Auto => (AUTO_SIDE, AUTO_SIDE),
        }
    }
}

impl Merge {
    pub fn parse(text: &str) -> Option<Merge> {
        match text.trim().to_ascii_lowercase().as_str() {
            "nms" => Some(Merge::Nms),
            "nmm" | "greedy_nmm" | "greedynmm" => Some(Merge::Nmm),
            _ => None,
        }
    }
}

impl MatchMetric {
    pub fn parse(text: &str) -> Option<MatchMetric> {
        match text.trim().to_ascii_lowercase().as_str() {
            "iou" => Some(MatchMetric::Iou),
            "ios" => Some(MatchMetric::Ios),
            _ => None,
        }
    }

    fn value(self, a: &BoundingBox, b: &BoundingBox) -> f32 {
        let w = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0.0);
        let h = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0.0);
        let inter = w * h;
        let denominator = match self {
            MatchMetric::Iou => area(a) + area(b) - inter,
            MatchMetric::Ios => area(a).min(area(b)),
        };
        // SAHI's `_safe_ratio`: a degenerate box matches nothing.
        if denominator > 0.0 {
            inter / denominator
        } else {
            0.0
        }
    }
}

fn area(b: &BoundingBox) -> f32 {
    (b.x2 - b.x1) * (b.y2 - b.y1)
}

/// One tile: its top-left corner in the photo and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The tiles covering a `width × height` photo, row by row, as SAHI's `get_slice_bboxes` cuts
/// them: steps of `tile - floor(overlap × tile)`, the last row and column moved back inside the
/// photo, and a photo smaller than a tile is one tile of its own size.
pub fn tiles(width: u32, height: u32, tile_width: u32, tile_height: u32, overlap: f64) -> Vec<Tile> {
    // In f64, as Python multiplies: the floor of 0.3 × 10 must be 3 on both sides.
    let x_overlap = (overlap * f64::from(tile_width)) as u32;
    let y_overlap = (overlap * f64::from(tile_height)) as u32;
    let mut out = Vec::new();
    let (mut y_min, mut y_max) = (0u32, 0u32);
    while y_max < height {
        y_max = y_min + tile_height;
        let (mut x_min, mut x_max) = (0u32, 0u32);
        while x_max < width {
            x_max = x_min + tile_width;
            if y_max > height || x_max > width {
                x_max = x_max.min(width);
                y_max = y_max.min(height);
                x_min = x_max.saturating_sub(tile_width);
                y_min = y_max.saturating_sub(tile_height);
            }
            out.push(Tile { x: x_min, y: y_min, width: x_max - x_min, height: y_max - y_min });
            x_min = x_max - x_overlap;
        }
        y_min = y_max - y_overlap;
    }
    out
}

/// How many tiles [`tiles`] cuts, without cutting them (to refuse a photo before decoding it).
pub fn tile_count(width: u32, height: u32, tile_width: u32, tile_height: u32, overlap: f64) -> usize {
    let along = |length: u32, tile: u32| -> usize {
        let step = (tile - (overlap * f64::from(tile)) as u32).max(1);
        if length <= tile {
            1
        } else {
            1 + (length - tile).div_ceil(step) as usize
        }
    };
    along(width, tile_width) * along(height, tile_height)
}

/// A tile's detections, moved from the tile's pixels into the photo's.
pub fn shift(detections: &mut [Detection], tile: Tile) {
    let (dx, dy) = (tile.x as f32, tile.y as f32);
    for d in detections {
        d.bbox = BoundingBox { x1: d.bbox.x1 + dx, y1: d.bbox.y1 + dy, x2: d.bbox.x2 + dx, y2: d.bbox.y2 + dy };
    }
}

/// One box a merge keeps: the box that seeded it (its label and score), the boxes it grew
/// over (`nmm`'s second check; their masks join its own), and the box it grew to.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub seed: usize,
    pub grown_over: Vec<usize>,
    pub bbox: BoundingBox,
}

/// Every tile's boxes (in the photo's pixels) as one list, class by class as SAHI's
/// `class_agnostic = False`: boxes in order of score (ties by x1, y1, x2, y2), each one not yet
/// taken keeps its place and takes every later box of its class whose metric with it reaches the
/// threshold. `Nms` drops what it takes; `Nmm` grows it to the union of the taken boxes that
/// still match it as it grows (SAHI's second check), with the best score. The groups kept,
/// best first, their indices those of `detections`.
pub fn merge_groups(detections: &[Detection], slicing: &Slicing) -> Vec<Group> {
    let mut order: Vec<usize> = (0..detections.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&detections[a], &detections[b]);
        b.score
            .total_cmp(&a.score)
            .then(a.bbox.x1.total_cmp(&b.bbox.x1))
            .then(a.bbox.y1.total_cmp(&b.bbox.y1))
            .then(a.bbox.x2.total_cmp(&b.bbox.x2))
            .then(a.bbox.y2.total_cmp(&b.bbox.y2))
    });
    let threshold = slicing.match_threshold;
    // Class by class: a box is only ever compared with its own class's, in score order.
    let mut classes: std::collections::BTreeMap<usize, Vec<usize>> = std::collections::BTreeMap::new();
    for (rank, &i) in order.iter().enumerate() {
        classes.entry(detections[i].index).or_default().push(rank);
    }
    let mut taken = vec![false; detections.len()];
    let mut kept: Vec<(usize, Group)> = Vec::new();
    for members in classes.values() {
        for (at, &rank) in members.iter().enumerate() {
            if taken[rank] {
                continue;
            }
            taken[rank] = true;
            let seed = order[rank];
            let seed_box = detections[seed].bbox;
            let mut group = Group { seed, grown_over: Vec::new(), bbox: seed_box };
            for &later in &members[at + 1..] {
                let other = &detections[order[later]].bbox;
                if taken[later] || slicing.metric.value(&seed_box, other) < threshold {
                    continue;
                }
                taken[later] = true;
                if slicing.merge == Merge::Nmm && slicing.metric.value(&group.bbox, other) >= threshold {
                    group.bbox = BoundingBox {
                        x1: group.bbox.x1.min(other.x1),
                        y1: group.bbox.y1.min(other.y1),
                        x2: group.bbox.x2.max(other.x2),
                        y2: group.bbox.y2.max(other.y2),
                    };
                    group.grown_over.push(order[later]);
                }
            }
            kept.push((rank, group));
        }
    }
    // Each kept box carries its group's best score, its seed's: the seeds' order is best first.
    kept.sort_unstable_by_key(|(rank, _)| *rank);
    kept.into_iter().map(|(_, group)| group).collect()
}

/// The merged boxes ([`merge_groups`]), at most `max_detections`, best first.
pub fn merge(detections: Vec<Detection>, slicing: &Slicing, max_detections: usize) -> Vec<Detection> {
    merge_groups(&detections, slicing)
        .into_iter()
        .take(max_detections)
        .map(|group| Detection { bbox: group.bbox, ..detections[group.seed].clone() })
        .collect()
}

/// A tile's instances, boxes and masks moved from the tile's pixels into the photo's
/// (`width × height`).
pub fn shift_instances(instances: &mut [Instance], tile: Tile, width: u32, height: u32) {
    for instance in instances.iter_mut() {
        shift(std::slice::from_mut(&mut instance.detection), tile);
        let mask = std::mem::replace(&mut instance.mask, RegionMask::empty(0, 0));
        instance.mask = mask.moved(tile.x, tile.y, width, height);
    }
}

/// Every tile's instances merged as their boxes are ([`merge_groups`]); a box grown over
/// another (`nmm`) takes the union of their masks too, as SAHI's merge of two predictions does.
pub fn merge_instances(instances: Vec<Instance>, slicing: &Slicing, max_detections: usize) -> Vec<Instance> {
    let boxes: Vec<Detection> = instances.iter().map(|i| i.detection.clone()).collect();
    merge_groups(&boxes, slicing)
        .into_iter()
        .take(max_detections)
        .map(|group| {
            let seed = &instances[group.seed];
            let mask = group.grown_over.iter().fold(seed.mask.clone(), |mask, &other| mask.union(&instances[other].mask));
            Instance { detection: Detection { bbox: group.bbox, ..seed.detection.clone() }, mask }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(x1: f32, y1: f32, x2: f32, y2: f32, score: f32, index: usize) -> Detection {
        Detection { index, label: index.to_string(), score, bbox: BoundingBox { x1, y1, x2, y2 } }
    }

    #[test]
    fn tiles_follow_sahis_grid() {
        // The figure: 1920 × 1080 in tiles of 512 with 0.2 overlap is 5 × 3 = 15 tiles.
        let cut = tiles(1920, 1080, 512, 512, 0.2);
        assert_eq!(cut.len(), 15);
        assert_eq!(tile_count(1920, 1080, 512, 512, 0.2), 15);
        let xs: Vec<u32> = cut.iter().take(5).map(|t| t.x).collect();
        assert_eq!(xs, [0, 410, 820, 1230, 1408]);
        let ys: Vec<u32> = cut.iter().step_by(5).map(|t| t.y).collect();
        assert_eq!(ys, [0, 410, 568]);
        assert!(cut.iter().all(|t| t.width == 512 && t.height == 512));
        assert!(cut.iter().all(|t| t.x + t.width <= 1920 && t.y + t.height <= 1080));
    }

    #[test]
    fn a_photo_smaller_than_a_tile_is_one_tile_of_its_size() {
        assert_eq!(tiles(300, 200, 512, 512, 0.2), [Tile { x: 0, y: 0, width: 300, height: 200 }]);
        assert_eq!(tile_count(300, 200, 512, 512, 0.2), 1);
        // Exactly one tile wide, two high.
        let cut = tiles(512, 600, 512, 512, 0.2);
        assert_eq!(cut.iter().map(|t| (t.x, t.y)).collect::<Vec<_>>(), [(0, 0), (0, 88)]);
        assert_eq!(tile_count(512, 600, 512, 512, 0.2), 2);
    }

    #[test]
    fn the_count_matches_the_cut_over_many_shapes() {
        for (w, h) in [(1, 1), (640, 640), (641, 640), (4000, 3000), (1920, 1080), (999, 37)] {
            for (tw, th, overlap) in [(512, 512, 0.2), (320, 256, 0.0), (640, 640, 0.5), (100, 100, 0.9)] {
                assert_eq!(tiles(w, h, tw, th, overlap).len(), tile_count(w, h, tw, th, overlap), "{w}x{h} in {tw}x{th} at {overlap}");
            }
        }
    }

    #[test]
    fn tile_sizes_parse() {
        assert_eq!(TileSize::parse("auto"), Some(TileSize::Auto));
        assert_eq!(TileSize::parse("512"), Some(TileSize::Fixed { width: 512, height: 512 }));
        assert_eq!(TileSize::parse("640x480"), Some(TileSize::Fixed { width: 640, height: 480 }));
        for bad in ["", "0", "16", "99999", "512x", "x512", "-5", "big"] {
            assert_eq!(TileSize::parse(bad), None, "{bad}");
        }
        assert_eq!(TileSize::Auto.resolve(300, 300, true), (300, 300));
        assert_eq!(TileSize::Auto.resolve(800, 800, false), (640, 640));
    }

    #[test]
    fn nmm_grows_the_best_box_over_an_object_cut_by_a_tile_edge() {
        // The left half in one tile, the whole object in the next: IoS 1, so they merge.
        let slicing = Slicing::default();
        let merged = merge(vec![det(100.0, 0.0, 150.0, 50.0, 0.6, 1), det(90.0, 0.0, 200.0, 50.0, 0.9, 1)], &slicing, 100);
        assert_eq!(merged.len(), 1);
        assert_eq!((merged[0].score, merged[0].bbox), (0.9, BoundingBox { x1: 90.0, y1: 0.0, x2: 200.0, y2: 50.0 }));
        // Under NMS the best box stays as it is; under IoU (0.45) they do not match at 0.5.
        let nms = Slicing { merge: Merge::Nms, ..slicing };
        let grown = merge(vec![det(100.0, 0.0, 210.0, 50.0, 0.6, 1), det(90.0, 0.0, 200.0, 50.0, 0.9, 1)], &nms, 100);
        assert_eq!(grown.len(), 1);
        assert_eq!(grown[0].bbox.x2, 200.0);
        let iou = Slicing { metric: MatchMetric::Iou, ..slicing };
        assert_eq!(merge(vec![det(100.0, 0.0, 150.0, 50.0, 0.6, 1), det(90.0, 0.0, 200.0, 50.0, 0.9, 1)], &iou, 100).len(), 2);
    }

    /// A filled rectangle on a `canvas` × `canvas` mask.
    fn block(canvas: u32, left: u32, top: u32, width: u32, height: u32) -> RegionMask {
        RegionMask { canvas_width: canvas, canvas_height: canvas, left, top, width, height, bits: vec![1; (width * height) as usize] }
    }

    #[test]
    fn an_instance_cut_by_a_tile_edge_is_one_instance_with_both_tiles_mask() {
        // An object across the edge of two 100² tiles of a 200 × 100 photo: its left part seen
        // by the tile at x 0, the whole of it by the tile at x 60.
        let (left_tile, right_tile) = (Tile { x: 0, y: 0, width: 100, height: 100 }, Tile { x: 60, y: 0, width: 100, height: 100 });
        let mut left = vec![Instance { detection: det(80.0, 10.0, 100.0, 30.0, 0.6, 1), mask: block(100, 80, 10, 20, 20) }];
        let mut right = vec![Instance { detection: det(15.0, 10.0, 60.0, 30.0, 0.9, 1), mask: block(100, 15, 10, 45, 20) }];
        slicing_shift(&mut left, left_tile);
        slicing_shift(&mut right, right_tile);
        assert_eq!((right[0].mask.left, right[0].mask.canvas_width), (75, 200), "in the photo's pixels");
        let merged = merge_instances([left, right].concat(), &Slicing::default(), 100);
        assert_eq!(merged.len(), 1);
        let one = &merged[0];
        assert_eq!((one.detection.score, one.detection.bbox), (0.9, BoundingBox { x1: 75.0, y1: 10.0, x2: 120.0, y2: 30.0 }));
        assert_eq!((one.mask.left, one.mask.width, one.mask.area()), (75, 45, 45 * 20), "the union of both masks");
        // NMS keeps the best instance's own mask.
        let mut shifted = vec![Instance { detection: det(80.0, 10.0, 130.0, 30.0, 0.6, 1), mask: block(200, 80, 10, 50, 20) },
                               Instance { detection: det(75.0, 10.0, 120.0, 30.0, 0.9, 1), mask: block(200, 75, 10, 45, 20) }];
        let nms = merge_instances(std::mem::take(&mut shifted), &Slicing { merge: Merge::Nms, ..Slicing::default() }, 100);
        assert_eq!((nms.len(), nms[0].mask.left, nms[0].mask.width), (1, 75, 45));
    }

    fn slicing_shift(instances: &mut [Instance], tile: Tile) {
        shift_instances(instances, tile, 200, 100);
    }

    #[test]
    fn masks_join_on_the_region_that_holds_both() {
        let (a, b) = (block(50, 2, 2, 3, 3), block(50, 10, 4, 2, 2));
        let both = a.union(&b);
        assert_eq!((both.left, both.top, both.width, both.height, both.area()), (2, 2, 10, 4, 9 + 4));
        assert!(both.contains(11, 5) && both.contains(2, 2) && !both.contains(7, 3));
        assert_eq!(RegionMask::empty(50, 50).union(&a), a);
        assert_eq!(a.clone().moved(5, 1, 100, 60), RegionMask { canvas_width: 100, canvas_height: 60, left: 7, top: 3, ..a });
    }

    #[test]
    fn classes_never_merge_and_the_cap_keeps_the_best() {
        let slicing = Slicing::default();
        let merged = merge(vec![det(0.0, 0.0, 10.0, 10.0, 0.5, 1), det(0.0, 0.0, 10.0, 10.0, 0.7, 2), det(50.0, 0.0, 60.0, 10.0, 0.9, 1)], &slicing, 2);
        assert_eq!(merged.iter().map(|d| d.score).collect::<Vec<_>>(), [0.9, 0.7]);
    }

    #[test]
    fn a_taken_box_that_no_longer_matches_the_grown_box_is_dropped_not_merged() {
        // Both taken by the seed (IoU ≥ 0.3 with it); after the first merge the grown box's IoU
        // with the second is still computed against the grown box, as SAHI's `has_match` does.
        let slicing = Slicing { metric: MatchMetric::Iou, match_threshold: 0.3, ..Slicing::default() };
        let seed = det(0.0, 0.0, 10.0, 10.0, 0.9, 0);
        let wide = det(0.0, 0.0, 25.0, 10.0, 0.8, 0); // IoU 0.4 with the seed: merged, box now 0..25
        let low = det(-6.0, 0.0, 6.0, 10.0, 0.7, 0); // IoU 6/16 = 0.375 with the seed, 6/31 with 0..25
        let merged = merge(vec![seed, wide, low], &slicing, 100);
        assert_eq!(merged.len(), 1);
        assert_eq!((merged[0].bbox.x1, merged[0].bbox.x2), (0.0, 25.0));
    }

    #[test]
    fn degenerate_boxes_match_nothing() {
        let a = BoundingBox { x1: 5.0, y1: 5.0, x2: 5.0, y2: 9.0 };
        let b = BoundingBox { x1: 0.0, y1: 0.0, x2: 10.0, y2: 10.0 };
        assert_eq!(MatchMetric::Ios.value(&a, &b), 0.0);
        assert_eq!(MatchMetric::Iou.value(&a, &a), 0.0);
    }
}
