//! API keys: the key file, scopes, the check on every request, and reload without restart.
//!
//! A key is `keel_` followed by 64 hex digits (32 random bytes). The key file stores only its
//! BLAKE3 hash, so a leaked file does not leak a key; the keys are random, so a fast hash is
//! enough (a password hash guards guessable secrets, and these are not guessable). A request's
//! key is hashed and compared with every live key's hash in constant time, all of them, so the
//! answer's timing says nothing about which hash bytes matched.
//!
//! The file (docs/API.md, "Authentication"):
//!
//! ```json
//! {"version": 1, "keys": [
//!   {"id": "orders", "hash": "blake3:…", "scopes": ["write", "read"],
//!    "created_at": "2026-12-01T18:00:00Z", "revoked_at": null}
//! ]}
//! ```

use crate::http::ApiError;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use subtle::ConstantTimeEq;

/// What a key may do. Each route needs exactly one scope; health checks and the OpenAPI
/// document need none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `POST /v1/batches`.
    Write,
    /// `GET /v1/aggregates`, `/v1/events`, `/v1/batches`, `/v1/subscribe`.
    Read,
    /// `/metrics` and everything operational.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Write, Scope::Read, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Write => "write",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// The key file as stored.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub version: u32,
    pub keys: Vec<KeyEntry>,
}

/// One key: its id (recorded in the log for every batch it submitted to), the hash of the key,
/// its scopes, and when it was made and revoked.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub id: String,
    pub hash: String,
    pub scopes: Vec<Scope>,
    pub created_at: String,
    #[serde(default)]
    pub revoked_at: Option<String>,
}

/// The version of the key file this build reads and writes.
pub const KEY_FILE_VERSION: u32 = 1;
/// What every key starts with (so that a key is recognisable in a secret scanner).
pub const KEY_PREFIX: &str = "keel_";
const HASH_PREFIX: &str = "blake3:";
/// Longest key id: it is stored in every batch record the key submits to.
pub const KEY_ID_BYTES_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is not a valid key file: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

/// Checks a key id: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn check_key_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > KEY_ID_BYTES_MAX {
        return Err(format!(
            "key id `{id}` must be 1 to {KEY_ID_BYTES_MAX} characters"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "key id `{id}` has `{c}`; use letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// The hash stored for `key`.
pub fn hash_key(key: &str) -> String {
    format!("{HASH_PREFIX}{}", blake3::hash(key.as_bytes()).to_hex())
}

/// A new random key.
pub fn new_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{KEY_PREFIX}{}", hex::encode(bytes)))
}

impl KeyFile {
    /// Reads and checks the file: version, unique well-formed ids, well-formed hashes, at least
    /// one scope per key.
    pub fn read(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = std::fs::read(path).map_err(|source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |detail: String| KeyFileError::Invalid {
            path: path.to_owned(),
            detail,
        };
        let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if file.version != KEY_FILE_VERSION {
            return Err(invalid(format!(
                "version {} (this keel reads version {KEY_FILE_VERSION})",
                file.version
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for key in &file.keys {
            check_key_id(&key.id).map_err(&invalid)?;
            if !seen.insert(key.id.as_str()) {
                return Err(invalid(format!("key id `{}` appears twice", key.id)));
            }
            if decode_hash(&key.hash).is_none() {
                return Err(invalid(format!(
                    "key `{}`: hash must be `{HASH_PREFIX}` and 64 hex digits",
                    key.id
                )));
            }
            if key.scopes.is_empty() {
                return Err(invalid(format!("key `{}` has no scope", key.id)));
            }
        }
        Ok(file)
    }

    /// Writes the file atomically (a temporary file in the same directory, fsynced, renamed
    /// over the old one, the directory fsynced), readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<(), KeyFileError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "keys".into());
        let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| io(e.into()))?;
        text.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io)?;
        let written = file.write_all(&text).and_then(|()| file.sync_all());
        drop(file);
        if let Err(e) = written.and_then(|()| std::fs::rename(&temporary, path)) {
            let _ = std::fs::remove_file(&temporary);
            return Err(io(e));
        }
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

fn decode_hash(text: &str) -> Option<[u8; 32]> {
    let hex_digits = text.strip_prefix(HASH_PREFIX)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut out).ok()?;
    Some(out)
}

/// A live (not revoked) key as the server holds it.
struct LiveKey {
    id: Arc<str>,
    hash: [u8; 32],
    scopes: Vec<Scope>,
}

/// The keys in force: loaded at start, swapped whole on reload.
pub struct Keys {
    live: Vec<LiveKey>,
}

impl Keys {
    pub fn from_file(file: &KeyFile) -> Self {
        let live = file
            .keys
            .iter()
            .filter(|k| k.revoked_at.is_none())
            .filter_map(|k| {
                Some(LiveKey {
                    id: Arc::from(k.id.as_str()),
                    hash: decode_hash(&k.hash)?,
                    scopes: k.scopes.clone(),
                })
            })
            .collect();
        Self { live }
    }

    /// The key whose hash is `key`'s, compared with every live key in constant time.
    fn find(&self, key: &str) -> Option<&LiveKey> {
        let hash = blake3::hash(key.as_bytes());
        let mut found = None;
        for candidate in &self.live {
            if bool::from(candidate.hash.ct_eq(hash.as_bytes())) {
                found = Some(candidate);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// The authenticated caller of a request, put into the request's extensions: the key id that
/// `POST /v1/batches` records in the batch it commits to.
#[derive(Clone, Debug)]
pub struct Caller(pub Arc<str>);

/// The server's keys and where they come from.
pub struct Auth {
    path: PathBuf,
    keys: RwLock<Arc<Keys>>,
}

impl Auth {
    /// Loads `path`; an unreadable or invalid file is an error (the server does not start).
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let keys = Keys::from_file(&KeyFile::read(path)?);
        if keys.is_empty() {
            tracing::warn!(file = %path.display(), "the key file has no live key: every request that needs one gets 401");
        }
        Ok(Self {
            path: path.to_owned(),
            keys: RwLock::new(Arc::new(keys)),
        })
    }

    /// Reads the file again and swaps the keys in; on error the keys in force stay.
    pub fn reload(&self) -> Result<usize, KeyFileError> {
        let keys = Arc::new(Keys::from_file(&KeyFile::read(&self.path)?));
        let live = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(live)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn current(&self) -> Arc<Keys> {
        Arc::clone(&self.keys.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The caller of a request with these headers, if it may use `scope`.
    pub fn check(&self, headers: &axum::http::HeaderMap, scope: Scope) -> Result<Caller, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                "this route needs an API key: send `Authorization: Bearer <key>`",
            ));
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <key>`"))?;
        let keys = self.current();
        let Some(found) = keys.find(key) else {
            return Err(unauthorized("unknown or revoked API key"));
        };
        if !found.scopes.contains(&scope) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "API key `{}` lacks the `{}` scope this route needs",
                    found.id,
                    scope.as_str()
                ),
            ));
        }
        Ok(Caller(Arc::clone(&found.id)))
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// What a route's guard needs: the keys and the route's scope.
#[derive(Clone)]
pub struct Guard {
    pub auth: Arc<Auth>,
    pub scope: Scope,
}

/// The middleware in front of every route that needs a scope: 401 without a valid key, 403
/// with a key lacking the scope; otherwise the request goes on with its [`Caller`].
pub async fn require(State(guard): State<Guard>, mut request: Request, next: Next) -> Response {
    match guard.auth.check(request.headers(), guard.scope) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(error) => {
            let status = error.status();
            metrics::counter!("keel_http_refused_total", "reason" => if status == StatusCode::FORBIDDEN { "forbidden" } else { "unauthorized" })
                .increment(1);
            let mut response = error.into_response();
            if status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keel\""),
                );
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn file_with(keys: &[(&str, &str, &[Scope], bool)]) -> KeyFile {
        KeyFile {
            version: KEY_FILE_VERSION,
            keys: keys
                .iter()
                .map(|(id, key, scopes, revoked)| KeyEntry {
                    id: (*id).into(),
                    hash: hash_key(key),
                    scopes: scopes.to_vec(),
                    created_at: "2026-12-01T00:00:00Z".into(),
                    revoked_at: revoked.then(|| "2026-12-01T01:00:00Z".into()),
                })
                .collect(),
        }
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).expect("ascii"),
        );
        headers
    }

    fn auth_over(file: &KeyFile) -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.json");
        file.write(&path).expect("write");
        let auth = Auth::load(&path).expect("load");
        (dir, auth)
    }

    #[test]
    fn keys_are_found_by_hash_with_their_scopes_and_revoked_keys_are_not() {
        let a = new_key().expect("random");
        let b = new_key().expect("random");
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 64 && a != b);
        let (_dir, auth) = auth_over(&file_with(&[
            ("writer", &a, &[Scope::Write], false),
            ("old", &b, &[Scope::Write, Scope::Read], true),
        ]));
        let caller = auth.check(&bearer(&a), Scope::Write).expect("allowed");
        assert_eq!(&*caller.0, "writer");
        let status = |h: &HeaderMap, s| auth.check(h, s).map(|_| ()).expect_err("refused").status();
        assert_eq!(status(&bearer(&a), Scope::Read), StatusCode::FORBIDDEN);
        assert_eq!(status(&bearer(&b), Scope::Write), StatusCode::UNAUTHORIZED);
        assert_eq!(
            status(&bearer("keel_00"), Scope::Write),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(&HeaderMap::new(), Scope::Write),
            StatusCode::UNAUTHORIZED
        );
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(status(&basic, Scope::Write), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn a_reload_swaps_the_keys_and_a_bad_file_keeps_the_old_ones() {
        let a = new_key().expect("random");
        let (dir, auth) = auth_over(&file_with(&[("a", &a, &[Scope::Read], false)]));
        let path = dir.path().join("keys.json");
        file_with(&[("a", &a, &[Scope::Read], true)])
            .write(&path)
            .expect("write");
        assert_eq!(auth.reload().expect("reload"), 0);
        assert!(auth.check(&bearer(&a), Scope::Read).is_err());
        std::fs::write(&path, b"{not json").expect("write");
        assert!(auth.reload().is_err());
        file_with(&[("a", &a, &[Scope::Read], false)])
            .write(&path)
            .expect("write");
        assert_eq!(auth.reload().expect("reload"), 1);
        assert!(auth.check(&bearer(&a), Scope::Read).is_ok());
    }

    #[test]
    fn invalid_files_are_refused_naming_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.json");
        let cases = [
            (r#"{"version": 2, "keys": []}"#, "version 2"),
            (
                r#"{"version": 1, "keys": [{"id": "a b", "hash": "blake3:00", "scopes": ["read"], "created_at": ""}]}"#,
                "has ` `",
            ),
            (
                r#"{"version": 1, "keys": [{"id": "a", "hash": "sha1:00", "scopes": ["read"], "created_at": ""}]}"#,
                "hash must be",
            ),
            (
                r#"{"version": 1, "keys": [{"id": "a", "hash": "blake3:00", "scopes": ["root"], "created_at": ""}]}"#,
                "unknown variant",
            ),
            (r#"{"version": 1, "keys": [], "extra": 1}"#, "unknown field"),
        ];
        for (text, expected) in cases {
            std::fs::write(&path, text).expect("write");
            let error = KeyFile::read(&path).expect_err("refused").to_string();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(error.contains("keys.json"), "{error}");
        }
    }
}
