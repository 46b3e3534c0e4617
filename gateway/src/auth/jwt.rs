//! JWT bearer tokens (`Authorization: Bearer <token>`), verified with `jsonwebtoken` (its
//! RustCrypto backend: no C build). The decisions, each covered by a test:
//!
//! - Every key verifies exactly one algorithm, and a token's `alg` must be that algorithm:
//!   `alg: none`, an HS256 token signed with an RSA public key as the secret, and any other
//!   algorithm swap are refused before a signature is checked.
//! - Keys come only from the configuration and from the configured JWKS URL. A token's `jku`,
//!   `x5u`, `x5c` and embedded `jwk` are never used; its `kid` is only compared with the ids of
//!   keys already known, so a `kid` such as `../../etc/passwd` is just unknown.
//! - A JWKS never supplies symmetric (`oct`) keys or HS algorithms: a published HMAC secret
//!   would let anyone sign.
//! - `exp`, `iss` and `aud` are required, `nbf` is checked when present, with `leeway_s` of
//!   clock skew.
//! - The consumer claim must name a configured consumer; the identity (plan, rate limit,
//!   quota) is that consumer's.
//! - A token naming an unknown `kid` refreshes the JWKS at most once per
//!   `jwks_min_interval_s`, one fetch at a time (concurrent requests wait for it and then look
//!   again), so a burst of forged `kid`s costs one fetch. A failed fetch keeps the keys last
//!   fetched; a key dropped from the JWKS stays valid for one more refresh period.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use tokio_util::sync::CancellationToken;
use tollgate_schemas::directory::Directory;

use super::{Identity, Verdict};
use crate::config::{JwtConfig, JwtKeyConfig};

const OK: crate::metrics::ResultLabels = crate::metrics::ResultLabels { result: "ok" };
const ERROR: crate::metrics::ResultLabels = crate::metrics::ResultLabels { result: "error" };

/// The most a JWKS response may weigh.
const JWKS_MAX_BYTES: usize = 1 << 20;
/// How long a JWKS fetch may take.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// One verification key, pinned to one algorithm.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies bearer tokens and maps them to consumers.
pub struct JwtAuth {
    consumer_claim: String,
    /// The consumers tokens may name.
    directory: Arc<Directory>,
    /// `plan_claim`, and the configured plans it may name.
    plan_claim: Option<String>,
    plans: HashMap<String, Arc<str>>,
    /// The claim checks, per algorithm (`algorithms` holds that one algorithm).
    validations: HashMap<Algorithm, Validation>,
    configured: Vec<Arc<Key>>,
    jwks: Option<Jwks>,
    verified: VerifiedCache,
}

/// Tokens verified recently, by their exact text. A client sends the same token on every request
/// until it expires, and checking a signature costs tens of microseconds, more than the rest of
/// the request path; a lookup costs a hash of the token. An entry lives until the token's `exp`
/// or [`CACHE_TTL`], whichever comes first, so a key dropped from the JWKS (or a consumer removed
/// by a restart) stops admitting its tokens within that time. Only successes are cached.
///
/// Each thread that looks tokens up (the gateway's workers, one per core) has a shard of its own,
/// on cache lines of its own, so that workers never wait for each other's lock nor take its
/// line from the other core; a token a client sends through both workers is verified once by
/// each. The shards hash with foldhash, not the standard library's SipHash: hashing a bearer
/// token of some 500 bytes was 0.60 % of the process's samples under `wrk -t1 -c64` with tokens,
/// 0.07 % now (BENCHMARKS.md, thirty-second round). Only tokens whose signature verified get
/// in, so nobody can fill a shard with keys chosen to collide.
struct VerifiedCache {
    shards: Box<[Padded<std::sync::Mutex<Shard>>]>,
}

type Shard = HashMap<Box<str>, (Identity, Instant), foldhash::fast::RandomState>;

/// A value alone on its cache lines (two of them: the adjacent-line prefetcher fetches pairs).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// The longest a verified token is admitted without checking it again.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Verified tokens one shard holds at most (expired ones are dropped first when it is full): a
/// worker's worth of clients.
const CACHE_MAX: usize = 16_384;
/// Shards of the verified-token cache: more than the workers of any machine the gateway is
/// likely to run on. Threads past that many share shards, round robin.
const SHARDS: usize = 64;

/// The shard of the calling thread: threads are numbered as they first look a token up.
fn shard_of_thread() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

impl Default for VerifiedCache {
    fn default() -> Self {
        VerifiedCache {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
        }
    }
}

impl VerifiedCache {
    fn shard(&self) -> std::sync::MutexGuard<'_, Shard> {
        let shard = &self.shards[shard_of_thread()].0;
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, token: &str) -> Option<Identity> {
        self.shard()
            .get(token)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(id, _)| id.clone())
    }

    fn insert(
        &self,
        token: &str,
        id: &Identity,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) {
        let Some(exp) = claims.get("exp").and_then(serde_json::Value::as_f64) else {
            return;
        };
        let left = exp - chrono::Utc::now().timestamp() as f64;
        if left.is_nan() || left <= 0.0 {
            return; // admitted within the leeway only: checked again next time
        }
        let now = Instant::now();
        let until = now + Duration::from_secs_f64(left.min(CACHE_TTL.as_secs_f64()));
        let mut map = self.shard();
        if map.len() >= CACHE_MAX {
            map.retain(|_, (_, u)| *u > now);
            if map.len() >= CACHE_MAX {
                map.clear();
            }
        }
        map.insert(token.into(), (id.clone(), until));
    }
}

/// Where the JWKS is fetched from: one GET on a new connection per fetch (fetches are minutes
/// apart), over TLS for an `https` URL.
struct Source {
    url: http::Uri,
    #[cfg(feature = "tls")]
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

impl Source {
    fn new(config: &JwtConfig, url: &str) -> Result<Source, String> {
        let url: http::Uri = url
            .parse()
            .map_err(|e| format!("gateway.auth.jwt.jwks_url: {e}"))?;
        #[cfg(feature = "tls")]
        let tls = if url.scheme_str() == Some("https") {
            let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("gateway.auth.jwt.jwks_url: {e}"))?;
            Some((connector(config.jwks_ca_path.as_deref())?, name))
        } else {
            None
        };
        #[cfg(not(feature = "tls"))]
        let _ = config;
        Ok(Source {
            url,
            #[cfg(feature = "tls")]
            tls,
        })
    }

    /// The body of a successful GET of the URL.
    async fn get(&self) -> Result<Bytes, String> {
        let host = self.url.host().unwrap_or_default().trim_matches(['[', ']']);
        let https = self.url.scheme_str() == Some("https");
        let port = self.url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        let authority = self.url.authority().map_or(host, |a| a.as_str());
        let req = Request::get(self.url.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        #[cfg(feature = "tls")]
        if let Some((connector, name)) = &self.tls {
            let stream = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            return get_on(TokioIo::new(stream), req).await;
        }
        get_on(TokioIo::new(tcp), req).await
    }
}

/// Sends `req` on a new HTTP/1.1 connection over `io`; the answer's body when it succeeded.
async fn get_on<T>(io: T, req: Request<Empty<Bytes>>) -> Result<Bytes, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    Limited::new(resp.into_body(), JWKS_MAX_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string())
}

/// A TLS client that trusts the CAs in `ca_path`, or the system's: `SSL_CERT_FILE`, else the
/// first bundle found where distributions keep it.
#[cfg(feature = "tls")]
fn connector(ca_path: Option<&std::path::Path>) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let path = match ca_path {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain(
                [
                    "/etc/ssl/certs/ca-certificates.crt",
                    "/etc/pki/tls/certs/ca-bundle.crt",
                    "/etc/ssl/cert.pem",
                ]
                .map(std::path::PathBuf::from),
            )
            .find(|p| p.exists())
            .ok_or("gateway.auth.jwt.jwks_ca_path: no system CA bundle found; name one")?,
    };
    let certs = CertificateDer::pem_file_iter(&path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "gateway.auth.jwt.jwks_ca_path: cannot read {}: {e}",
                path.display()
            )
        })?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "gateway.auth.jwt.jwks_ca_path: {} holds no CA certificate",
            path.display()
        ));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// Keys from the JWKS URL.
struct Jwks {
    source: Source,
    keys: RwLock<Arc<JwksKeys>>,
    /// When the last fetch started; held while fetching (one fetch at a time).
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    min_interval: Duration,
    refresh: Duration,
    metrics: crate::GatewayMetrics,
}

#[derive(Default)]
struct JwksKeys {
    current: Vec<Arc<Key>>,
    /// Keys the last fetches dropped, each accepted until its instant.
    retired: Vec<(Arc<Key>, Instant)>,
}

impl JwtAuth {
    /// Parses the configured keys; `directory` holds the consumers tokens may name.
    pub fn new(
        config: &JwtConfig,
        directory: Arc<Directory>,
        metrics: crate::GatewayMetrics,
    ) -> Result<JwtAuth, String> {
        let configured = config
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                configured_key(k)
                    .map(Arc::new)
                    .map_err(|e| format!("gateway.auth.jwt.keys[{i}]: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let jwks = match &config.jwks_url {
            Some(url) => Some(Jwks {
                source: Source::new(config, url)?,
                keys: RwLock::default(),
                last_fetch: tokio::sync::Mutex::new(None),
                min_interval: Duration::from_secs(config.jwks_min_interval_s),
                refresh: Duration::from_secs(config.jwks_refresh_s),
                metrics,
            }),
            None => None,
        };
        let validations = ALGORITHMS
            .iter()
            .map(|alg| {
                let mut v = Validation::new(*alg);
                v.set_issuer(&[&config.issuer]);
                v.set_audience(&[&config.audience]);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                v.validate_nbf = true;
                v.leeway = config.leeway_s;
                (*alg, v)
            })
            .collect();
        Ok(JwtAuth {
            consumer_claim: config.consumer_claim.clone(),
            plan_claim: config.plan_claim.clone(),
            plans: HashMap::new(),
            directory,
            validations,
            configured,
            jwks,
            verified: VerifiedCache::default(),
        })
    }

    /// The verdict on a request's `Authorization` header: absent unless it is a bearer token.
    pub async fn verdict<H: super::Headers + Sync + ?Sized>(&self, headers: &H) -> Verdict {
        let token = headers
            .header("authorization")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match token {
            None => Verdict::Absent,
            Some(t) => match self.verify(t).await {
                Ok(id) => Verdict::Granted(id),
                Err(why) => Verdict::Denied(format!("invalid bearer token: {why}")),
            },
        }
    }

    /// The consumer a valid token names, or why the token is refused.
    pub async fn verify(&self, token: &str) -> Result<Identity, String> {
        if let Some(id) = self.verified.get(token) {
            return Ok(id);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "malformed, or its algorithm is not supported".to_string())?;
        let kid = header.kid.as_deref();
        let mut keys = self.keys_for(header.alg, kid);
        if keys.is_empty()
            && let (Some(jwks), Some(_)) = (&self.jwks, kid)
        {
            jwks.refresh_if_due().await;
            keys = self.keys_for(header.alg, kid);
        }
        if keys.is_empty() {
            return Err(match kid {
                Some(_) => "no known key has its `kid` and algorithm".into(),
                None => "no key for its algorithm".into(),
            });
        }
        let validation = &self.validations[&header.alg];
        let mut last = None;
        for key in keys {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token, &key.key, validation,
            ) {
                Ok(data) => {
                    let id = self.identity(&data.claims)?;
                    self.verified.insert(token, &id, &data.claims);
                    return Ok(id);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| "invalid".into(), |e| describe(e.kind())))
    }

    fn identity(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Identity, String> {
        let claim = &self.consumer_claim;
        let consumer = claims
            .get(claim)
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("no `{claim}` claim naming the consumer"))?;
        let mut id = self
            .directory
            .position(consumer)
            .map(|i| Identity::configured(&self.directory, i))
            .ok_or_else(|| format!("`{claim}` names no known consumer"))?;
        if let Some(claim) = &self.plan_claim
            && let Some(value) = claims.get(claim)
        {
            let plan = value
                .as_str()
                .and_then(|name| self.plans.get(name))
                .ok_or_else(|| format!("`{claim}` names no configured plan"))?;
            if **plan != *id.plan {
                id.plan = plan.clone();
                id.claimed_plan = true;
            }
        }
        Ok(id)
    }

    /// The plans a `plan_claim` may name (the configured ones).
    pub fn with_plans<'a>(mut self, names: impl IntoIterator<Item = &'a String>) -> JwtAuth {
        self.plans = names
            .into_iter()
            .map(|n| (n.clone(), Arc::from(n.as_str())))
            .collect();
        self
    }

    /// The known keys that may verify a token with `alg` and `kid`: same algorithm, and same
    /// `kid` when both have one.
    fn keys_for(&self, alg: Algorithm, kid: Option<&str>) -> Vec<Arc<Key>> {
        let fits = |k: &Arc<Key>| {
            k.alg == alg && (kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
        };
        let mut out: Vec<Arc<Key>> = self
            .configured
            .iter()
            .filter(|k| fits(k))
            .cloned()
            .collect();
        if let Some(jwks) = &self.jwks {
            let set = jwks.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
            let now = Instant::now();
            out.extend(set.current.iter().filter(|k| fits(k)).cloned());
            out.extend(
                set.retired
                    .iter()
                    .filter(|(k, until)| *until > now && fits(k))
                    .map(|(k, _)| k.clone()),
            );
        }
        out
    }

    /// Fetches the JWKS now and then every `jwks_refresh_s` until `stop` (no JWKS: returns).
    pub async fn refresh_every(self: Arc<Self>, stop: CancellationToken) {
        let Some(jwks) = &self.jwks else { return };
        loop {
            jwks.refresh_now().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(jwks.refresh) => {}
            }
        }
    }
}

impl Jwks {
    /// Fetches unless a fetch started less than `min_interval` ago; waits for one in progress.
    async fn refresh_if_due(&self) {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return;
        }
        *last = Some(Instant::now());
        self.fetch_and_install().await;
    }

    async fn refresh_now(&self) {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        self.fetch_and_install().await;
    }

    async fn fetch_and_install(&self) {
        match self.fetch().await {
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), url = %self.source.url, "fetched JWKS");
                self.metrics.jwks_fetches.get_or_create(&OK).inc();
                self.install(keys);
            }
            Err(e) => {
                self.metrics.jwks_fetches.get_or_create(&ERROR).inc();
                tracing::warn!(url = %self.source.url, error = %e, "JWKS fetch failed; keeping the keys fetched before")
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<Arc<Key>>, String> {
        let body = tokio::time::timeout(JWKS_TIMEOUT, self.source.get())
            .await
            .map_err(|_| "timed out".to_string())??;
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))?;
        // A key this gateway cannot use (another type, encryption, a symmetric key) is skipped,
        // not a reason to drop the others.
        Ok(set
            .keys
            .into_iter()
            .filter_map(|v| serde_json::from_value::<Jwk>(v).ok())
            .filter_map(|jwk| jwks_key(&jwk))
            .map(Arc::new)
            .collect())
    }

    /// Makes `fresh` the current keys; current keys it lacks stay valid for one refresh period.
    fn install(&self, fresh: Vec<Arc<Key>>) {
        let now = Instant::now();
        let same = |a: &Key, b: &Key| a.kid.is_some() && a.kid == b.kid && a.alg == b.alg;
        let mut guard = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let mut retired: Vec<(Arc<Key>, Instant)> = guard
            .retired
            .iter()
            .filter(|(k, until)| *until > now && !fresh.iter().any(|f| same(f, k)))
            .cloned()
            .collect();
        for k in &guard.current {
            if !fresh.iter().any(|f| same(f, k)) {
                retired.push((k.clone(), now + self.refresh));
            }
        }
        self.metrics
            .jwks_keys
            .set((fresh.len() + retired.len()) as i64);
        *guard = Arc::new(JwksKeys {
            current: fresh,
            retired,
        });
    }
}

/// Every algorithm a key may be pinned to.
const ALGORITHMS: [Algorithm; 12] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
];

fn configured_key(k: &JwtKeyConfig) -> Result<Key, String> {
    let alg =
        Algorithm::from_str(&k.alg).map_err(|_| format!("alg `{}` is not supported", k.alg))?;
    let pem = || k.pem.as_deref().map(str::as_bytes).ok_or("needs `pem`");
    let key = match alg.family() {
        AlgorithmFamily::Hmac => {
            DecodingKey::from_secret(k.secret.as_deref().ok_or("needs `secret`")?.as_bytes())
        }
        AlgorithmFamily::Rsa => {
            DecodingKey::from_rsa_pem(pem()?).map_err(|e| format!("pem: {e}"))?
        }
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem()?).map_err(|e| format!("pem: {e}"))?,
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem()?).map_err(|e| format!("pem: {e}"))?,
    };
    Ok(Key {
        kid: k.kid.clone(),
        alg,
        key,
    })
}

/// A JWKS entry as a key: signature keys only, never symmetric, its algorithm the entry's
/// `alg` or, without one, the usual one for its key type, and matching the key type.
fn jwks_key(jwk: &Jwk) -> Option<Key> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
        AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            AlgorithmFamily::Ed
        }
        _ => return None,
    };
    let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
        (Some(a), _) => Algorithm::from_str(&a.to_string()).ok()?,
        (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
        (None, AlgorithmParameters::EllipticCurve(p)) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        (None, _) => Algorithm::EdDSA,
    };
    if alg.family() != family {
        return None;
    }
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key: DecodingKey::from_jwk(jwk).ok()?,
    })
}

/// Why a token failed, in words a client can act on (no key material, no internals).
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet (`nbf`)".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm => "algorithm not allowed for its key".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("no `{c}` claim"),
        ErrorKind::InvalidClaimFormat(c) => format!("claim `{c}` has the wrong type"),
        _ => "malformed".into(),
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    /// `tests/fixtures` of this crate. The runner's CARGO_MANIFEST_DIR first: a test binary
    /// built in another checkout and found fresh carries that checkout's path in `env!`.
    fn fixtures_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
            .join("tests/fixtures")
    }

    const RSA1: &str = include_str!("../../tests/fixtures/jwt/rsa1.key");
    const RSA1_PUB: &str = include_str!("../../tests/fixtures/jwt/rsa1.pub");
    const RSA2: &str = include_str!("../../tests/fixtures/jwt/rsa2.key");
    const EC1: &str = include_str!("../../tests/fixtures/jwt/ec1.key");
    const EC1_PUB: &str = include_str!("../../tests/fixtures/jwt/ec1.pub");
    const ED1: &str = include_str!("../../tests/fixtures/jwt/ed1.key");
    const ED1_PUB: &str = include_str!("../../tests/fixtures/jwt/ed1.pub");
    const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

    fn identities() -> Arc<Directory> {
        Arc::new(
            Directory::new(&[
                tollgate_schemas::config::Consumer {
                    id: "acme".into(),
                    plan: "pro".into(),
                    api_keys: vec![],
                },
                tollgate_schemas::config::Consumer {
                    id: "zeta".into(),
                    plan: "free".into(),
                    api_keys: vec![],
                },
            ])
            .unwrap(),
        )
    }

    fn config(keys: Vec<JwtKeyConfig>, jwks_url: Option<String>) -> JwtConfig {
        JwtConfig {
            issuer: "https://issuer.example".into(),
            audience: "orders-api".into(),
            jwks_url,
            jwks_ca_path: None,
            keys,
            consumer_claim: "sub".into(),
            plan_claim: None,
            leeway_s: 5,
            jwks_refresh_s: 300,
            jwks_min_interval_s: 60,
        }
    }

    fn key(kid: &str, alg: &str, pem: &str) -> JwtKeyConfig {
        JwtKeyConfig {
            kid: Some(kid.into()),
            alg: alg.into(),
            pem: Some(pem.into()),
            secret: None,
        }
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn claims(sub: &str) -> serde_json::Value {
        json!({ "sub": sub, "iss": "https://issuer.example", "aud": "orders-api", "exp": now() + 600 })
    }

    fn sign(
        alg: Algorithm,
        kid: Option<&str>,
        key: &EncodingKey,
        claims: &serde_json::Value,
    ) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, claims, key).unwrap()
    }

    fn rsa(pem: &str) -> EncodingKey {
        EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()
    }

    fn all_keys() -> JwtAuth {
        let mut hs = key("hs", "HS256", "");
        hs.pem = None;
        hs.secret = Some(SECRET.into());
        JwtAuth::new(
            &config(
                vec![
                    key("rsa1", "RS256", RSA1_PUB),
                    key("rsa1-ps", "PS256", RSA1_PUB),
                    key("ec1", "ES256", EC1_PUB),
                    key("ed1", "EdDSA", ED1_PUB),
                    hs,
                ],
                None,
            ),
            identities(),
            crate::GatewayMetrics::unregistered(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn every_supported_algorithm_grants_the_named_consumer() {
        let auth = all_keys();
        let ec = EncodingKey::from_ec_pem(EC1.as_bytes()).unwrap();
        let ed = EncodingKey::from_ed_pem(ED1.as_bytes()).unwrap();
        let hs = EncodingKey::from_secret(SECRET.as_bytes());
        for token in [
            sign(Algorithm::RS256, Some("rsa1"), &rsa(RSA1), &claims("acme")),
            sign(
                Algorithm::PS256,
                Some("rsa1-ps"),
                &rsa(RSA1),
                &claims("acme"),
            ),
            sign(Algorithm::ES256, Some("ec1"), &ec, &claims("acme")),
            sign(Algorithm::EdDSA, Some("ed1"), &ed, &claims("acme")),
            sign(Algorithm::HS256, Some("hs"), &hs, &claims("acme")),
            // No `kid`: every key of the algorithm is tried.
            sign(Algorithm::ES256, None, &ec, &claims("acme")),
        ] {
            let id = auth.verify(&token).await.unwrap();
            assert_eq!((id.consumer(), &*id.plan, id.index), ("acme", "pro", 0));
        }
        let id = auth
            .verify(&sign(
                Algorithm::RS256,
                Some("rsa1"),
                &rsa(RSA1),
                &claims("zeta"),
            ))
            .await
            .unwrap();
        assert_eq!((id.consumer(), id.index), ("zeta", 1));
    }

    #[tokio::test]
    async fn bad_claims_are_refused_with_the_reason() {
        let auth = all_keys();
        let k = rsa(RSA1);
        let t = |c: serde_json::Value| sign(Algorithm::RS256, Some("rsa1"), &k, &c);
        let mut expired = claims("acme");
        expired["exp"] = json!(now() - 60);
        let mut early = claims("acme");
        early["nbf"] = json!(now() + 600);
        let mut no_exp = claims("acme");
        no_exp.as_object_mut().unwrap().remove("exp");
        let mut aud = claims("acme");
        aud["aud"] = json!("another-api");
        let mut iss = claims("acme");
        iss["iss"] = json!("https://evil.example");
        let mut sub_number = claims("acme");
        sub_number["sub"] = json!(42);
        let cases = [
            (t(expired), "expired"),
            (t(early), "not valid yet"),
            (t(no_exp), "no `exp` claim"),
            (t(aud), "wrong audience"),
            (t(iss), "wrong issuer"),
            (t(claims("nobody")), "names no known consumer"),
            (t(sub_number), "no `sub` claim"),
        ];
        for (token, why) in cases {
            let err = auth.verify(&token).await.unwrap_err();
            assert!(err.contains(why), "{why}: got {err}");
        }
        // Within the leeway, an expiry just past is accepted.
        let mut just = claims("acme");
        just["exp"] = json!(now() - 2);
        assert!(auth.verify(&t(just)).await.is_ok());
    }

    #[tokio::test]
    async fn algorithm_and_key_attacks_are_refused() {
        let auth = all_keys();
        // alg: none, no signature: a valid token's claims under the header {"alg":"none","typ":"JWT"}.
        let good = sign(Algorithm::RS256, Some("rsa1"), &rsa(RSA1), &claims("acme"));
        let payload = good.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert!(auth.verify(&none).await.is_err());
        // HS256 signed with the RSA public key as the secret, under the RSA key's kid.
        let confused = sign(
            Algorithm::HS256,
            Some("rsa1"),
            &EncodingKey::from_secret(RSA1_PUB.as_bytes()),
            &claims("acme"),
        );
        assert!(auth.verify(&confused).await.is_err());
        // A known kid, signed by another key.
        let forged = sign(Algorithm::RS256, Some("rsa1"), &rsa(RSA2), &claims("acme"));
        assert_eq!(auth.verify(&forged).await.unwrap_err(), "bad signature");
        // A path in the kid, and a jku / embedded jwk pointing at the attacker's key.
        let injected = sign(
            Algorithm::RS256,
            Some("../../../dev/null"),
            &rsa(RSA2),
            &claims("acme"),
        );
        assert!(auth.verify(&injected).await.unwrap_err().contains("kid"));
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("attacker".into());
        h.jku = Some("http://127.0.0.1:1/jwks.json".into());
        h.jwk =
            Some(jsonwebtoken::jwk::Jwk::from_encoding_key(&rsa(RSA2), Algorithm::RS256).unwrap());
        let jku = encode(&h, &claims("acme"), &rsa(RSA2)).unwrap();
        assert!(auth.verify(&jku).await.is_err());
        // Garbage and an RS256 token whose signature was cut.
        assert!(auth.verify("not.a.token").await.is_err());
        let cut = &good[..good.len() - 10];
        assert!(auth.verify(cut).await.is_err());
    }

    #[tokio::test]
    async fn the_header_decides_whether_a_token_was_presented() {
        let auth = all_keys();
        let mut h = HeaderMap::new();
        assert!(matches!(auth.verdict(&h).await, Verdict::Absent));
        h.insert(
            http::header::AUTHORIZATION,
            "Basic YWxhZGRpbjpvcGVuc2VzYW1l".parse().unwrap(),
        );
        assert!(matches!(auth.verdict(&h).await, Verdict::Absent));
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer nonsense".parse().unwrap(),
        );
        assert!(matches!(auth.verdict(&h).await, Verdict::Denied(_)));
        let t = sign(Algorithm::RS256, Some("rsa1"), &rsa(RSA1), &claims("acme"));
        h.insert(
            http::header::AUTHORIZATION,
            format!("bearer {t}").parse().unwrap(),
        );
        assert!(matches!(auth.verdict(&h).await, Verdict::Granted(_)));
    }

    #[tokio::test]
    async fn a_plan_claim_names_a_configured_plan_or_the_token_is_refused() {
        let mut c = config(vec![key("rsa1", "RS256", RSA1_PUB)], None);
        c.plan_claim = Some("plan".into());
        let plans = [
            "free".to_string(),
            "pro".to_string(),
            "enterprise".to_string(),
        ];
        let auth = JwtAuth::new(&c, identities(), crate::GatewayMetrics::unregistered())
            .unwrap()
            .with_plans(plans.iter());
        let token = |plan: Option<serde_json::Value>| {
            let mut cl = claims("acme");
            if let Some(p) = plan {
                cl["plan"] = p;
            }
            sign(Algorithm::RS256, Some("rsa1"), &rsa(RSA1), &cl)
        };
        let id = auth
            .verify(&token(Some(json!("enterprise"))))
            .await
            .unwrap();
        assert_eq!((&*id.plan, id.claimed_plan), ("enterprise", true));
        let id = auth.verify(&token(Some(json!("pro")))).await.unwrap();
        assert_eq!((&*id.plan, id.claimed_plan), ("pro", false), "its own plan");
        let id = auth.verify(&token(None)).await.unwrap();
        assert_eq!((&*id.plan, id.claimed_plan), ("pro", false), "no claim");
        for bad in [json!("platinum"), json!(7)] {
            let why = auth.verify(&token(Some(bad))).await.unwrap_err();
            assert!(why.contains("names no configured plan"), "{why}");
        }
    }

    /// A JWKS endpoint whose key set the test changes, counting its fetches.
    struct JwksServer {
        url: String,
        keys: Arc<Mutex<serde_json::Value>>,
        fetches: Arc<AtomicUsize>,
        up: Arc<std::sync::atomic::AtomicBool>,
    }

    async fn jwks_server(keys: serde_json::Value) -> JwksServer {
        jwks_server_on(keys, false).await
    }

    /// The JWKS endpoint, over TLS (the test certificate for `localhost`) when `tls`.
    async fn jwks_server_on(keys: serde_json::Value, tls: bool) -> JwksServer {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "{}://localhost:{}/.well-known/jwks.json",
            if tls { "https" } else { "http" },
            listener.local_addr().unwrap().port()
        );
        #[cfg(feature = "tls")]
        let acceptor = tls.then(|| {
            let dir = fixtures_dir();
            Arc::new(
                crate::tls::Acceptor::new(&crate::config::TlsConfig {
                    cert_path: dir.join("server.pem"),
                    key_path: dir.join("server.key"),
                })
                .unwrap(),
            )
        });
        let keys = Arc::new(Mutex::new(keys));
        let fetches = Arc::new(AtomicUsize::new(0));
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (k, f, u) = (keys.clone(), fetches.clone(), up.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (k, f, u) = (k.clone(), f.clone(), u.clone());
                #[cfg(feature = "tls")]
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        f.fetch_add(1, Ordering::SeqCst);
                        let (status, body) = if u.load(Ordering::SeqCst) {
                            (200, k.lock().unwrap().to_string())
                        } else {
                            (503, "down".to_string())
                        };
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    #[cfg(feature = "tls")]
                    if let Some(acceptor) = acceptor {
                        let Some(tls) = acceptor.accept(stream, Duration::from_secs(5)).await
                        else {
                            return;
                        };
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls.stream), svc)
                            .await;
                        return;
                    }
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        JwksServer {
            url,
            keys,
            fetches,
            up,
        }
    }

    fn jwk(pem: &str, kid: &str) -> serde_json::Value {
        let mut j =
            serde_json::to_value(Jwk::from_encoding_key(&rsa(pem), Algorithm::RS256).unwrap())
                .unwrap();
        j["kid"] = json!(kid);
        j["use"] = json!("sig");
        j
    }

    #[cfg(feature = "tls")]
    #[tokio::test]
    async fn a_jwks_over_https_is_trusted_only_through_the_configured_ca() {
        let server = jwks_server_on(json!({ "keys": [jwk(RSA1, "k1")] }), true).await;
        let fixtures = fixtures_dir();
        let token = sign(Algorithm::RS256, Some("k1"), &rsa(RSA1), &claims("acme"));
        let mut trusting = config(vec![], Some(server.url.clone()));
        trusting.jwks_ca_path = Some(fixtures.join("ca.pem"));
        let metrics = crate::GatewayMetrics::unregistered();
        let auth = JwtAuth::new(&trusting, identities(), metrics.clone()).unwrap();
        assert_eq!(auth.verify(&token).await.unwrap().consumer(), "acme");
        assert_eq!(server.fetches.load(Ordering::SeqCst), 1);

        // Trusting only another CA (the server's own certificate is not one), the handshake
        // fails, no key arrives, and the failure is counted.
        let mut distrusting = config(vec![], Some(server.url.clone()));
        distrusting.jwks_ca_path = Some(fixtures.join("server.pem"));
        let metrics = crate::GatewayMetrics::unregistered();
        let auth = JwtAuth::new(&distrusting, identities(), metrics.clone()).unwrap();
        assert!(auth.verify(&token).await.is_err());
        assert_eq!(
            server.fetches.load(Ordering::SeqCst),
            1,
            "no request got through"
        );
        assert_eq!(metrics.jwks_fetches.get_or_create(&ERROR).get(), 1);
    }

    #[tokio::test]
    async fn jwks_rotation_outage_and_a_burst_of_unknown_kids() {
        let server = jwks_server(json!({ "keys": [jwk(RSA1, "k1")] })).await;
        let metrics = crate::GatewayMetrics::unregistered();
        let auth = JwtAuth::new(
            &config(vec![], Some(server.url.clone())),
            identities(),
            metrics.clone(),
        )
        .unwrap();
        let t1 = sign(Algorithm::RS256, Some("k1"), &rsa(RSA1), &claims("acme"));
        let t2 = sign(Algorithm::RS256, Some("k2"), &rsa(RSA2), &claims("acme"));
        // The first token with an unknown kid fetches the set.
        assert!(auth.verify(&t1).await.is_ok());
        assert_eq!(server.fetches.load(Ordering::SeqCst), 1);

        // A burst of forged kids (concurrently) within the minimum interval: no more fetches.
        let forged: Vec<String> = (0..50)
            .map(|i| {
                sign(
                    Algorithm::RS256,
                    Some(&format!("forged-{i}")),
                    &rsa(RSA2),
                    &claims("acme"),
                )
            })
            .collect();
        let results = futures::future::join_all(forged.iter().map(|t| auth.verify(t))).await;
        assert!(results.iter().all(|r| r.is_err()));
        assert_eq!(server.fetches.load(Ordering::SeqCst), 1);

        // Rotation: the set now holds k2 only. After a refresh k2 verifies, and k1 still does
        // for one refresh period (tokens signed just before the rotation).
        *server.keys.lock().unwrap() = json!({ "keys": [jwk(RSA2, "k2")] });
        let jwks = auth.jwks.as_ref().unwrap();
        jwks.refresh_now().await;
        assert_eq!(server.fetches.load(Ordering::SeqCst), 2);
        assert!(auth.verify(&t2).await.is_ok());
        // (A token not seen before, so that the verified-token cache cannot answer.)
        let t1_again = sign(Algorithm::RS256, Some("k1"), &rsa(RSA1), &claims("zeta"));
        assert!(auth.verify(&t1_again).await.is_ok());

        // The endpoint down: the keys fetched before keep serving.
        server.up.store(false, Ordering::SeqCst);
        jwks.refresh_now().await;
        assert_eq!(server.fetches.load(Ordering::SeqCst), 3);
        assert!(auth.verify(&t2).await.is_ok());

        // A JWKS may not hand out a symmetric key.
        server.up.store(true, Ordering::SeqCst);
        *server.keys.lock().unwrap() = json!({ "keys": [
            { "kty": "oct", "kid": "hs", "alg": "HS256", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA" },
            jwk(RSA2, "k2"),
        ] });
        jwks.refresh_now().await;
        let hs = sign(
            Algorithm::HS256,
            Some("hs"),
            &EncodingKey::from_secret(b"secret-secret-secret-secret-secret"),
            &claims("acme"),
        );
        assert!(auth.verify(&hs).await.is_err());
        assert!(auth.verify(&t2).await.is_ok());
        let count = |result| {
            metrics
                .jwks_fetches
                .get_or_create(&crate::metrics::ResultLabels { result })
                .get()
        };
        assert_eq!((count("ok"), count("error")), (3, 1));
        assert_eq!(
            metrics.jwks_keys.get(),
            2,
            "k2, and k1 retired but still accepted"
        );
    }

    #[tokio::test]
    async fn verified_tokens_are_cached_until_they_expire() {
        let auth = all_keys();
        let t = sign(Algorithm::RS256, Some("rsa1"), &rsa(RSA1), &claims("acme"));
        assert_eq!(auth.verify(&t).await.unwrap().consumer(), "acme");
        assert_eq!(auth.verified.get(&t).map(|id| id.index), Some(0));
        // A token past its `exp` but within the leeway is admitted, and checked every time.
        let mut c = claims("zeta");
        c["exp"] = json!(now() - 1);
        let late = sign(Algorithm::RS256, Some("rsa1"), &rsa(RSA1), &c);
        assert!(auth.verify(&late).await.is_ok());
        assert!(auth.verified.get(&late).is_none());
        // Failures are never cached.
        let forged = sign(Algorithm::RS256, Some("rsa1"), &rsa(RSA2), &claims("acme"));
        assert!(auth.verify(&forged).await.is_err());
        assert!(auth.verified.get(&forged).is_none());
    }

    /// Each thread keeps its own shard of the cache: a worker's lookups never wait for another
    /// worker's lock, and a token verified on one thread is verified again on the next.
    #[tokio::test]
    async fn each_thread_caches_in_a_shard_of_its_own() {
        let auth = Arc::new(all_keys());
        let t = sign(Algorithm::RS256, Some("rsa1"), &rsa(RSA1), &claims("acme"));
        auth.verify(&t).await.unwrap();
        assert!(auth.verified.get(&t).is_some());
        let (other, here) = (Arc::clone(&auth), shard_of_thread());
        let elsewhere = std::thread::spawn(move || {
            let missed = other.verified.get(&t).is_none();
            let verified = futures::executor::block_on(other.verify(&t)).map(|id| id.index);
            (
                shard_of_thread(),
                missed,
                verified,
                other.verified.get(&t).is_some(),
            )
        })
        .join()
        .unwrap();
        assert_ne!(elsewhere.0, here, "two threads share a shard");
        assert!(elsewhere.1, "another thread's shard answered");
        assert_eq!(elsewhere.2, Ok(0));
        assert!(
            elsewhere.3,
            "the other thread did not cache what it verified"
        );
    }
}
