//! Classification: the top-k of a probability vector.

use serde::Serialize;

use super::label_for;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    pub index: usize,
    pub label: String,
    pub score: f32,
}

/// The `k` highest scores, best first; ties keep the lower index first, as `torch.topk` does
/// on CPU for distinct values.
pub fn top_k(probabilities: &[f32], k: usize, labels: &[String]) -> Vec<Prediction> {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    let k = k.min(order.len());
    let by_score_desc = |a: &usize, b: &usize| {
        probabilities[*b].total_cmp(&probabilities[*a]).then(a.cmp(b))
    };
    if k < order.len() && k > 0 {
        order.select_nth_unstable_by(k - 1, by_score_desc);
    }
    order.truncate(k);
    order.sort_by(by_score_desc);
    order
        .into_iter()
        .map(|index| Prediction { index, label: label_for(labels, index), score: probabilities[index] })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_best_k_in_order_with_labels() {
        let labels: Vec<String> = ["cat", "dog", "cup", "car"].iter().map(|s| s.to_string()).collect();
        let top = top_k(&[0.1, 0.5, 0.15, 0.25], 3, &labels);
        let names: Vec<&str> = top.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(names, ["dog", "car", "cup"]);
        assert_eq!(top[0].index, 1);
        assert_eq!(top[0].score, 0.5);
    }

    #[test]
    fn k_larger_than_classes_returns_all_and_missing_labels_use_the_index() {
        let top = top_k(&[0.2, 0.8], 10, &[]);
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].label, "1");
    }

    #[test]
    fn zero_k_is_empty() {
        assert!(top_k(&[0.2, 0.8], 0, &[]).is_empty());
    }
}
