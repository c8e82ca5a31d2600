//! Video in: a clip's frames as RGB pictures, with their timestamps, sampled as a request asks.
//!
//! The decoder is FFmpeg, run as its own process (`ffmpeg`/`ffprobe` from Debian's `ffmpeg`
//! package), not linked in. Why: a video file is the most hostile input a server parses —
//! container and codec parsers are where decoder CVEs live — and in a child process a crash or
//! a runaway decode costs one request, never the server and its models; the child is killed
//! when its request goes away. It also keeps FFmpeg's C libraries and their bindgen out of the
//! server's build: the binary builds and serves images on a machine without FFmpeg, and
//! answers video requests there with a clear 501. FFmpeg reads every container and codec the
//! issue names (MP4/MKV/WebM/AVI; H.264, H.265, VP9, MJPEG, ...) and RTSP/HLS for live streams.
//! Frames come back as a PPM stream (each frame carries its own size), timestamps from
//! FFmpeg's `showinfo` filter, one log line per frame.

pub mod ffmpeg;
pub mod source;

pub use ffmpeg::{Frame, FrameReader, VideoError, VideoInfo, VideoTools};
pub use source::{AllowList, StreamSource};

use std::collections::HashMap;

use crate::tasks::ParamError;

/// Which frames of a clip a request wants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Frames per second to take (FFmpeg's `fps` filter); `None`: every frame.
    pub fps: Option<f64>,
    /// The most frames answered.
    pub max_frames: usize,
    /// Seconds into the clip to start at, and to end at.
    pub start: f64,
    pub end: Option<f64>,
}

/// The request parameters that shape the sampling (the rest are the model's).
pub const SAMPLING_KEYS: [&str; 4] = ["fps", "max_frames", "start", "end"];

impl Sampling {
    /// From the request's parameters (taken out of `raw`); `max_frames` at most `limit`.
    pub fn take_from(raw: &mut HashMap<String, String>, limit: usize) -> Result<Sampling, ParamError> {
        let number = |raw: &mut HashMap<String, String>, key: &str| -> Result<Option<f64>, ParamError> {
            match raw.remove(key) {
                None => Ok(None),
                Some(text) => text
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .map(Some)
                    .ok_or_else(|| ParamError(format!("parameter '{key}' must be a number of 0 or more, got '{text}'"))),
            }
        };
        let fps = number(raw, "fps")?;
        if let Some(fps) = fps {
            if !(0.01..=240.0).contains(&fps) {
                return Err(ParamError(format!("parameter 'fps' must be within 0.01..=240, got {fps}")));
            }
        }
        let max_frames = match number(raw, "max_frames")? {
            None => limit,
            Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= limit as f64 => n as usize,
            Some(n) => return Err(ParamError(format!("parameter 'max_frames' must be an integer within 1..={limit}, got {n}"))),
        };
        let start = number(raw, "start")?.unwrap_or(0.0);
        let end = number(raw, "end")?;
        if let Some(end) = end {
            if end <= start {
                return Err(ParamError(format!("parameter 'end' ({end} s) must be after 'start' ({start} s)")));
            }
        }
        Ok(Sampling { fps, max_frames, start, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn sampling_takes_its_keys_and_leaves_the_models() {
        let mut params = raw(&[("fps", "2.5"), ("max_frames", "10"), ("start", "1"), ("end", "3"), ("score_threshold", "0.4")]);
        let sampling = Sampling::take_from(&mut params, 100).unwrap();
        assert_eq!(sampling, Sampling { fps: Some(2.5), max_frames: 10, start: 1.0, end: Some(3.0) });
        assert_eq!(params.keys().collect::<Vec<_>>(), vec!["score_threshold"]);
        assert_eq!(Sampling::take_from(&mut raw(&[]), 100).unwrap().max_frames, 100);
    }

    #[test]
    fn bad_sampling_is_refused_with_its_name() {
        for (key, value) in [("fps", "0"), ("fps", "fast"), ("max_frames", "101"), ("max_frames", "1.5"), ("start", "-1")] {
            let error = Sampling::take_from(&mut raw(&[(key, value)]), 100).unwrap_err();
            assert!(error.0.contains(key), "{error:?}");
        }
        assert!(Sampling::take_from(&mut raw(&[("start", "3"), ("end", "2")]), 100).is_err());
    }
}
