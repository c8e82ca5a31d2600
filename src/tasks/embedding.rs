//! Embeddings: one vector per image, L2-normalised so that a dot product is a cosine
//! similarity, and the top-k of those similarities between posted images.

use serde::Serialize;

/// A model answered NaN or infinity: its output is unusable, and that is the model's fault,
/// never the client's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("embedding component {index} is not finite ({value})")]
pub struct NotFinite {
    pub index: usize,
    pub value: f32,
}

/// Checks every component is finite, then scales to length 1 when `normalize` is set. An
/// all-zero vector has no direction and stays zero (its cosine with anything is 0).
pub fn prepare(mut vector: Vec<f32>, normalize: bool) -> Result<Vec<f32>, NotFinite> {
    if let Some((index, &value)) = vector.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(NotFinite { index, value });
    }
    if normalize {
        // Summed in f64: 1280 squares in f32 lose the last digits torch keeps.
        let norm = vector.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
        if norm > 0.0 {
            for v in &mut vector {
                *v = (f64::from(*v) / norm) as f32;
            }
        }
    }
    Ok(vector)
}

/// Cosine similarity of two vectors of one length (0 when either is all zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        (dot / (aa.sqrt() * bb.sqrt())) as f32
    }
}

/// One neighbour of a query image among the set it was compared with.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Neighbour {
    /// Position of the neighbour in the compared set, as posted.
    pub index: usize,
    pub similarity: f32,
}

/// For each query, the `k` most similar vectors of `set`, most similar first (ties: lower
/// index first). `skip_self` leaves out the query's own position, for a set compared with
/// itself.
pub fn nearest(queries: &[Vec<f32>], set: &[Vec<f32>], k: usize, skip_self: bool) -> Vec<Vec<Neighbour>> {
    queries
        .iter()
        .enumerate()
        .map(|(q, query)| {
            let mut found: Vec<Neighbour> = set
                .iter()
                .enumerate()
                .filter(|(i, _)| !(skip_self && *i == q))
                .map(|(index, v)| Neighbour { index, similarity: cosine(query, v) })
                .collect();
            found.sort_by(|a, b| b.similarity.total_cmp(&a.similarity).then(a.index.cmp(&b.index)));
            found.truncate(k);
            found
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalising_gives_length_one_and_keeps_the_direction() {
        let v = prepare(vec![3.0, 4.0], true).unwrap();
        assert_eq!(v, [0.6, 0.8]);
        assert_eq!(prepare(vec![3.0, 4.0], false).unwrap(), [3.0, 4.0]);
    }

    #[test]
    fn a_zero_vector_stays_zero_and_a_nan_is_refused() {
        assert_eq!(prepare(vec![0.0; 3], true).unwrap(), [0.0; 3]);
        let nan = prepare(vec![1.0, f32::NAN], true).unwrap_err();
        assert_eq!(nan.index, 1);
        assert!(nan.to_string().contains("component 1 is not finite"), "{nan}");
        assert!(prepare(vec![f32::INFINITY], false).is_err());
    }

    #[test]
    fn cosine_of_parallel_orthogonal_and_zero_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 5.0]), 0.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
        assert!((cosine(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-6);
    }

    #[test]
    fn nearest_orders_by_similarity_skips_self_and_caps_at_k() {
        let set = vec![vec![1.0, 0.0], vec![0.9, 0.1], vec![0.0, 1.0], vec![1.0, 0.0]];
        let found = nearest(&set, &set, 2, true);
        assert_eq!(found[0].iter().map(|n| n.index).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(found[2].iter().map(|n| n.index).collect::<Vec<_>>(), [1, 0]);
        assert!(found.iter().all(|f| f.len() == 2));
        // Against another set, the query's own position is not special.
        let other = nearest(&[vec![1.0, 0.0]], &set, 10, false);
        assert_eq!(other[0].iter().map(|n| n.index).collect::<Vec<_>>(), [0, 3, 1, 2]);
    }
}
