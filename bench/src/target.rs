//! Which servers the bench may load.
//!
//! A load generator pointed at the wrong address is a denial-of-service tool, so by default
//! only loopback targets are accepted: `127.0.0.0/8`, `[::1]` and `localhost`. The make
//! scenarios and the cloud flow never need more: on a cloud VM the bench runs on the VM against
//! the VM's own loopback (see docs/BENCHMARKING.md). `--allow-remote` lifts the check for an
//! SRE who runs the client on a separate machine against a server they own; nothing in this
//! repository passes it.

use anyhow::{Context, bail};
use reqwest::Url;
use std::net::IpAddr;

/// Parses `url` (the server's base URL) and refuses non-loopback hosts unless `allow_remote`.
pub fn checked_base_url(url: &str, allow_remote: bool) -> anyhow::Result<Url> {
    let parsed = Url::parse(url)
        .with_context(|| format!("`{url}` is not a URL (e.g. http://127.0.0.1:8080)"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("`{url}`: the URL must be http:// or https:// (https with --ca-cert)");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        bail!("`{url}`: credentials in the URL are not supported");
    }
    let host = parsed.host_str().unwrap_or("");
    if !allow_remote && !is_loopback_host(host) {
        bail!(
            "refusing to load `{host}`: only loopback targets (127.0.0.0/8, [::1], localhost) are allowed. \
             Run keel-bench on the server's machine against its loopback (that is what the make and cloud \
             scenarios do), or pass --allow-remote for a server you own."
        );
    }
    Ok(parsed)
}

/// `base` joined with `path` (`/v1/batches`), keeping any path prefix of the base URL.
pub fn endpoint(base: &Url, path: &str) -> Url {
    let mut prefix = base.path().trim_end_matches('/').to_owned();
    prefix.push_str(path);
    let mut url = base.clone();
    url.set_path(&prefix);
    url.set_query(None);
    url
}

/// True for `localhost`, `127.x.y.z`, `::1` and `[::1]`.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_pass() {
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://127.3.2.1/",
            "http://[::1]:9000",
        ] {
            assert!(checked_base_url(url, false).is_ok(), "{url}");
        }
    }

    #[test]
    fn other_targets_are_refused_unless_allowed() {
        for url in [
            "http://10.0.0.1:8080",
            "http://192.168.1.5",
            "http://example.com",
            "http://0.0.0.0:8080",
        ] {
            let error = checked_base_url(url, false).unwrap_err().to_string();
            assert!(error.contains("only loopback"), "{url}: {error}");
        }
        // Parsing still happens with --allow-remote, nothing is contacted here.
        assert!(checked_base_url("http://10.0.0.1:8080", true).is_ok());
    }

    #[test]
    fn non_http_and_garbage_are_refused() {
        assert!(checked_base_url("https://127.0.0.1", false).is_ok());
        assert!(checked_base_url("ftp://127.0.0.1", false).is_err());
        assert!(checked_base_url("127.0.0.1:8080", false).is_err());
        assert!(checked_base_url("http://user:pw@127.0.0.1", false).is_err());
    }

    #[test]
    fn endpoints_keep_a_path_prefix() {
        let base = checked_base_url("http://127.0.0.1:8080/keel/", false).unwrap();
        assert_eq!(
            endpoint(&base, "/v1/batches").as_str(),
            "http://127.0.0.1:8080/keel/v1/batches"
        );
        let base = checked_base_url("http://127.0.0.1:8080", false).unwrap();
        assert_eq!(
            endpoint(&base, "/metrics").as_str(),
            "http://127.0.0.1:8080/metrics"
        );
    }
}
