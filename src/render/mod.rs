//! Rendered overlays: the input image with the result drawn on it, as a PNG. Drawing and text
//! come from `imageproc` and `ab_glyph` with an embedded font, so the output is the same on
//! every machine (tests compare against committed images).

use std::sync::OnceLock;

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{
    draw_filled_circle_mut, draw_filled_rect_mut, draw_hollow_rect_mut, draw_line_segment_mut, draw_text_mut, text_size,
};
use imageproc::rect::Rect;

use crate::tasks::instances::Instance;
use crate::tasks::keypoints::{KeypointSchema, Pose};
use crate::tasks::oriented::OrientedDetection;
use crate::tasks::segmentation::{summarise, ClassSummary, LabelMap};
use crate::tasks::{Detection, Finished, Prediction};

const FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).expect("the embedded font parses"))
}

/// A fixed palette of well-separated colours; class `i` always gets `PALETTE[i % len]`.
const PALETTE: [[u8; 3]; 20] = [
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
    [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128],
];

pub fn class_colour(index: usize) -> Rgb<u8> {
    Rgb(PALETTE[index % PALETTE.len()])
}

/// Text size that reads well at the image's scale.
fn text_scale(image: &RgbImage) -> PxScale {
    let side = image.width().min(image.height()) as f32;
    PxScale::from((side / 28.0).clamp(12.0, 40.0))
}

/// Black or white, whichever reads better on `background`.
fn ink_for(background: Rgb<u8>) -> Rgb<u8> {
    let [r, g, b] = background.0;
    let luma = 0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32;
    if luma > 150.0 { Rgb([0, 0, 0]) } else { Rgb([255, 255, 255]) }
}

/// A label on a filled box whose top-left corner is at (x, y), kept inside the image.
fn draw_tag(image: &mut RgbImage, x: i32, y: i32, text: &str, colour: Rgb<u8>, scale: PxScale) {
    let (w, h) = text_size(scale, font(), text);
    let pad = (scale.y / 6.0).ceil() as i32;
    let box_w = w as i32 + 2 * pad;
    let box_h = h as i32 + 2 * pad;
    let x = x.clamp(0, (image.width() as i32 - box_w).max(0));
    let y = y.clamp(0, (image.height() as i32 - box_h).max(0));
    draw_filled_rect_mut(image, Rect::at(x, y).of_size(box_w as u32, box_h as u32), colour);
    draw_text_mut(image, ink_for(colour), x + pad, y + pad, scale, font(), text);
}

pub fn draw_detections(image: &mut RgbImage, detections: &[Detection]) {
    // Lowest score first, so the best box and its tag end up on top.
    for d in detections.iter().rev() {
        draw_box_and_tag(image, d, class_colour(d.index));
    }
}

fn line_thickness(image: &RgbImage) -> i32 {
    ((image.width().min(image.height()) as f32) / 200.0).clamp(2.0, 6.0) as i32
}

fn draw_box_and_tag(image: &mut RgbImage, d: &Detection, colour: Rgb<u8>) {
    let scale = text_scale(image);
    let thickness = line_thickness(image);
    let (x1, y1) = (d.bbox.x1.round() as i32, d.bbox.y1.round() as i32);
    let (x2, y2) = (d.bbox.x2.round() as i32, d.bbox.y2.round() as i32);
    for t in 0..thickness {
        let w = (x2 - x1 - 2 * t).max(1) as u32;
        let h = (y2 - y1 - 2 * t).max(1) as u32;
        draw_hollow_rect_mut(image, Rect::at(x1 + t, y1 + t).of_size(w, h), colour);
    }
    let tag = format!("{} {:.2}", d.label, d.score);
    let (_, tag_h) = text_size(scale, font(), &tag);
    let above = y1 - tag_h as i32 - (scale.y / 3.0) as i32;
    draw_tag(image, x1, if above >= 0 { above } else { y1 + thickness }, &tag, colour, scale);
}

/// Each instance in its own colour (by rank, so two instances of one class differ): its mask
/// half transparent with a solid outline, then its box and tag; the best ends up on top.
pub fn draw_instances(image: &mut RgbImage, instances: &[Instance]) {
    for (rank, instance) in instances.iter().enumerate().rev() {
        let colour = class_colour(rank);
        let mask = &instance.mask;
        for y in mask.top..(mask.top + mask.height).min(image.height()) {
            for x in mask.left..(mask.left + mask.width).min(image.width()) {
                if !mask.contains(x, y) {
                    continue;
                }
                // An edge pixel: a 4-neighbour outside the mask (or outside the image).
                let edge = x == 0 || y == 0 || !mask.contains(x - 1, y) || !mask.contains(x + 1, y)
                    || !mask.contains(x, y - 1) || !mask.contains(x, y + 1);
                let pixel = image.get_pixel_mut(x, y);
                for k in 0..3 {
                    pixel.0[k] = if edge { colour.0[k] } else { ((pixel.0[k] as u16 + colour.0[k] as u16) / 2) as u8 };
                }
            }
        }
        draw_box_and_tag(image, &instance.detection, colour);
    }
}

/// A thick segment as parallel one-pixel ones, offset across its direction.
fn draw_thick_segment(image: &mut RgbImage, a: (f32, f32), b: (f32, f32), thickness: i32, colour: Rgb<u8>) {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let length = (dx * dx + dy * dy).sqrt().max(1e-3);
    let (nx, ny) = (-dy / length, dx / length);
    for t in 0..thickness {
        let o = t as f32 - (thickness - 1) as f32 / 2.0;
        draw_line_segment_mut(image, (a.0 + nx * o, a.1 + ny * o), (b.0 + nx * o, b.1 + ny * o), colour);
    }
}

/// Each rotated box as its outline in its class's colour, tagged at its top corner; the best
/// ends up on top.
pub fn draw_oriented(image: &mut RgbImage, detections: &[OrientedDetection]) {
    let (scale, thickness) = (text_scale(image), line_thickness(image));
    for found in detections.iter().rev() {
        let colour = class_colour(found.detection.index);
        let corners = found.rotated.corners();
        for i in 0..4 {
            let (a, b) = (corners[i], corners[(i + 1) % 4]);
            draw_thick_segment(image, (a[0], a[1]), (b[0], b[1]), thickness, colour);
        }
        let top = corners.iter().min_by(|a, b| a[1].total_cmp(&b[1])).expect("four corners");
        let tag = format!("{} {:.2}", found.detection.label, found.detection.score);
        let (_, tag_h) = text_size(scale, font(), &tag);
        draw_tag(image, top[0].round() as i32, top[1].round() as i32 - tag_h as i32 - thickness, &tag, colour, scale);
    }
}

/// Each pose in its own colour (by rank): box and tag, the skeleton's edges between points
/// that reach the schema's drawing threshold, and those points as dots ringed in white.
pub fn draw_poses(image: &mut RgbImage, poses: &[Pose], schema: &KeypointSchema) {
    let thickness = line_thickness(image);
    let radius = thickness + 1;
    for (rank, pose) in poses.iter().enumerate().rev() {
        let colour = class_colour(rank);
        draw_box_and_tag(image, &pose.detection, colour);
        let shown = |i: usize| pose.points.get(i).filter(|p| p.score >= schema.draw_threshold);
        for &[a, b] in &schema.skeleton {
            let (Some(a), Some(b)) = (shown(a), shown(b)) else { continue };
            draw_thick_segment(image, (a.x, a.y), (b.x, b.y), thickness, colour);
        }
        for i in 0..pose.points.len() {
            if let Some(p) = shown(i) {
                let centre = (p.x.round() as i32, p.y.round() as i32);
                draw_filled_circle_mut(image, centre, radius + 1, Rgb([255, 255, 255]));
                draw_filled_circle_mut(image, centre, radius, colour);
            }
        }
    }
}

/// Draws one image's result on it: the top-k panel, the boxes, or the mask with its legend.
pub fn draw_result(image: &mut RgbImage, result: &Finished, labels: &[String]) {
    match result {
        Finished::Classification { top, .. } => draw_classification(image, top),
        Finished::Detection { detections } => draw_detections(image, detections),
        Finished::Segmentation { mask } => draw_segmentation(image, mask, &summarise(mask, labels)),
        // Nothing in the picture to draw: /v1 refuses `render=png` for embeddings up front.
        Finished::Embedding { .. } => {}
        Finished::InstanceSegmentation { instances } => draw_instances(image, instances),
        Finished::Keypoints { poses, schema } => draw_poses(image, poses, schema),
        Finished::OrientedDetection { detections } => draw_oriented(image, detections),
    }
}

/// Colours every non-background pixel (class index ≠ 0) half transparent, then a legend of the
/// classes present with their share of the image.
pub fn draw_segmentation(image: &mut RgbImage, labels: &LabelMap, classes: &[ClassSummary]) {
    for (pixel, &class) in image.pixels_mut().zip(&labels.labels) {
        if class != 0 {
            let c = class_colour(class as usize).0;
            for k in 0..3 {
                pixel.0[k] = ((pixel.0[k] as u16 + c[k] as u16) / 2) as u8;
            }
        }
    }
    let scale = text_scale(image);
    let mut y = 4;
    for class in classes {
        let text = format!("{} {:.1}%", class.label, class.fraction * 100.0);
        let colour = if class.index == 0 { Rgb([40, 40, 40]) } else { class_colour(class.index) };
        draw_tag(image, 4, y, &text, colour, scale);
        y += text_size(scale, font(), &text).1 as i32 + (scale.y / 3.0) as i32 + 4;
    }
}

/// The top-k as a panel: one line per class with a bar as long as its score.
pub fn draw_classification(image: &mut RgbImage, predictions: &[Prediction]) {
    let scale = text_scale(image);
    let line = (scale.y * 1.5) as i32;
    let panel_w = (image.width() as i32 * 2 / 3).max(120);
    let panel_h = line * predictions.len() as i32 + 8;
    let panel = Rect::at(0, 0).of_size(panel_w.min(image.width() as i32) as u32, panel_h.min(image.height() as i32).max(1) as u32);
    // Darken the panel area so white text reads on any photo.
    for y in panel.top()..=panel.bottom().min(image.height() as i32 - 1) {
        for x in panel.left()..=panel.right().min(image.width() as i32 - 1) {
            let p = image.get_pixel_mut(x as u32, y as u32);
            for k in 0..3 {
                p.0[k] /= 3;
            }
        }
    }
    for (i, p) in predictions.iter().enumerate() {
        let y = 4 + i as i32 * line;
        let bar = ((panel_w - 8) as f32 * p.score.clamp(0.0, 1.0)).round() as u32;
        if bar > 0 {
            draw_filled_rect_mut(image, Rect::at(4, y).of_size(bar, (line - 4).max(1) as u32), class_colour(i));
        }
        let text = format!("{} {:.1}%", p.label, p.score * 100.0);
        draw_text_mut(image, Rgb([255, 255, 255]), 8, y + (line - scale.y as i32) / 2 - 1, scale, font(), &text);
    }
}

pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>, image::ImageError> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::detection::BoundingBox;

    fn canvas() -> RgbImage {
        RgbImage::from_fn(320, 240, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 128]))
    }

    /// Compares with the committed image in tests/expected/, or writes it when
    /// `VISIONSERVE_UPDATE_EXPECTED=1`. Tolerates tiny rasteriser differences only.
    fn assert_matches_expected(name: &str, image: &RgbImage) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/expected").join(name);
        if std::env::var_os("VISIONSERVE_UPDATE_EXPECTED").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image.save(&path).unwrap();
        }
        let expected = image::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (set VISIONSERVE_UPDATE_EXPECTED=1 to create it)", path.display()))
            .to_rgb8();
        assert_eq!(expected.dimensions(), image.dimensions());
        let differing = expected
            .pixels()
            .zip(image.pixels())
            .filter(|(a, b)| a.0.iter().zip(b.0.iter()).any(|(x, y)| x.abs_diff(*y) > 8))
            .count();
        let share = differing as f64 / (image.width() * image.height()) as f64;
        assert!(share < 0.002, "{name}: {:.3}% of pixels differ from the expected image", share * 100.0);
    }

    #[test]
    fn detection_overlay_matches_the_expected_image() {
        let mut image = canvas();
        let detections = vec![
            Detection { index: 17, label: "cat".into(), score: 0.92, bbox: BoundingBox { x1: 20.0, y1: 30.0, x2: 200.0, y2: 220.0 } },
            Detection { index: 1, label: "person".into(), score: 0.61, bbox: BoundingBox { x1: 150.0, y1: 0.0, x2: 310.0, y2: 120.0 } },
        ];
        draw_detections(&mut image, &detections);
        // The box outline is the class colour.
        assert_eq!(*image.get_pixel(20, 120), class_colour(17));
        assert_matches_expected("overlay_detection.png", &image);
    }

    #[test]
    fn segmentation_overlay_matches_the_expected_image() {
        let mut image = canvas();
        let map = LabelMap {
            width: 320,
            height: 240,
            labels: (0..320 * 240).map(|i| if (i % 320) > 160 { 1 } else { 0 }).collect(),
            confidence: vec![],
        };
        let labels = vec!["background".to_string(), "text".to_string()];
        let before = *image.get_pixel(300, 200);
        draw_result(&mut image, &Finished::Segmentation { mask: map }, &labels);
        let after = *image.get_pixel(300, 200);
        let c = class_colour(1).0;
        for k in 0..3 {
            assert_eq!(after.0[k], ((before.0[k] as u16 + c[k] as u16) / 2) as u8, "half-transparent blend");
        }
        assert_matches_expected("overlay_segmentation.png", &image);
    }

    #[test]
    fn pose_overlay_draws_the_skeleton_between_shown_points_only() {
        use crate::tasks::keypoints::Keypoint;
        let mut image = RgbImage::from_pixel(320, 240, Rgb([0, 0, 0]));
        let point = |x: f32, y: f32, score: f32| Keypoint { x, y, score };
        let schema = KeypointSchema { names: vec!["a".into(), "b".into(), "c".into()], skeleton: vec![[0, 1], [1, 2]], draw_threshold: 0.5 };
        let pose = Pose {
            detection: Detection { index: 0, label: "person".into(), score: 0.9, bbox: BoundingBox { x1: 40.0, y1: 40.0, x2: 280.0, y2: 220.0 } },
            points: vec![point(100.0, 100.0, 0.9), point(200.0, 100.0, 0.8), point(200.0, 200.0, 0.1)],
        };
        draw_poses(&mut image, &[pose], &schema);
        let colour = class_colour(0);
        // On the edge a–b, halfway; the dots' centres; nothing towards c, which scores too low.
        assert_eq!(*image.get_pixel(150, 100), colour);
        assert_eq!(*image.get_pixel(100, 100), colour);
        assert_eq!(*image.get_pixel(200, 150), Rgb([0, 0, 0]));
        assert_eq!(*image.get_pixel(200, 200), Rgb([0, 0, 0]));
        assert_matches_expected("overlay_keypoints.png", &image);
    }

    #[test]
    fn oriented_overlay_outlines_the_rotated_box_not_its_bound() {
        use crate::tasks::oriented::RotatedBox;
        let mut image = RgbImage::from_pixel(320, 240, Rgb([0, 0, 0]));
        // A 160 x 60 box turned 45 degrees about (160, 120).
        let rotated = RotatedBox { cx: 160.0, cy: 120.0, w: 160.0, h: 60.0, angle: std::f32::consts::FRAC_PI_4 };
        let found = OrientedDetection {
            detection: Detection { index: 3, label: "plane".into(), score: 0.8, bbox: BoundingBox { x1: 82.2, y1: 42.2, x2: 237.8, y2: 197.8 } },
            rotated,
        };
        draw_oriented(&mut image, &[found]);
        let colour = class_colour(3);
        // Midway along the first edge (corner 0 to corner 1); the centre and the bound's
        // corners stay dark: the bound is not drawn.
        let [a, b] = [rotated.corners()[0], rotated.corners()[1]];
        let (mx, my) = (((a[0] + b[0]) / 2.0) as u32, ((a[1] + b[1]) / 2.0) as u32);
        assert!((mx - 1..=mx + 1).any(|x| (my - 1..=my + 1).any(|y| *image.get_pixel(x, y) == colour)), "the edge is drawn");
        assert_eq!(*image.get_pixel(160, 120), Rgb([0, 0, 0]));
        assert_eq!(*image.get_pixel(84, 196), Rgb([0, 0, 0]));
        assert_matches_expected("overlay_oriented.png", &image);
    }

    #[test]
    fn classification_overlay_matches_the_expected_image() {
        let mut image = canvas();
        let predictions = vec![
            Prediction { index: 285, label: "Egyptian cat".into(), score: 0.72 },
            Prediction { index: 282, label: "tiger cat".into(), score: 0.14 },
            Prediction { index: 281, label: "tabby".into(), score: 0.13 },
        ];
        draw_classification(&mut image, &predictions);
        assert_matches_expected("overlay_classification.png", &image);
    }
}
