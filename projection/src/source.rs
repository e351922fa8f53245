//! The source of truth for gap repair: Keel's `GET /v1/batches/{seq}`, which answers a
//! committed batch as the same hash-verified batch message the publisher sends.

use keel_engine::{BatchMessage, FormatError, decode_batch_message};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source `{url}`: {detail}")]
    Client { url: String, detail: String },
    #[error("fetching batch {seq} from the source: {detail}")]
    Transport { seq: u64, detail: String },
    #[error("the source answered {status} for batch {seq}")]
    Status { seq: u64, status: u16 },
    #[error("the source's batch {seq} does not verify: {error}")]
    Invalid { seq: u64, error: FormatError },
}

/// A Keel server to fetch committed batches from.
#[derive(Clone, Debug)]
pub struct Source {
    client: reqwest::Client,
    base_url: String,
}

impl Source {
    /// `base_url` is the server's root, e.g. `http://127.0.0.1:8080` or `https://keel:8443`.
    pub fn new(
        base_url: &str,
        options: &crate::http_client::ClientOptions,
    ) -> Result<Self, SourceError> {
        let client = crate::http_client::builder(options)
            .map_err(|e| SourceError::Client {
                url: base_url.to_owned(),
                detail: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| SourceError::Client {
                url: base_url.to_owned(),
                detail: e.to_string(),
            })?;
        Ok(Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.base_url
    }

    /// Batch `seq`, verified; `None` when the source has not committed it.
    pub async fn batch(&self, seq: u64) -> Result<Option<BatchMessage>, SourceError> {
        let url = format!("{}/v1/batches/{seq}", self.base_url);
        let transport = |e: reqwest::Error| SourceError::Transport {
            seq,
            detail: e.to_string(),
        };
        let response = self.client.get(&url).send().await.map_err(transport)?;
        match response.status().as_u16() {
            200 => {
                let bytes = response.bytes().await.map_err(transport)?;
                let message = decode_batch_message(&bytes)
                    .map_err(|error| SourceError::Invalid { seq, error })?;
                if message.header.seq != seq {
                    let error = FormatError(format!(
                        "asked for batch {seq}, got batch {}",
                        message.header.seq
                    ));
                    return Err(SourceError::Invalid { seq, error });
                }
                Ok(Some(message))
            }
            404 => Ok(None),
            status => Err(SourceError::Status { seq, status }),
        }
    }
}
