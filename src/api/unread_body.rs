//! Every upload is read before its answer goes back. A handler may answer without reading the
//! body — an unknown model, a refused credential, an unknown route, a model too busy to admit
//! the request — and the server would then close the connection with the upload half sent:
//! the client, still writing, sees a broken pipe instead of the 404 or 503. Here the unread
//! rest of the body comes back when the handler lets go of it, and is read and dropped (up to
//! the body limit once more, and within the body timeout) before the answer is sent, so the
//! client always reads its answer. A body over the limit is drained the same way after its 413.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::oneshot;

/// The middleware; the state is how many unread bytes are drained at most.
pub async fn read_before_answering(State(drain_limit): State<usize>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let (give_back, mut given_back) = oneshot::channel();
    let body = Body::new(ReturnedIfUnread { inner: Some(body), give_back: Some(give_back) });
    let response = next.run(Request::from_parts(parts, body)).await;
    // The handler has answered and so let go of the body; if unread, the rest is here.
    if let Ok(rest) = given_back.try_recv() {
        let drained = drain(rest, drain_limit).await;
        tracing::debug!(drained, status = response.status().as_u16(), "read the unread rest of an upload before answering");
    }
    response
}

/// Reads and drops what is left of a body, `limit` bytes at most; the bytes read.
async fn drain(mut body: Body, limit: usize) -> usize {
    let mut read = 0;
    while read <= limit {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
            // The client went away or the body timeout fired: nothing more to read.
            Some(Err(_)) | None => break,
        }
    }
    read
}

/// A request body that, dropped before its end, hands what is left back to the middleware.
struct ReturnedIfUnread {
    inner: Option<Body>,
    give_back: Option<oneshot::Sender<Body>>,
}

impl http_body::Body for ReturnedIfUnread {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // Read to its end (or broken): nothing to give back.
            self.give_back.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for ReturnedIfUnread {
    fn drop(&mut self) {
        if let (Some(give_back), Some(inner)) = (self.give_back.take(), self.inner.take()) {
            if !inner.is_end_stream() {
                let _ = give_back.send(inner);
            }
        }
    }
}
