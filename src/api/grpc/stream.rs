//! `ModelStreamInfer`: the frames of one bidirectional stream (a video, say) answered in the
//! order they came, each with its `id`, while several run at once.
//!
//! A reader task takes frames off the stream and starts each one's inference; the response
//! stream hands the answers back in arrival order. A permit per frame, held from its arrival
//! until its answer is handed to the transport, bounds the frames in flight
//! (`--grpc-stream-max-in-flight`): queued, running and answered-but-unsent together, so
//! neither a fast sender nor a slow reader makes one stream hold more.
//!
//! A frame that fails (refused, bad input, deadline) gets its error in its own response's
//! `error_message` and the stream goes on, as Triton does. When the client goes away, the
//! response stream is dropped, and with it the reader and every frame's task: their queued
//! jobs are skipped by the workers (the engine skips a job whose caller is gone).

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::infer::{infer_one, request_span};
use super::proto::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};
use super::status::rename_oversized;
use crate::api::AppState;
use crate::serve::{Deadline, RequestContext};

pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

/// A task that is cancelled when its handle is dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the reader passes on, in arrival order.
enum Next {
    /// A frame's inference, answered with the permit it holds.
    Frame(AbortOnDrop<(ModelStreamInferResponse, OwnedSemaphorePermit)>),
    /// The stream itself broke (a message over the size limit, a protocol error): the call
    /// ends with this status once the frames before it are answered.
    End(Status),
}

/// Answers `inbound`'s frames in order, at most `max_in_flight` at once, each within the
/// call's deadline and the server's default timeout from its own arrival.
pub fn answer_in_order(
    state: AppState,
    inbound: Streaming<ModelInferRequest>,
    call_deadline: Deadline,
    metadata: axum::http::HeaderMap,
    max_in_flight: usize,
) -> ResponseStream {
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let (sender, receiver) = mpsc::unbounded_channel();
    let reader = AbortOnDrop(tokio::spawn(read_frames(state, inbound, call_deadline, metadata, permits, sender)));
    Box::pin(futures_util::stream::unfold((receiver, reader), |(mut receiver, reader)| async move {
        let answer = match receiver.recv().await? {
            Next::Frame(mut frame) => match (&mut frame.0).await {
                // The permit is released once the answer is handed over.
                Ok((response, _permit)) => Ok(response),
                Err(e) => Ok(error_frame(String::new(), format!("the frame's task failed: {e}"))),
            },
            Next::End(status) => Err(status),
        };
        Some((answer, (receiver, reader)))
    }))
}

async fn read_frames(
    state: AppState,
    mut inbound: Streaming<ModelInferRequest>,
    call_deadline: Deadline,
    metadata: axum::http::HeaderMap,
    permits: Arc<Semaphore>,
    sender: mpsc::UnboundedSender<Next>,
) {
    loop {
        // Wait for room before reading more: a stream over its bound stops being read,
        // and HTTP/2 flow control slows the sender.
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
        let frame = match inbound.message().await {
            Ok(Some(frame)) => frame,
            // The client finished sending; the answers still coming end the stream.
            Ok(None) => return,
            Err(status) => {
                let _ = sender.send(Next::End(rename_oversized(status)));
                return;
            }
        };
        let context = frame_context(&state, &frame, call_deadline);
        let span = request_span("ModelStreamInfer", &frame.model_name, &context, &metadata);
        let state = state.clone();
        let task = tokio::spawn(
            async move {
                let (id, model_name, model_version) = (frame.id.clone(), frame.model_name.clone(), frame.model_version.clone());
                let response = match infer_one(&state, frame, &context).await {
                    Ok((response, _metadata)) => ModelStreamInferResponse { error_message: String::new(), infer_response: Some(response) },
                    Err(status) => {
                        let mut response = error_frame(id, status.message().to_string());
                        if let Some(r) = response.infer_response.as_mut() {
                            (r.model_name, r.model_version) = (model_name, model_version);
                        }
                        response
                    }
                };
                (response, permit)
            }
            .instrument(span),
        );
        if sender.send(Next::Frame(AbortOnDrop(task))).is_err() {
            return;
        }
    }
}

/// A frame's deadline: the server's default from its arrival, within the call's own.
fn frame_context(state: &AppState, frame: &ModelInferRequest, call_deadline: Deadline) -> RequestContext {
    let request_id = if frame.id.is_empty() { uuid::Uuid::new_v4().to_string() } else { frame.id.clone() };
    RequestContext { deadline: call_deadline.within(state.limits.request_timeout_ms), request_id }
}

/// A frame's failure, in its own response: the message, and the frame's id so a client can
/// tell which one failed.
fn error_frame(id: String, message: String) -> ModelStreamInferResponse {
    ModelStreamInferResponse { error_message: message, infer_response: Some(ModelInferResponse { id, ..Default::default() }) }
}
