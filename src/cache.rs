//! The response cache: each image's finished result (and, apart, each rendered overlay) for one
//! model version and the parameters that decide it, in a least-recently-used map bounded in
//! bytes (`--response-cache-bytes`, off at 0).
//!
//! What is cached is the protocol-neutral [`Finished`] result, so every protocol and output
//! format shapes it per request and needs no key of its own. The key holds a SHA-256 of the
//! image's bytes — never a fast non-cryptographic hash: a crafted collision would hand one
//! user's answer to another — with the model, its version, the version's load generation (a
//! reloaded version is another generation, so nothing from before the reload can be served),
//! and the parameters that change the result. Only successes are stored.

use std::sync::Mutex;

use lru::LruCache;
use sha2::{Digest, Sha256};

use crate::metrics as m;
use crate::tasks::{Finished, PredictParams};

/// What one entry holds.
#[derive(Clone)]
pub enum Cached {
    Result(Finished),
    /// A rendered overlay's PNG bytes.
    Overlay(bytes::Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    model: String,
    version: String,
    generation: u64,
    image: [u8; 32],
    /// The parameters that change the finished result (not those that only format it).
    params: [u64; 6],
    overlay: bool,
}

impl CacheKey {
    /// `image` is whatever identifies the image exactly: its encoded bytes, or its pixels with
    /// their shape.
    pub fn new(model: &str, version: &str, generation: u64, image: &[&[u8]], params: &PredictParams, overlay: bool) -> CacheKey {
        let mut hasher = Sha256::new();
        for part in image {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        CacheKey {
            model: model.to_string(),
            version: version.to_string(),
            generation,
            image: hasher.finalize().into(),
            params: [
                params.top_k as u64,
                u64::from(params.score_threshold.to_bits()),
                u64::from(params.iou_threshold.to_bits()),
                params.max_detections as u64,
                u64::from(params.pixel_confidence),
                slicing_fingerprint(params),
            ],
            overlay,
        }
    }
}

/// Slicing, as one number of the key: 0 when the request does not slice. Any two slicings that
/// differ in a field differ here (a hash of every field, within this process's cache).
fn slicing_fingerprint(params: &PredictParams) -> u64 {
    use std::hash::{Hash, Hasher};
    let Some(slicing) = params.slicing else { return 0 };
    let mut hasher = std::hash::DefaultHasher::new();
    format!("{slicing:?}").hash(&mut hasher);
    hasher.finish() | 1
}

/// The bytes an entry holds, roughly: what decides the budget.
fn cost(key: &CacheKey, value: &Cached) -> usize {
    const ENTRY: usize = 160;
    let value = match value {
        Cached::Overlay(png) => png.len(),
        Cached::Result(Finished::Classification { scores, top }) => scores.len() * 4 + top.iter().map(|p| 32 + p.label.len()).sum::<usize>(),
        Cached::Result(Finished::Detection { detections }) => detections.iter().map(|d| 48 + d.label.len()).sum(),
        Cached::Result(Finished::Segmentation { mask }) => mask.labels.len() + mask.confidence.len() * 4,
        Cached::Result(Finished::Embedding { vector }) => vector.len() * 4,
        Cached::Result(Finished::InstanceSegmentation { instances }) => {
            instances.iter().map(|i| 48 + i.detection.label.len() + i.mask.bits.len()).sum()
        }
        // The schema is shared with the model (an Arc), not the entry's own.
        Cached::Result(Finished::Keypoints { poses, .. }) => poses.iter().map(|p| 48 + p.detection.label.len() + p.points.len() * 12).sum(),
        Cached::Result(Finished::OrientedDetection { detections }) => detections.iter().map(|d| 68 + d.detection.label.len()).sum(),
    };
    ENTRY + key.model.len() + key.version.len() + value
}

pub struct ResponseCache {
    capacity: usize,
    inner: Mutex<Entries>,
}

struct Entries {
    map: LruCache<CacheKey, (Cached, usize)>,
    bytes: usize,
}

impl ResponseCache {
    /// A cache of at most `capacity` bytes; `None` when 0 (off).
    pub fn new(capacity: usize) -> Option<ResponseCache> {
        (capacity > 0).then(|| ResponseCache { capacity, inner: Mutex::new(Entries { map: LruCache::unbounded(), bytes: 0 }) })
    }

    /// The entry, counted as a hit or a miss.
    pub fn get(&self, key: &CacheKey) -> Option<Cached> {
        let found = self.inner.lock().unwrap().map.get(key).map(|(value, _)| value.clone());
        let counter = if found.is_some() { m::CACHE_HITS } else { m::CACHE_MISSES };
        metrics::counter!(counter, "model" => key.model.clone()).increment(1);
        found
    }

    /// Stores an entry, evicting the least recently used until the budget holds. An entry
    /// larger than the whole budget is not stored.
    pub fn put(&self, key: CacheKey, value: Cached) {
        let size = cost(&key, &value);
        if size > self.capacity {
            return;
        }
        let mut entries = self.inner.lock().unwrap();
        if let Some((_, old)) = entries.map.put(key, (value, size)) {
            entries.bytes -= old;
        }
        entries.bytes += size;
        let mut evicted = 0u64;
        while entries.bytes > self.capacity {
            let Some((_, (_, freed))) = entries.map.pop_lru() else { break };
            entries.bytes -= freed;
            evicted += 1;
        }
        metrics::counter!(m::CACHE_EVICTIONS).increment(evicted);
        metrics::gauge!(m::CACHE_BYTES).set(entries.bytes as f64);
    }

    /// Drops every entry of a model (a reload, an unload, a new version).
    pub fn invalidate(&self, model: &str) {
        let mut entries = self.inner.lock().unwrap();
        let stale: Vec<CacheKey> = entries.map.iter().filter(|(k, _)| k.model == model).map(|(k, _)| k.clone()).collect();
        for key in stale {
            if let Some((_, size)) = entries.map.pop(&key) {
                entries.bytes -= size;
            }
        }
        metrics::gauge!(m::CACHE_BYTES).set(entries.bytes as f64);
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap().bytes
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::Prediction;

    fn result(score: f32) -> Cached {
        Cached::Result(Finished::Classification { scores: vec![score; 10], top: vec![Prediction { index: 0, label: "cat".into(), score }] })
    }

    fn key(image: &[u8], params: &PredictParams) -> CacheKey {
        CacheKey::new("m", "1", 7, &[image], params, false)
    }

    #[test]
    fn keys_differ_by_image_params_generation_and_kind() {
        let params = PredictParams::default();
        assert_eq!(key(b"a", &params), key(b"a", &params));
        assert_ne!(key(b"a", &params), key(b"b", &params));
        let other = PredictParams { top_k: 3, ..params };
        assert_ne!(key(b"a", &params), key(b"a", &other));
        // The mask's encoding only formats the result: the same entry serves both.
        let formatted = PredictParams { mask_format: crate::tasks::segmentation::MaskFormat::Rle, ..params };
        assert_eq!(key(b"a", &params), key(b"a", &formatted));
        assert_ne!(key(b"a", &params), CacheKey::new("m", "1", 8, &[b"a"], &params, false));
        assert_ne!(key(b"a", &params), CacheKey::new("m", "1", 7, &[b"a"], &params, true));
        // Parts are length-prefixed: ("ab", "c") is not ("a", "bc").
        assert_ne!(CacheKey::new("m", "1", 7, &[b"ab", b"c"], &params, false), CacheKey::new("m", "1", 7, &[b"a", b"bc"], &params, false));
    }

    #[test]
    fn the_byte_budget_holds_and_the_least_recent_goes_first() {
        let params = PredictParams::default();
        let one = cost(&key(b"0", &params), &result(0.5));
        let cache = ResponseCache::new(one * 3).unwrap();
        for i in 0..3u8 {
            cache.put(key(&[i], &params), result(0.5));
        }
        assert!(cache.get(&key(&[0], &params)).is_some()); // 0 is now the most recent
        cache.put(key(&[3], &params), result(0.5));
        assert!(cache.bytes() <= one * 3 && cache.len() == 3);
        assert!(cache.get(&key(&[1], &params)).is_none(), "the least recently used went first");
        assert!(cache.get(&key(&[0], &params)).is_some());
        for i in 10..200u8 {
            cache.put(key(&[i], &params), result(0.5));
            assert!(cache.bytes() <= one * 3);
        }
        cache.invalidate("m");
        assert!(cache.is_empty() && cache.bytes() == 0);
        assert!(ResponseCache::new(0).is_none());
    }
}
