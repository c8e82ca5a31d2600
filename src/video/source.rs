//! Where a live stream's frames come from, and whether the operator allows it.
//!
//! A server that opens URLs its clients name is a server-side request forgery risk: a client
//! could make it connect into the network it sits in. So streams are off unless the operator
//! names what may be opened (`--streams-allow`): `scheme://host[:port]` entries (`*` for any
//! host of a scheme), and `file:///folder` for files under a folder. Every source is checked
//! against the list before FFmpeg sees it, and FFmpeg itself is held to the protocols of the
//! source's scheme (`-protocol_whitelist`), so an RTSP URL cannot turn into a file read or an
//! HTTP playlist into a `concat:` of local files. A source's credentials (`rtsp://user:pass@`)
//! are never shown back: listings and logs carry [`StreamSource::shown`].

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use url::Url;

/// The schemes a stream may use; FFmpeg reads each of them.
const SCHEMES: [&str; 5] = ["rtsp", "rtsps", "http", "https", "file"];

/// A source a client asked for, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSource {
    url: Url,
    /// Play a file source again from its start when it ends (a file standing in for a camera).
    pub looped: bool,
}

impl StreamSource {
    pub fn parse(text: &str) -> Result<StreamSource, String> {
        let url = Url::parse(text.trim()).map_err(|e| format!("source '{}' is not a URL: {e}", shown_text(text)))?;
        if !SCHEMES.contains(&url.scheme()) {
            return Err(format!("source scheme '{}' is not one of {}", url.scheme(), SCHEMES.join(", ")));
        }
        if url.scheme() == "file" {
            let path = url.to_file_path().map_err(|_| "a file source must be an absolute path (file:///...)".to_string())?;
            if path.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err("a file source may not climb folders ('..')".into());
            }
        } else if url.host_str().unwrap_or("").is_empty() {
            return Err(format!("source '{}' names no host", shown_url(&url)));
        }
        Ok(StreamSource { url, looped: false })
    }

    pub fn scheme(&self) -> &str {
        self.url.scheme()
    }

    pub fn is_file(&self) -> bool {
        self.url.scheme() == "file"
    }

    /// The URL without its credentials, for listings and logs.
    pub fn shown(&self) -> String {
        shown_url(&self.url)
    }

    /// What FFmpeg is given before `-i` and as the input: the protocols it may use for this
    /// scheme, a socket timeout (a source that stalls ends the read, and it is reconnected),
    /// RTSP over TCP (no lost UDP packets smearing frames, and it passes firewalls), and for a
    /// file, reading at its own frame rate, as a camera would send it; and a short analysis
    /// of a network source, so its first frame comes soon after it answers.
    pub fn ffmpeg_input(&self, stall_micros: u64) -> (Vec<OsString>, OsString) {
        let mut args: Vec<OsString> = Vec::new();
        let mut arg = |a: &str| args.push(a.into());
        match self.url.scheme() {
            "rtsp" | "rtsps" => {
                arg("-protocol_whitelist");
                arg("rtsp,rtsps,rtp,srtp,tcp,udp,tls");
                arg("-rtsp_transport");
                arg("tcp");
                arg("-timeout");
                arg(&stall_micros.to_string());
                // The SDP and the first packets carry the codec's parameters; FFmpeg's default
                // 5 s of analysis made a camera's first frame (and each reconnect) ~3 s late.
                arg("-analyzeduration");
                arg("100000");
            }
            "http" | "https" => {
                // `crypto` for AES-encrypted HLS segments; `hls` reads playlists through these.
                arg("-protocol_whitelist");
                arg("http,https,tcp,tls,crypto");
                // A redirect would take the read to a host the allow-list never named (an
                // allowed server answering 302 to 169.254.169.254): refused, not followed.
                arg("-max_redirects");
                arg("0");
                arg("-rw_timeout");
                arg(&stall_micros.to_string());
                arg("-analyzeduration");
                arg("1000000");
            }
            _ => {
                arg("-protocol_whitelist");
                arg("file");
                arg("-re");
                if self.looped {
                    arg("-stream_loop");
                    arg("-1");
                }
            }
        }
        let input: OsString = match self.url.to_file_path() {
            Ok(path) if self.is_file() => path.into_os_string(),
            _ => self.url.as_str().into(),
        };
        (args, input)
    }
}

fn shown_url(url: &Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() || shown.password().is_some() {
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
    }
    shown.to_string()
}

/// A text that did not parse may still hold credentials: show only up to the `@`'s host part.
fn shown_text(text: &str) -> String {
    match (text.find("://"), text.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => format!("{}://…@{}", &text[..scheme_end], &text[at + 1..]),
        _ => text.to_string(),
    }
}

/// A URL's port, or its scheme's default (RTSP's 554 and 322, which the URL parser does not know).
fn default_port(url: &Url) -> Option<u16> {
    url.port().or(match url.scheme() {
        "rtsp" => Some(554),
        "rtsps" => Some(322),
        _ => url.port_or_known_default(),
    })
}

/// What the operator allows streams to open (`--streams-allow`); empty: streams are off.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AllowList {
    entries: Vec<Allowed>,
}

#[derive(Debug, Clone, PartialEq)]
enum Allowed {
    /// A scheme and a host (any host for `None`), on one port or any.
    Host { scheme: String, host: Option<String>, port: Option<u16> },
    /// Files under this folder.
    Folder(PathBuf),
}

impl AllowList {
    pub fn parse(entries: &[String]) -> Result<AllowList, String> {
        let mut list = AllowList::default();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (scheme, rest) = entry
                .split_once("://")
                .ok_or_else(|| format!("--streams-allow entry '{entry}' must be scheme://host[:port] or file:///folder"))?;
            let scheme = scheme.to_ascii_lowercase();
            if !SCHEMES.contains(&scheme.as_str()) {
                return Err(format!("--streams-allow entry '{entry}': scheme '{scheme}' is not one of {}", SCHEMES.join(", ")));
            }
            if scheme == "file" {
                let folder = Path::new(rest);
                if !folder.is_absolute() || folder.components().any(|c| matches!(c, Component::ParentDir)) {
                    return Err(format!("--streams-allow entry '{entry}': a file entry names an absolute folder, file:///folder"));
                }
                list.entries.push(Allowed::Folder(folder.to_path_buf()));
                continue;
            }
            let authority = rest.trim_end_matches('/');
            if authority.contains('/') || authority.contains('@') {
                return Err(format!("--streams-allow entry '{entry}' names a host (and port), not a path or credentials"));
            }
            let (host, port) = if authority == "*" {
                (None, None)
            } else {
                let url = Url::parse(&format!("{scheme}://{authority}/")).map_err(|e| format!("--streams-allow entry '{entry}': {e}"))?;
                let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| format!("--streams-allow entry '{entry}' names no host"))?;
                // A port written is that port, even the scheme's default (which the URL parser
                // drops for http and https: `http://host:80` must not mean any port).
                let written = authority.rsplit_once(':').filter(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
                (Some(host.to_ascii_lowercase()), written.and_then(|_| default_port(&url)))
            };
            list.entries.push(Allowed::Host { scheme, host, port });
        }
        Ok(list)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `source` may be opened. Hosts compare by name as written, so an entry
    /// `rtsp://camera.local` does not allow `rtsp://10.0.0.7` even where one resolves to the
    /// other (SECURITY.md says what a name entry still trusts: the DNS).
    pub fn allows(&self, source: &StreamSource) -> bool {
        let url = &source.url;
        self.entries.iter().any(|allowed| match allowed {
            // Compared as the file system resolves them, so a link out of the folder is not in it.
            Allowed::Folder(folder) => {
                let folder = std::fs::canonicalize(folder).unwrap_or_else(|_| folder.clone());
                url.scheme() == "file" && url.to_file_path().ok().and_then(|p| std::fs::canonicalize(p).ok()).is_some_and(|p| p.starts_with(&folder))
            }
            Allowed::Host { scheme, host, port } => {
                scheme == url.scheme()
                    && host.as_deref().is_none_or(|h| url.host_str().is_some_and(|u| u.eq_ignore_ascii_case(h)))
                    && port.is_none_or(|p| default_port(url) == Some(p))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn source(text: &str) -> StreamSource {
        StreamSource::parse(text).unwrap()
    }

    #[test]
    fn the_allow_list_matches_scheme_host_and_port() {
        let dir = tempfile::tempdir().unwrap();
        let clips = dir.path().join("clips");
        std::fs::create_dir_all(&clips).unwrap();
        std::fs::create_dir_all(dir.path().join("clipsx")).unwrap();
        for file in ["clips/lobby.mp4", "clipsx/lobby.mp4"] {
            std::fs::write(dir.path().join(file), b"").unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", clips.join("out.mp4")).unwrap();
        let root = dir.path().display();
        let folder = format!("file://{}", clips.display());
        let allowed = list(&["rtsp://camera.local", "rtsp://127.0.0.1:8554", "https://*", &folder]);
        assert!(allowed.allows(&source("rtsp://camera.local/stream1")));
        assert!(allowed.allows(&source("rtsp://user:secret@CAMERA.local:554/stream1")));
        assert!(allowed.allows(&source("rtsp://127.0.0.1:8554/live")));
        assert!(!allowed.allows(&source("rtsp://127.0.0.1:9000/live")), "another port");
        assert!(!allowed.allows(&source("rtsp://127.0.0.1/live")), "the default port is not 8554");
        let ports = list(&["http://camera.local:80", "rtsp://nvr.local:554"]);
        assert!(ports.allows(&source("http://camera.local/feed.mjpg")));
        assert!(!ports.allows(&source("http://camera.local:8080/feed.mjpg")), "an entry's port 80 is not any port");
        assert!(ports.allows(&source("rtsp://nvr.local/s1")), "RTSP's default port is 554");
        assert!(!ports.allows(&source("rtsp://nvr.local:8554/s1")));
        assert!(!allowed.allows(&source("rtsps://camera.local/stream1")), "another scheme");
        assert!(!allowed.allows(&source("http://camera.local/feed.mjpg")));
        assert!(allowed.allows(&source("https://cdn.example/live/index.m3u8")));
        assert!(allowed.allows(&source(&format!("file://{root}/clips/lobby.mp4"))));
        assert!(!allowed.allows(&source(&format!("file://{root}/clipsx/lobby.mp4"))), "a folder is not a prefix of a name");
        assert!(!allowed.allows(&source(&format!("file://{root}/clips/out.mp4"))), "a link out of the folder");
        assert!(!allowed.allows(&source(&format!("file://{root}/clips/../clipsx/lobby.mp4"))));
        assert!(!allowed.allows(&source("file:///etc/passwd")));
        assert!(!list(&[]).allows(&source("rtsp://camera.local/s")));
        assert!(list(&[]).is_empty());
    }

    #[test]
    fn bad_sources_and_entries_are_refused() {
        for bad in ["camera.local/stream", "ftp://host/x", "concat:/a|/b", "rtsp:///path"] {
            assert!(StreamSource::parse(bad).is_err(), "{bad}");
        }
        for bad in ["camera.local", "ftp://host", "rtsp://host/path", "file://relative", "rtsp://user@host"] {
            assert!(AllowList::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_are_never_shown() {
        assert_eq!(source("rtsp://admin:hunter2@camera.local/s1").shown(), "rtsp://camera.local/s1");
        let error = StreamSource::parse("rtsp://admin:hunter2@[bad/s1").unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn ffmpeg_is_held_to_the_schemes_protocols() {
        let (args, input) = source("rtsp://camera.local/s1").ffmpeg_input(5_000_000);
        let args: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(&args[..4], ["-protocol_whitelist", "rtsp,rtsps,rtp,srtp,tcp,udp,tls", "-rtsp_transport", "tcp"]);
        assert_eq!(input, "rtsp://camera.local/s1");
        let (args, _) = source("https://cdn.example/live.m3u8").ffmpeg_input(5_000_000);
        let args: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(&args[..4], ["-protocol_whitelist", "http,https,tcp,tls,crypto", "-max_redirects", "0"]);
        let mut file = source("file:///srv/clips/a%20b.mp4");
        file.looped = true;
        let (args, input) = file.ffmpeg_input(5_000_000);
        assert!(args.iter().any(|a| a == "-re") && args.iter().any(|a| a == "-stream_loop"));
        assert_eq!(input, "/srv/clips/a b.mp4");
    }
}
