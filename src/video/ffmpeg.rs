//! `ffprobe` (what a clip holds) and `ffmpeg` (its frames) as child processes; the PPM and
//! `showinfo` readers are pure and unit-tested.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::mpsc;

use super::source::StreamSource;
use super::Sampling;

/// Where the FFmpeg programs are.
#[derive(Debug, Clone)]
pub struct VideoTools {
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
}

impl VideoTools {
    /// `ffmpeg` as given (a name on `PATH` or a path), `ffprobe` beside it.
    pub fn beside(ffmpeg: PathBuf) -> VideoTools {
        let ffprobe = match ffmpeg.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join("ffprobe"),
            _ => PathBuf::from("ffprobe"),
        };
        VideoTools { ffmpeg, ffprobe }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    /// FFmpeg is not installed where the server looks: a server matter, not the client's.
    #[error("video input needs FFmpeg, and '{0}' could not be run on this server (Debian: apt-get install ffmpeg; or point --ffmpeg at it)")]
    ToolMissing(String),
    /// The upload is not a video FFmpeg can read (or holds no video stream).
    #[error("not a video this server can read: {0}")]
    Unreadable(String),
    /// Frames larger than the server takes.
    #[error("video frames are {width}×{height}, over this server's limit of {limit} pixels")]
    TooLarge { width: u32, height: u32, limit: u64 },
    /// The decode broke off partway (a corrupt or cut-off file).
    #[error("decoding stopped at frame {frame}: {detail}")]
    Broken { frame: usize, detail: String },
    #[error("video decoding failed: {0}")]
    Io(String),
}

/// What `ffprobe` says of a clip's first video stream.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VideoInfo {
    pub container: String,
    pub codec: String,
    pub width: u32,
    pub height: u32,
    /// Frames per second as the stream states it (its average), if stated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_rate: Option<f64>,
    /// Seconds, if stated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
}

/// Reads what the clip at `path` holds; a file FFmpeg cannot read, or one without a video
/// stream, is [`VideoError::Unreadable`].
pub async fn probe(tools: &VideoTools, path: &Path, max_pixels: u64) -> Result<VideoInfo, VideoError> {
    let output = Command::new(&tools.ffprobe)
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .arg("stream=codec_name,width,height,avg_frame_rate,r_frame_rate,duration:format=format_name,duration")
        .args(["-of", "json"])
        .arg(path)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| missing_or_io(&tools.ffprobe, e))?;
    if !output.status.success() {
        return Err(VideoError::Unreadable(last_line(&String::from_utf8_lossy(&output.stderr))));
    }
    let info = parse_probe(&output.stdout)?;
    if u64::from(info.width) * u64::from(info.height) > max_pixels {
        return Err(VideoError::TooLarge { width: info.width, height: info.height, limit: max_pixels });
    }
    Ok(info)
}

fn missing_or_io(tool: &Path, e: std::io::Error) -> VideoError {
    if e.kind() == std::io::ErrorKind::NotFound {
        VideoError::ToolMissing(tool.display().to_string())
    } else {
        VideoError::Io(format!("could not run {}: {e}", tool.display()))
    }
}

fn last_line(text: &str) -> String {
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("ffprobe found no video in it").trim();
    // FFmpeg prefixes the file's path; the client knows no such path.
    match line.split_once(": ") {
        Some((prefix, rest)) if prefix.starts_with('/') => rest.to_string(),
        _ => line.to_string(),
    }
}

fn parse_probe(json: &[u8]) -> Result<VideoInfo, VideoError> {
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| VideoError::Io(format!("ffprobe's answer: {e}")))?;
    let stream = value["streams"].get(0).ok_or_else(|| VideoError::Unreadable("it holds no video stream".into()))?;
    let dimension = |key: &str| stream[key].as_u64().filter(|&v| v > 0 && v <= u64::from(u32::MAX)).map(|v| v as u32);
    let (Some(width), Some(height)) = (dimension("width"), dimension("height")) else {
        return Err(VideoError::Unreadable("its video stream has no frame size".into()));
    };
    let seconds = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<f64>().ok()).filter(|d| d.is_finite() && *d > 0.0);
    let rate = |v: &serde_json::Value| {
        let (n, d) = v.as_str()?.split_once('/')?;
        let (n, d) = (n.parse::<f64>().ok()?, d.parse::<f64>().ok()?);
        (n > 0.0 && d > 0.0).then(|| n / d)
    };
    Ok(VideoInfo {
        container: value["format"]["format_name"].as_str().unwrap_or("unknown").to_string(),
        codec: stream["codec_name"].as_str().unwrap_or("unknown").to_string(),
        width,
        height,
        frame_rate: rate(&stream["avg_frame_rate"]).or_else(|| rate(&stream["r_frame_rate"])),
        duration: seconds(&stream["duration"]).or_else(|| seconds(&value["format"]["duration"])),
    })
}

/// One decoded frame: RGB, three bytes a pixel, row-major.
#[derive(Debug)]
pub struct Frame {
    /// Its place among the frames answered (0, 1, 2, ...).
    pub index: usize,
    /// Seconds from the clip's start.
    pub timestamp: f64,
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
    /// When it came off FFmpeg's pipe (a live frame's latency is counted from here).
    pub read_at: Instant,
}

/// `ffmpeg` with what every decode shares. One decoding thread: the cores are the models'; a
/// 1080p H.264 frame decodes in a few ms.
fn ffmpeg(tools: &VideoTools) -> Command {
    let mut command = Command::new(&tools.ffmpeg);
    command.args(["-hide_banner", "-nostdin", "-nostats", "-loglevel", "info", "-threads", "1"]);
    command
}

/// Lines of FFmpeg's log kept for an error message.
const LOG_TAIL: usize = 8;

/// A clip's frames, one at a time, from an `ffmpeg` child (killed when this is dropped).
pub struct FrameReader {
    child: Child,
    stdout: BufReader<ChildStdout>,
    timestamps: mpsc::UnboundedReceiver<f64>,
    log: Arc<Mutex<VecDeque<String>>>,
    next_index: usize,
    start: f64,
    max_frames: usize,
    max_pixels: u64,
    /// The upload's temporary path or the source's URL (with its credentials), kept out of the
    /// messages a client reads, and what is said in its place.
    hidden: (String, &'static str),
}

/// How a [`FrameReader`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The clip (or the asked-for part of it) is done.
    Complete,
    /// `max_frames` were read and the clip had more.
    AtMaxFrames,
}

impl FrameReader {
    /// The frames of the clip at `path`, as `sampling` asks.
    pub fn spawn(tools: &VideoTools, path: &Path, sampling: &Sampling, max_pixels: u64) -> Result<FrameReader, VideoError> {
        let mut command = ffmpeg(tools);
        if sampling.start > 0.0 {
            command.arg("-ss").arg(format!("{}", sampling.start));
        }
        command.arg("-i").arg(path);
        if let Some(end) = sampling.end {
            command.arg("-t").arg(format!("{}", end - sampling.start));
        }
        let mut filters = Vec::new();
        if let Some(fps) = sampling.fps {
            filters.push(format!("fps={fps}"));
        }
        // One frame past the limit, to tell "the clip had more" from "it ended".
        let limit = sampling.max_frames + 1;
        let hidden = (path.display().to_string(), "the upload");
        FrameReader::launch(tools, command, filters, Some(limit), sampling.start, sampling.max_frames, max_pixels, hidden)
    }

    /// The frames of a live source, as they come, until it ends or stalls.
    pub fn spawn_live(tools: &VideoTools, source: &StreamSource, stall_micros: u64, max_pixels: u64) -> Result<FrameReader, VideoError> {
        let mut command = ffmpeg(tools);
        let (input_args, input) = source.ffmpeg_input(stall_micros);
        command.args(input_args).arg("-i").arg(&input);
        let hidden = (input.to_string_lossy().into_owned(), "the source");
        FrameReader::launch(tools, command, Vec::new(), None, 0.0, usize::MAX, max_pixels, hidden)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        tools: &VideoTools,
        mut command: Command,
        mut filters: Vec<String>,
        frame_limit: Option<usize>,
        start: f64,
        max_frames: usize,
        max_pixels: u64,
        hidden: (String, &'static str),
    ) -> Result<FrameReader, VideoError> {
        // One log line per frame, with its timestamp; checksums off (they cost more than the decode).
        filters.push("showinfo=checksum=0".to_string());
        command
            // Every frame the filters give is written as it is (no frames duplicated or dropped
            // to make a constant rate), so frames and showinfo's lines pair one to one.
            .args(["-map", "0:v:0", "-an", "-sn", "-dn", "-fps_mode", "passthrough", "-vf"])
            .arg(filters.join(","));
        if let Some(limit) = frame_limit {
            command.arg("-frames:v").arg(limit.to_string());
        }
        command
            .args(["-f", "image2pipe", "-c:v", "ppm", "-pix_fmt", "rgb24", "pipe:1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| missing_or_io(&tools.ffmpeg, e))?;
        let stdout = BufReader::with_capacity(1 << 20, child.stdout.take().expect("stdout is piped"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, timestamps) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        tokio::spawn(read_log(stderr, sender, Arc::clone(&log)));
        Ok(FrameReader { child, stdout, timestamps, log, next_index: 0, start, max_frames, max_pixels, hidden })
    }

    /// The next frame, or how the clip ended.
    pub async fn next(&mut self) -> Result<Result<Frame, Ended>, VideoError> {
        let frame = self.next_index;
        let header = match read_ppm_header(&mut self.stdout).await {
            Ok(Some(header)) => header,
            Ok(None) => return self.finish().await.map(Err),
            Err(detail) => return Err(self.broken(frame, detail).await),
        };
        if self.next_index == self.max_frames {
            let _ = self.child.start_kill();
            return Ok(Err(Ended::AtMaxFrames));
        }
        let (width, height) = header;
        if u64::from(width) * u64::from(height) > self.max_pixels {
            return Err(VideoError::TooLarge { width, height, limit: self.max_pixels });
        }
        let mut pixels = vec![0u8; width as usize * height as usize * 3];
        if let Err(e) = self.stdout.read_exact(&mut pixels).await {
            return Err(self.broken(frame, format!("a frame broke off: {e}")).await);
        }
        // showinfo logs a frame before the encoder writes it, so its line is here or coming.
        let pts = self.timestamps.recv().await.unwrap_or(f64::NAN);
        self.next_index += 1;
        Ok(Ok(Frame { index: frame, timestamp: self.start + pts, width, height, pixels, read_at: Instant::now() }))
    }

    async fn finish(&mut self) -> Result<Ended, VideoError> {
        let status = self.child.wait().await.map_err(|e| VideoError::Io(e.to_string()))?;
        if status.success() {
            Ok(Ended::Complete)
        } else {
            Err(VideoError::Broken { frame: self.next_index, detail: self.log_tail() })
        }
    }

    async fn broken(&mut self, frame: usize, detail: String) -> VideoError {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let log = self.log_tail();
        VideoError::Broken { frame, detail: if log.is_empty() { detail } else { log } }
    }

    fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        let lines: Vec<String> = log.iter().filter(|l| !l.contains("Parsed_showinfo")).map(|l| l.replace(&self.hidden.0, self.hidden.1)).collect();
        lines.join("; ")
    }
}

/// FFmpeg's log: each frame's timestamp to `timestamps`, the last lines kept for errors.
async fn read_log(stderr: impl AsyncRead + Unpin, timestamps: mpsc::UnboundedSender<f64>, log: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(pts) = showinfo_timestamp(&line) {
            let _ = timestamps.send(pts);
            continue;
        }
        let mut log = log.lock().expect("log lock");
        if log.len() == LOG_TAIL {
            log.pop_front();
        }
        log.push_back(line.trim().to_string());
    }
}

/// `pts_time` of a `showinfo` frame line (`[Parsed_showinfo_1 @ 0x..] n:   3 pts: 1536 pts_time:0.12 ...`).
fn showinfo_timestamp(line: &str) -> Option<f64> {
    if !line.contains("Parsed_showinfo") || !line.contains(" n:") {
        return None;
    }
    let after = line.split("pts_time:").nth(1)?;
    after.split_whitespace().next()?.parse::<f64>().ok()
}

/// A binary PPM header (`P6 <width> <height> 255` and one whitespace byte); `None` at a clean
/// end of stream.
async fn read_ppm_header(reader: &mut (impl tokio::io::AsyncBufRead + Unpin)) -> Result<Option<(u32, u32)>, String> {
    let mut fields: Vec<String> = Vec::with_capacity(4);
    let mut current = String::new();
    loop {
        let mut byte = [0u8; 1];
        let read = reader.read(&mut byte).await.map_err(|e| e.to_string())?;
        if read == 0 {
            return if fields.is_empty() && current.is_empty() { Ok(None) } else { Err("the frame stream broke off in a header".into()) };
        }
        let c = byte[0];
        if c.is_ascii_whitespace() {
            if !current.is_empty() {
                fields.push(std::mem::take(&mut current));
                if fields.len() == 4 {
                    break;
                }
            }
        } else if current.len() < 16 {
            current.push(c as char);
        } else {
            return Err("not a PPM frame header".into());
        }
    }
    parse_ppm_header(&fields).map(Some)
}

fn parse_ppm_header(fields: &[String]) -> Result<(u32, u32), String> {
    let number = |s: &str| s.parse::<u32>().map_err(|_| format!("bad PPM header field '{s}'"));
    if fields[0] != "P6" || fields[3] != "255" {
        return Err(format!("unexpected frame format {} (max value {})", fields[0], fields[3]));
    }
    let (width, height) = (number(&fields[1])?, number(&fields[2])?);
    if width == 0 || height == 0 {
        return Err("a frame of no pixels".into());
    }
    Ok((width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn showinfo_lines_give_their_timestamps() {
        let line = "[Parsed_showinfo_1 @ 0x55db442a5980] n:   3 pts:   1536 pts_time:0.12    pos:  48 fmt:yuv420p s:64x48";
        assert_eq!(showinfo_timestamp(line), Some(0.12));
        assert_eq!(showinfo_timestamp("[Parsed_showinfo_1 @ 0x1] config in time_base: 1/2, frame_rate: 2/1"), None);
        assert_eq!(showinfo_timestamp("Stream #0:0: Video: h264"), None);
    }

    #[tokio::test]
    async fn ppm_frames_are_read_one_after_another() {
        let mut stream = Vec::new();
        for (w, h, value) in [(2u32, 1u32, 7u8), (1, 3, 9)] {
            stream.extend_from_slice(format!("P6\n{w} {h}\n255\n").as_bytes());
            stream.extend(std::iter::repeat(value).take((w * h * 3) as usize));
        }
        let mut reader = BufReader::new(&stream[..]);
        assert_eq!(read_ppm_header(&mut reader).await.unwrap(), Some((2, 1)));
        let mut pixels = vec![0; 6];
        reader.read_exact(&mut pixels).await.unwrap();
        assert_eq!(pixels, vec![7; 6]);
        assert_eq!(read_ppm_header(&mut reader).await.unwrap(), Some((1, 3)));
        let mut pixels = vec![0; 9];
        reader.read_exact(&mut pixels).await.unwrap();
        assert_eq!(read_ppm_header(&mut reader).await.unwrap(), None);
        assert!(read_ppm_header(&mut BufReader::new(&b"P6\n2 "[..])).await.is_err());
        assert!(read_ppm_header(&mut BufReader::new(&b"P5\n2 2\n255\n"[..])).await.is_err());
    }

    #[test]
    fn probe_output_is_read_and_a_clip_without_video_refused() {
        let json = br#"{"streams":[{"codec_name":"h264","width":640,"height":480,"avg_frame_rate":"10/1","r_frame_rate":"10/1","duration":"2.000000"}],"format":{"format_name":"mov,mp4","duration":"2.0"}}"#;
        let info = parse_probe(json).unwrap();
        assert_eq!((info.codec.as_str(), info.width, info.height, info.frame_rate, info.duration), ("h264", 640, 480, Some(10.0), Some(2.0)));
        assert!(matches!(parse_probe(br#"{"streams":[],"format":{}}"#), Err(VideoError::Unreadable(_))));
        assert!(matches!(parse_probe(br#"{"streams":[{"codec_name":"h264"}]}"#), Err(VideoError::Unreadable(_))));
    }
}
