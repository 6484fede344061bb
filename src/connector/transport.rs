//! The one path by which a poll's requests (pages and OAuth2 tokens) reach
//! an upstream: live, live and recorded into a cassette (`pollhook
//! record`), or answered from a cassette (`pollhook test --replay`).
//!
//! Why an enum of borrows: the daemon's hot path stays a direct reqwest
//! call (one match, no boxing, no allocation per request), while record
//! and replay see exactly the requests the real pipeline builds.

use reqwest::header::HeaderMap;
use reqwest::StatusCode;

use super::cassette::{Cassette, Recorder};

/// Where requests go.
#[derive(Clone, Copy)]
pub enum Transport<'a> {
    /// The network (the daemon, `pollhook test`).
    Live(&'a reqwest::Client),
    /// The network, each exchange kept by the recorder.
    Record(&'a reqwest::Client, &'a Recorder),
    /// No network: each request answered by the cassette's next exchange.
    Replay(&'a Cassette),
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The network failed (connect, timeout, body), as
    /// `transport_detail` words it.
    #[error("{0}")]
    Network(String),
    /// Replay: the cassette has no exchange for this request, or the next
    /// one is for another request.
    #[error("{0}")]
    Cassette(super::cassette::Mismatch),
}

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadError {
    #[error("larger than the cap")]
    TooLarge,
    #[error("{0}")]
    Network(String),
}

/// An answer: status and headers at once, the body when read.
pub enum Reply {
    Live(reqwest::Response),
    Canned(Canned),
}

/// An answer already read (recorded or replayed).
#[derive(Debug, Clone)]
pub struct Canned {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body, or why reading it failed when it was recorded.
    pub body: Result<Vec<u8>, ReadError>,
}

/// What a request is for: a cassette answers a poll's page requests in
/// order, and token requests from its recorded tokens whenever the token
/// cache asks (its clock is not the cassette's, so when it asks may
/// differ from the recording).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Page,
    Token,
}

impl Transport<'_> {
    /// Sends a page request. `cap` bounds what a recording reads of the
    /// body (the most the caller will read of it); a live answer is read
    /// later, streaming, by [`Reply::read_capped`].
    pub async fn send(&self, req: reqwest::Request, cap: u64) -> Result<Reply, SendError> {
        self.send_for(Purpose::Page, req, cap).await
    }

    /// Sends `req`, made for `purpose`.
    pub async fn send_for(
        &self,
        purpose: Purpose,
        req: reqwest::Request,
        cap: u64,
    ) -> Result<Reply, SendError> {
        match self {
            Transport::Live(client) => client
                .execute(req)
                .await
                .map(Reply::Live)
                .map_err(|e| SendError::Network(crate::transport_detail(&e))),
            Transport::Record(client, recorder) => {
                let method = req.method().clone();
                let url = req.url().clone();
                let sent_headers = req.headers().clone();
                let sent_body = req.body().and_then(|b| b.as_bytes()).map(<[u8]>::to_vec);
                let resp = client
                    .execute(req)
                    .await
                    .map_err(|e| SendError::Network(crate::transport_detail(&e)))?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = read_live(resp, cap).await;
                let canned = Canned {
                    status,
                    headers,
                    body,
                };
                let sent = super::cassette::Sent {
                    purpose,
                    method: &method,
                    url: &url,
                    headers: &sent_headers,
                    body: sent_body.as_deref(),
                };
                recorder.record(sent, &canned);
                Ok(Reply::Canned(canned))
            }
            Transport::Replay(cassette) => match purpose {
                Purpose::Page => cassette.answer(req.method(), req.url()),
                Purpose::Token => cassette.answer_token(req.method(), req.url()),
            }
            .map(Reply::Canned)
            .map_err(SendError::Cassette),
        }
    }
}

impl Reply {
    pub fn status(&self) -> StatusCode {
        match self {
            Reply::Live(r) => r.status(),
            Reply::Canned(c) => c.status,
        }
    }

    pub fn headers(&self) -> &HeaderMap {
        match self {
            Reply::Live(r) => r.headers(),
            Reply::Canned(c) => &c.headers,
        }
    }

    /// Reads the body, refusing more than `limit` bytes (checked against
    /// `Content-Length` first, then while streaming, so a lying or missing
    /// length cannot make pollhook buffer an unbounded body).
    pub async fn read_capped(self, limit: u64) -> Result<Vec<u8>, ReadError> {
        match self {
            Reply::Live(r) => read_live(r, limit).await,
            Reply::Canned(c) => match c.body {
                Ok(b) if b.len() as u64 > limit => Err(ReadError::TooLarge),
                other => other,
            },
        }
    }
}

async fn read_live(mut resp: reqwest::Response, limit: u64) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(ReadError::TooLarge);
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ReadError::Network(crate::transport_detail(&e)))?
    {
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}
