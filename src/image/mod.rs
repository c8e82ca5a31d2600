//! Image handling that needs no model: decoding untrusted bytes, and turning an image into the
//! exact tensor layout a model's config asks for, plus the geometry to map results back.

pub mod decode;
pub mod preprocess;

pub use decode::{decode_image, decode_scaled, DecodeError, DecodeLimits, Decoded};
pub use preprocess::{decode_size_needed, preprocess, preprocess_decoded, Geometry, PreparedImage};
