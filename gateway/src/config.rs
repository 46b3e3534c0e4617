//! The `gateway:` section of the configuration, and its validation (no I/O; errors name the key).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The gateway: where it listens, where it forwards, who may call it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address of the proxy listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Threads serving the proxy listener; 0 (the default): one per available core. Each has
    /// its own single-threaded runtime, its own listening socket on `listen` (SO_REUSEPORT: the
    /// kernel spreads connections over them), its own upstream connection pool and its own event
    /// buffer, so a request is accepted, forwarded and recorded on one thread.
    #[serde(default)]
    pub workers: usize,
    /// Whether each worker thread is bound to one core: `auto` (the default) binds them when
    /// there is one worker for each core the process may run on, `always` binds them in turn to
    /// those cores whatever their number, `never` leaves them to the scheduler. See
    /// [`PinWorkers`].
    #[serde(default)]
    pub pin_workers: PinWorkers,
    /// Whether each worker sends its turn's upstream requests in one system call through an
    /// io_uring of its own: `auto` (the default) where the kernel allows one (Linux; not where
    /// `kernel.io_uring_disabled` or a seccomp filter refuses it: then as with `off`), `off`
    /// for one `send` per request. See [`IoUringSetting`].
    #[serde(default)]
    pub io_uring: IoUringSetting,
    /// Instance id written into every event; defaults to `gateway-<port>`.
    #[serde(default)]
    pub id: Option<String>,
    /// Upstream services by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Routes, matched by method and path template; the route id is the unit of metering.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// How consumers authenticate.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The queue between the request path and the bus.
    #[serde(default)]
    pub events: EventsConfig,
    /// Where the gateway learns quota state.
    #[serde(default)]
    pub quota: QuotaFeedConfig,
    /// Address of `/metrics`, `/healthz` and `/readyz` when the gateway runs as its own process
    /// (`tollgate gateway`); in `tollgate up` the query API serves them for every part.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Directory of the gateway's local state (its last known quota state, the disk spool).
    /// Unset: a folder of `--data-dir` (default `./data`).
    #[serde(default)]
    pub state_dir: std::path::PathBuf,
    /// The disk spool for events while a remote bus (Kafka) does not deliver.
    #[serde(default)]
    pub spool: SpoolSettings,
    /// How long a client connection may hold the gateway without progress, and how large a
    /// request body may be.
    #[serde(default)]
    pub connections: ConnectionSettings,
    /// Whether a client's own `X-Forwarded-For` is kept (the peer's address appended to it):
    /// only behind a proxy or load balancer that sets it. Off: the client's value is dropped
    /// and the header names the peer alone, so a client cannot forge its address.
    #[serde(default)]
    pub trust_forwarded_for: bool,
    /// TLS on `listen` (needs the `tls` cargo feature): the listener then speaks TLS only,
    /// offering HTTP/2 and HTTP/1.1 by ALPN. Unset: plain TCP (HTTP/1.1, and h2c with prior
    /// knowledge when built with `http2`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// `gateway.tls`: the certificate the listener presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, the server's own certificate first.
    pub cert_path: std::path::PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: std::path::PathBuf,
}

/// `gateway.connections`: the timeouts of client connections (and of body transfers on both
/// sides), so that a slow or idle peer cannot hold a connection for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionSettings {
    /// Once a request's first byte has arrived, its whole head must follow within this
    /// (slowloris); else 408 and the connection closes.
    #[serde(default = "default_head_timeout_ms")]
    pub head_timeout_ms: u64,
    /// How long a keep-alive connection may wait for its next request.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// How long one read or write of a body, on either side, may wait.
    #[serde(default = "default_io_timeout_ms")]
    pub io_timeout_ms: u64,
    /// The largest request body: a larger declared length is answered 413 before any of it
    /// is read; a chunked body that grows past it is cut off with 413 and the connection closes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
}

fn default_max_body_bytes() -> u64 {
    10 * 1024 * 1024
}

fn default_head_timeout_ms() -> u64 {
    30_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_io_timeout_ms() -> u64 {
    30_000
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            head_timeout_ms: default_head_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            io_timeout_ms: default_io_timeout_ms(),
            max_body_bytes: default_max_body_bytes(),
        }
    }
}

/// `gateway.spool`: how much to keep on disk while the bus is unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    /// Largest size of the spool; events beyond it are dropped and counted.
    #[serde(default = "default_spool_bytes")]
    pub max_bytes: u64,
    /// Events waiting for delivery in the bus client before new ones go to disk. A quarter of
    /// it is also where `tollgate gateway` takes a Kafka client's threads off idle cores
    /// (the `tollgate` binary's `sched` module).
    #[serde(default = "default_spool_high_water")]
    pub high_water_events: u64,
}

fn default_spool_bytes() -> u64 {
    1 << 30
}
fn default_spool_high_water() -> u64 {
    100_000
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            max_bytes: default_spool_bytes(),
            high_water_events: default_spool_high_water(),
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    "127.0.0.1:8081".parse().expect("valid")
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("valid")
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: default_listen(),
            workers: 0,
            pin_workers: PinWorkers::default(),
            io_uring: IoUringSetting::default(),
            id: None,
            upstreams: BTreeMap::new(),
            routes: Vec::new(),
            auth: AuthConfig::default(),
            events: EventsConfig::default(),
            quota: QuotaFeedConfig::default(),
            admin_listen: default_admin_listen(),
            state_dir: std::path::PathBuf::new(),
            spool: SpoolSettings::default(),
            connections: ConnectionSettings::default(),
            trust_forwarded_for: false,
            tls: None,
        }
    }
}

/// One upstream service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://host:port` base URLs, used round robin.
    pub targets: Vec<String>,
    /// Time allowed from the start of the connection until the upstream's response headers
    /// arrive (a target refused on the way included).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How a request's target is chosen.
    #[serde(default)]
    pub balance: Balance,
    /// The most requests in flight to this upstream from each gateway process; past it a
    /// request is answered 503 at once (load shed) rather than queued. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u64>,
    /// Retries: a request with an idempotent method (GET, HEAD, OPTIONS, PUT, DELETE, TRACE)
    /// whose whole body was buffered, and whose connection the upstream closed or reset before
    /// any answer, is sent once more, to another target when there is one, while retries stay
    /// within this percentage of the upstream's requests (a budget, so that retries cannot
    /// multiply the load of an upstream in trouble). Unset: no retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget_percent: Option<u32>,
    /// Answers that are retried like a closed connection (same conditions, same budget): the
    /// answer is dropped unread and the request goes to another target, e.g. `[502, 503, 504]`
    /// for targets that fail alone. Server errors only. Unset: answers are never retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on_status: Vec<u16>,
    /// Time one attempt may take to get its answer's head; an attempt that runs out is retried
    /// (same conditions, same budget) while `timeout_ms`, which bounds the whole request, has
    /// time left. Unset: one attempt gets all of `timeout_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub try_timeout_ms: Option<u64>,
    /// Active health checks of each target; unset: none (passive ejection only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// `gateway.upstreams.*.health_check`: a `GET` of `path` on each target every `interval_ms`.
/// A target that fails `unhealthy_after` checks in a row (no answer within `timeout_ms`, or a
/// status other than 2xx) gets no requests until it passes `healthy_after` in a row, unless
/// every target of the upstream is down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub path: String,
    #[serde(default = "default_check_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_check_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_check_threshold")]
    pub unhealthy_after: u32,
    #[serde(default = "default_check_threshold")]
    pub healthy_after: u32,
}

fn default_check_interval_ms() -> u64 {
    5_000
}
fn default_check_timeout_ms() -> u64 {
    1_000
}
fn default_check_threshold() -> u32 {
    2
}

/// `gateway.upstreams.*.balance`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each target in turn.
    #[default]
    RoundRobin,
    /// The less busy of two targets drawn at random (power of two choices), by the requests
    /// this gateway has in flight to each.
    LeastRequest,
}

fn default_timeout_ms() -> u64 {
    5_000
}

impl UpstreamConfig {
    /// An upstream of `targets` with every other setting at its default.
    pub fn targets(targets: impl IntoIterator<Item = String>) -> UpstreamConfig {
        UpstreamConfig {
            targets: targets.into_iter().collect(),
            timeout_ms: default_timeout_ms(),
            balance: Balance::default(),
            max_in_flight: None,
            retry_budget_percent: None,
            retry_on_status: Vec::new(),
            try_timeout_ms: None,
            health_check: None,
        }
    }
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Route id: the unit of metering and pricing.
    pub id: String,
    /// Methods this route accepts; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Host names this route serves: the request's `Host` (its port ignored, any case), or
    /// `*.example.com` for every subdomain. Empty: any host. For one path and method, a route
    /// that names the request's host wins over one that names none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Path template: literal segments and `{name}` parameters, e.g. `/v1/orders/{id}`; a last
    /// segment `{*rest}` matches the remainder.
    pub path: String,
    /// Name of an upstream.
    pub upstream: String,
    /// Removed from the start of the path before forwarding.
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// How callers authenticate (default `true`); anonymous calls are metered too. See
    /// [`RouteAuth`].
    #[serde(default)]
    pub auth: RouteAuth,
    /// A token bucket per consumer on this route, on top of the plan's rate limit. Buckets
    /// are made on a consumer's first request and dropped once idle (refilled), so memory
    /// follows the active consumers; anonymous callers make none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<tollgate_schemas::config::RateLimit>,
    /// This route's own `timeout_ms`, instead of its upstream's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// A route's authentication: `true` tries every configured method (API key, then JWT) and
/// refuses a caller who presents none; `false` lets every caller through anonymously; a list is
/// the chain, tried in order, e.g. `[jwt, api_key]`, where `anonymous` lets through a caller who
/// presented no credential. A credential that is presented and invalid is refused at once,
/// never passed on to the next method or to `anonymous`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RouteAuth {
    All(bool),
    Chain(Vec<AuthMethod>),
}

impl Default for RouteAuth {
    fn default() -> Self {
        RouteAuth::All(true)
    }
}

/// One link of a route's authentication chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ApiKey,
    Jwt,
    Anonymous,
}

/// Authentication methods.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// API keys in a header, checked against the consumers' sha256 hashes. Unset while some
    /// consumer has keys: the keys are checked in `x-api-key`.
    #[serde(default)]
    pub api_key: Option<ApiKeyConfig>,
    /// JWT bearer tokens (`Authorization: Bearer`), in builds with the `jwt` feature.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

/// JWT authentication settings. Signing keys come from `keys` and/or `jwks_url`; each key
/// verifies one algorithm only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Where the signing keys are published (a JWKS over `https://`, which needs the `tls`
    /// cargo feature, or `http://`). Fetched at start, every `jwks_refresh_s`, and when a token
    /// names an unknown `kid` (at most once per `jwks_min_interval_s`). When it cannot be
    /// reached, the keys last fetched keep serving.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// A PEM file of the CA certificates trusted for an `https` JWKS URL, instead of the
    /// system's (`SSL_CERT_FILE`, else the distribution's bundle).
    #[serde(default)]
    pub jwks_ca_path: Option<std::path::PathBuf>,
    /// Keys given in the file.
    #[serde(default)]
    pub keys: Vec<JwtKeyConfig>,
    /// The claim naming the consumer (a configured consumer id).
    #[serde(default = "default_consumer_claim")]
    pub consumer_claim: String,
    /// A claim naming the caller's plan (a configured plan), e.g. for an identity provider that
    /// knows each customer's subscription. A token carrying it is served under that plan: its
    /// rate limit, its quota policy when the quota state is stale, and the plan recorded in the
    /// event. A token without it gets the consumer's configured plan; one naming an unknown
    /// plan is refused. Unset: the consumer's configured plan always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_claim: Option<String>,
    /// Clock skew allowed for `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
    /// Seconds between JWKS refreshes; a key dropped from the JWKS is still accepted for this
    /// long (tokens signed just before a rotation stay valid).
    #[serde(default = "default_jwks_refresh_s")]
    pub jwks_refresh_s: u64,
    /// Fewest seconds between two fetches of the JWKS caused by unknown `kid`s: a burst of
    /// forged `kid`s costs one fetch.
    #[serde(default = "default_jwks_min_interval_s")]
    pub jwks_min_interval_s: u64,
}

/// A key given in the configuration: a PEM public key (RS*, PS*, ES*, EdDSA) or a shared secret
/// (HS*), with the one algorithm it verifies.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    /// Matched against the token's `kid`; a token without `kid` tries every key of its
    /// algorithm.
    #[serde(default)]
    pub kid: Option<String>,
    /// `RS256`, `RS384`, `RS512`, `PS256`, `PS384`, `PS512`, `ES256`, `ES384`, `EdDSA`, `HS256`,
    /// `HS384` or `HS512`.
    pub alg: String,
    /// The public key in PEM (asymmetric algorithms).
    #[serde(default)]
    pub pem: Option<String>,
    /// The shared secret (HS algorithms only).
    #[serde(default)]
    pub secret: Option<String>,
}

impl std::fmt::Debug for JwtKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeyConfig")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("pem", &self.pem.as_ref().map(|_| "<pem>"))
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The algorithms a configured key may name.
pub const JWT_ALGORITHMS: [&str; 12] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256",
    "HS384", "HS512",
];

impl JwtConfig {
    /// Checks the section without I/O (keys are parsed when the gateway starts).
    pub fn validate(&self) -> Result<(), String> {
        if self.issuer.is_empty() || self.audience.is_empty() {
            return Err("gateway.auth.jwt: issuer and audience must be set".into());
        }
        if self.consumer_claim.is_empty() || self.plan_claim.as_deref() == Some("") {
            return Err("gateway.auth.jwt: consumer_claim and plan_claim must name a claim".into());
        }
        if self.keys.is_empty() && self.jwks_url.is_none() {
            return Err("gateway.auth.jwt: needs `jwks_url` or `keys`".into());
        }
        if let Some(url) = &self.jwks_url {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| format!("gateway.auth.jwt.jwks_url: `{url}` is not a URL: {e}"))?;
            if uri.scheme_str() == Some("https") && !cfg!(feature = "tls") {
                return Err(format!(
                    "gateway.auth.jwt.jwks_url: `{url}`: https needs a build with `--features tls`; serve the JWKS over http (for example through a local proxy) or list the keys under `keys`"
                ));
            }
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(format!(
                    "gateway.auth.jwt.jwks_url: `{url}` must be https://host[:port]/path or http://host[:port]/path"
                ));
            }
        }
        if self.jwks_refresh_s == 0 {
            return Err("gateway.auth.jwt.jwks_refresh_s: must be at least 1".into());
        }
        for (i, k) in self.keys.iter().enumerate() {
            let at = format!("gateway.auth.jwt.keys[{i}]");
            if !JWT_ALGORITHMS.contains(&k.alg.as_str()) {
                return Err(format!(
                    "{at}.alg: `{}` is not one of {}",
                    k.alg,
                    JWT_ALGORITHMS.join(", ")
                ));
            }
            match (k.alg.starts_with("HS"), &k.pem, &k.secret) {
                (true, None, Some(secret)) if secret.len() >= 32 => {}
                (true, None, Some(_)) => {
                    return Err(format!(
                        "{at}.secret: an HMAC secret must be at least 32 bytes"
                    ));
                }
                (true, _, _) => {
                    return Err(format!("{at}: {} needs `secret` (and no `pem`)", k.alg));
                }
                (false, Some(_), None) => {}
                (false, _, _) => {
                    return Err(format!("{at}: {} needs `pem` (and no `secret`)", k.alg));
                }
            }
        }
        Ok(())
    }
}

fn default_consumer_claim() -> String {
    "sub".into()
}

fn default_leeway_s() -> u64 {
    30
}

fn default_jwks_refresh_s() -> u64 {
    300
}

fn default_jwks_min_interval_s() -> u64 {
    10
}

/// API-key authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Header carrying the key.
    #[serde(default = "default_key_header")]
    pub header: String,
}

fn default_key_header() -> String {
    "x-api-key".into()
}

/// The bounded queue from the request path to the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Events held in memory before new ones are dropped (and counted).
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Most events per bus publish.
    #[serde(default = "default_batch")]
    pub batch_max: usize,
}

fn default_queue() -> usize {
    65_536
}
fn default_batch() -> usize {
    1_024
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            queue_capacity: default_queue(),
            batch_max: default_batch(),
        }
    }
}

/// Where quota state comes from: the query API's `/v1/quota`, polled.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaFeedConfig {
    /// `http://host:port/v1/quota`; unset: quotas are not enforced by this gateway.
    #[serde(default)]
    pub url: Option<String>,
    /// Bearer token for the query API (an admin token).
    #[serde(default)]
    pub token: Option<String>,
    /// Poll interval in milliseconds (default 1000).
    #[serde(default)]
    pub poll_ms: Option<u64>,
    /// Seconds since the quota state was last fetched past which it is stale. Unset: never
    /// stale (the last known state stays in force while the query API is unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after_s: Option<u64>,
    /// What a stale state means for consumers whose plan has a quota: `open` (the default:
    /// quotas are not enforced until the state is fresh again) or `closed` (their requests get
    /// 503 until it is).
    #[serde(default)]
    pub when_stale: WhenStale,
}

/// `gateway.quota.when_stale`: fail open or fail closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenStale {
    #[default]
    Open,
    Closed,
}

/// `gateway.pin_workers`: whether each worker thread is bound to one core.
///
/// A worker serves its connections from accept to the event on one thread, so nothing it does
/// gains from moving between cores, and a move costs its caches. On a machine whose cores the
/// gateway shares with busy neighbours (the two-core reference machine, with the load
/// generator and the upstream on the same cores), the scheduler also let both workers queue
/// on one core while the other sat idle: with the workers free, runs of `wrk -t1 -c64` left
/// the cores idle 1.4–11 % of the time and served 78,000–97,000 requests/s; with each worker
/// bound to a core, 1.3–2.5 % and 92,000–99,000 (BENCHMARKS.md, "Workers bound to their
/// cores"). nginx's `worker_cpu_affinity auto` and thread-per-core servers do the same.
///
/// The cost: a bound worker cannot leave a core that something else holds. On the reference
/// machine, with the load generator and the upstream on the gateway's cores, an open loop at
/// half the maximum rate met tails of 5–40 ms bound: the kernel left the load generator and the
/// upstream on a bound worker's core (220 ms in a traced run) while the other core idled. Free,
/// the same rounds' added p99 was 1.6–2.1 ms. So `auto` binds only while the cores are busy,
/// which is when binding pays: the process reads how long the workers' cores were idle four
/// times a second, binds the workers when that was under 20 % and frees them when it was over
/// 35 % (`src/sched.rs`, `pin_while_busy`).
///
/// Both imbalances fit how the reference machine's scheduler places work: it is a virtual
/// machine whose guest kernel packs processes onto one core while they leave it partly idle
/// (two processes 40 % busy each shared one core in 197 of 237 samples; BENCHMARKS.md,
/// twenty-eighth round). With a scheduler that spreads wake-ups over idle cores, as mainline
/// Linux does, neither should happen as often; no such machine has been measured yet.
///
/// The cores are those the process may run on when the workers start (its affinity mask:
/// `taskset`, a cpuset cgroup, systemd's `CPUAffinity=`), in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PinWorkers {
    /// When the workers are exactly one per core (the default `workers: 0` on a machine or
    /// cpuset of its own), bind worker `i` to the `i`-th core while the cores are busy (under
    /// 20 % idle) and free them while they have room (over 35 % idle). Not when they are fewer
    /// or more (a CPU quota smaller than the cores, which `workers: 0` follows, or a count set
    /// by hand): then each would be held to a core while others stay free, or two would share
    /// one while the scheduler could have spread them.
    #[default]
    Auto,
    /// Bind worker `i` to core `i mod n` of the `n` the process may run on, for good.
    Always,
    /// Leave the workers to the scheduler.
    Never,
}

impl PinWorkers {
    /// The word the configuration spells it with.
    pub fn as_str(self) -> &'static str {
        match self {
            PinWorkers::Auto => "auto",
            PinWorkers::Always => "always",
            PinWorkers::Never => "never",
        }
    }

    /// The core worker `index` of `workers` is bound to, of the cores the process may run on
    /// (`allowed`, in order); `None`: not bound.
    pub fn core_for(self, index: usize, workers: usize, allowed: &[usize]) -> Option<usize> {
        match self {
            PinWorkers::Never => None,
            _ if allowed.is_empty() => None,
            PinWorkers::Auto if workers != allowed.len() => None,
            PinWorkers::Auto | PinWorkers::Always => Some(allowed[index % allowed.len()]),
        }
    }
}

/// `gateway.io_uring`: whether the workers send their upstream requests through io_uring.
///
/// A worker gathers the upstream requests of its turn (the connections it found ready at one
/// wake-up) and sends them just before it waits again (`turn.rs`). One `send` each wakes the
/// upstream at the first, and the upstream then tends to take the worker's core and serve that
/// one request before the next is sent. With io_uring the turn's sends are one system call, so
/// the upstream finds them all when it runs (`turn/sends.rs`; BENCHMARKS.md, thirty-sixth
/// round). Nothing else goes through it: reads, client answers and TLS stay on the runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoUringSetting {
    /// Used where the kernel gives the process a ring; otherwise `off`, with a log line.
    #[default]
    Auto,
    /// One `send` system call per upstream request.
    Off,
}

impl IoUringSetting {
    /// The word the configuration spells it with.
    pub fn as_str(self) -> &'static str {
        match self {
            IoUringSetting::Auto => "auto",
            IoUringSetting::Off => "off",
        }
    }
}

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

impl GatewayConfig {
    /// The number of worker threads `workers` asks for (0: one per available core).
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Checks the section; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        let c = &self.connections;
        for (key, ms) in [
            ("head_timeout_ms", c.head_timeout_ms),
            ("idle_timeout_ms", c.idle_timeout_ms),
            ("io_timeout_ms", c.io_timeout_ms),
        ] {
            if ms == 0 {
                return Err(format!("gateway.connections.{key}: must be at least 1"));
            }
        }
        if self.workers > 1024 {
            return Err(format!(
                "gateway.workers: {} threads is more than 1024; 0 means one per core",
                self.workers
            ));
        }
        for (name, u) in &self.upstreams {
            if let Some(h) = &u.health_check
                && (!h.path.starts_with('/')
                    || h.interval_ms == 0
                    || h.timeout_ms == 0
                    || h.unhealthy_after == 0
                    || h.healthy_after == 0)
            {
                return Err(format!(
                    "gateway.upstreams.{name}.health_check: `path` must start with `/`, and the intervals and thresholds must be at least 1"
                ));
            }
            if u.targets.is_empty() {
                return Err(format!(
                    "gateway.upstreams.{name}.targets: needs at least one target"
                ));
            }
            for (i, t) in u.targets.iter().enumerate() {
                let uri: http::Uri = t.parse().map_err(|e| {
                    format!("gateway.upstreams.{name}.targets[{i}]: `{t}` is not a URL: {e}")
                })?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return Err(format!(
                        "gateway.upstreams.{name}.targets[{i}]: `{t}` must be http://host:port"
                    ));
                }
            }
            if u.timeout_ms == 0 || u.try_timeout_ms == Some(0) {
                return Err(format!(
                    "gateway.upstreams.{name}: timeout_ms and try_timeout_ms must be at least 1"
                ));
            }
            if let Some(s) = u.retry_on_status.iter().find(|s| !(500..=599).contains(*s)) {
                return Err(format!(
                    "gateway.upstreams.{name}.retry_on_status: {s} is not a server error (5xx)"
                ));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            if r.id.is_empty() || r.id == "default" {
                return Err(format!(
                    "gateway.routes[{i}].id: `{}` is not a usable route id",
                    r.id
                ));
            }
            if !ids.insert(&r.id) {
                return Err(format!("gateway.routes[{i}].id: `{}` is used twice", r.id));
            }
            for (j, h) in r.hosts.iter().enumerate() {
                let name = h.strip_prefix("*.").unwrap_or(h);
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                {
                    return Err(format!(
                        "gateway.routes[{i}].hosts[{j}]: `{h}` is not a host name (or `*.` and one; no port)"
                    ));
                }
            }
            if !self.upstreams.contains_key(&r.upstream) {
                return Err(format!(
                    "gateway.routes[{i}].upstream: no upstream named `{}`",
                    r.upstream
                ));
            }
            if !r.path.starts_with('/') {
                return Err(format!(
                    "gateway.routes[{i}].path: `{}` must start with /",
                    r.path
                ));
            }
            for m in &r.methods {
                if !METHODS.contains(&m.to_ascii_uppercase().as_str()) {
                    return Err(format!(
                        "gateway.routes[{i}].methods: `{m}` is not an HTTP method"
                    ));
                }
            }
            if let RouteAuth::Chain(chain) = &r.auth {
                if chain.is_empty() {
                    return Err(format!(
                        "gateway.routes[{i}].auth: an empty list lets nobody in; use `false` for anonymous access"
                    ));
                }
                if chain.contains(&AuthMethod::Jwt) && self.auth.jwt.is_none() {
                    return Err(format!(
                        "gateway.routes[{i}].auth: `jwt` needs a gateway.auth.jwt section"
                    ));
                }
            }
        }
        if let Some(jwt) = &self.auth.jwt {
            jwt.validate()?;
        }
        if self.tls.is_some() && !cfg!(feature = "tls") {
            return Err("gateway.tls: this build has no TLS; build with `--features tls`".into());
        }
        if self.events.queue_capacity == 0 || self.events.batch_max == 0 {
            return Err("gateway.events: queue_capacity and batch_max must be at least 1".into());
        }
        crate::router::Router::build(&self.routes)?;
        Ok(())
    }

    /// The instance id for events.
    pub fn instance_id(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("gateway-{}", self.listen.port()))
    }
}

#[cfg(test)]
mod tests {
    use super::PinWorkers;

    #[test]
    fn workers_are_bound_one_per_core_only_when_auto_finds_as_many_as_cores() {
        let allowed = [2, 3, 5];
        let auto = |i, n| PinWorkers::Auto.core_for(i, n, &allowed);
        assert_eq!(
            (auto(0, 3), auto(1, 3), auto(2, 3)),
            (Some(2), Some(3), Some(5))
        );
        assert_eq!(auto(0, 2), None, "fewer workers than cores");
        assert_eq!(auto(0, 4), None, "more workers than cores");
        let always = |i, n| PinWorkers::Always.core_for(i, n, &allowed);
        assert_eq!((always(0, 2), always(1, 2)), (Some(2), Some(3)));
        assert_eq!((always(3, 5), always(4, 5)), (Some(2), Some(3)), "in turn");
        assert_eq!(PinWorkers::Never.core_for(0, 3, &allowed), None);
        assert_eq!(
            PinWorkers::Always.core_for(0, 1, &[]),
            None,
            "no core known"
        );
    }
}
