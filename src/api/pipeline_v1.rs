//! A pipeline's `/v1` JSON, for a photo's answer (`predict`) and each frame of a video's (`video`).

use serde_json::{json, Value};

use crate::pipeline::PIPELINE_VERSION;
use crate::serve::pipeline::{self, PipelineRun};

/// A pipeline's `/v1` answer: each image's detections, each with its classifier's answer nested.
pub fn answer(run: &PipelineRun) -> Value {
    let results: Vec<Value> = run
        .images
        .iter()
        .map(|found| {
            let detections: Vec<Value> = found
                .iter()
                .map(|n| {
                    let mut value = serde_json::to_value(&n.detection).expect("detections serialise");
                    value["classification"] = json!({"predictions": n.predictions});
                    value
                })
                .collect();
            json!({"detections": detections})
        })
        .collect();
    let step = |s: &pipeline::StepRun| json!({"model": s.model, "version": s.version});
    let steps = json!({"detect": step(&run.detect), "classify": run.classify.as_ref().map(step)});
    json!({"model": run.name, "version": PIPELINE_VERSION, "task": "detection", "steps": steps, "results": results})
}
