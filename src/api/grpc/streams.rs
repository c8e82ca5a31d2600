//! `visionserve.streams.v1.Streams` (`proto/streams.proto`): a live stream's events as a gRPC
//! server stream, for clients that speak gRPC and not SSE. A shell over the same subscription
//! the REST routes follow (`api::streams::follow`): the same replay, the same `lagged`, the
//! same JSON. Streams are started, listed and stopped over REST.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::proto::streams::streams_server::Streams;
use super::proto::streams::{FollowRequest, StreamEvent};
use super::status::{bearer, refusal, to_status};
use crate::api::auth::check_api_key;
use crate::api::streams::follow;
use crate::api::AppState;

pub struct StreamsService {
    state: AppState,
}

impl StreamsService {
    pub fn new(state: AppState) -> StreamsService {
        StreamsService { state }
    }
}

#[tonic::async_trait]
impl Streams for StreamsService {
    type FollowStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, Status>> + Send>>;

    async fn follow(&self, request: Request<FollowRequest>) -> Result<Response<Self::FollowStream>, Status> {
        check_api_key(&self.state, bearer(request.metadata())).map_err(|r| refusal(r, "streams"))?;
        let request = request.into_inner();
        let stream = self.state.streams.get(&request.stream_id).map_err(to_status)?;
        let events = follow(stream, request.last_event_id).map(|out| {
            Ok(StreamEvent { id: out.number.unwrap_or(0), event: out.kind.to_string(), json: out.body.to_string() })
        });
        Ok(Response::new(Box::pin(events)))
    }
}
