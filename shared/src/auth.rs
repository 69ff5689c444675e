//! Tokens: access tokens (JWT) and session connection tokens.
//!
//! * An **access token** proves who the user is: `sub` (user id), `role`
//!   (`player` | `dm` | `admin`) and `exp`. Routers check one on every request. It is
//!   either HS256-signed with `auth.jwt_secret` (development tokens, the `cluster token`
//!   CLI, tests) or RS256/ES256-signed by an external Auth Service whose public keys the
//!   router reads from PEM files (`auth.public_keys_pem`) or a JWKS file
//!   (`auth.jwks_file`); the key is chosen by the token header's `kid`. The key files
//!   are re-read when they change (see [`PublicKeys`]), so keys rotate without a
//!   restart.
//! * A **session token** (`X-Session-Token`) is handed out by create and join. It is
//!   a JWT of its own type (`typ = "session"`) bound to one user and one session, so a
//!   token for session A cannot open session B and an access token cannot pass for a
//!   session token (or the reverse). Session tokens are always HS256, signed by the
//!   routers with `auth.jwt_secret`.
//!
//! Every token's `exp` is checked, and its `nbf` when present (both with
//! `auth.leeway_secs` of clock skew). An access token's `iss` and `aud` are checked
//! when `auth.issuer` / `auth.audience` are set (then the claim is required). Only
//! routers verify tokens ("only the router terminates client auth"); nodes trust the
//! identity the router forwards.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use uuid::Uuid;

use crate::protocol::codes;

/// The role an access token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Player,
    Dm,
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "player" => Ok(Role::Player),
            "dm" => Ok(Role::Dm),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?} (player, dm or admin)")),
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Player => "player",
            Role::Dm => "dm",
            Role::Admin => "admin",
        }
    }
}

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub sub: Uuid,
    pub role: Role,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before (checked when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issuer (checked when `auth.issuer` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience: a string or a list of strings (checked when `auth.audience` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    /// Absent on access tokens (or anything but `"session"`, which external issuers
    /// may set, e.g. `"Bearer"`); `"session"` on session tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
}

impl Claims {
    /// Claims of an access token for `user` expiring at `exp` (nothing else set).
    pub fn new(sub: Uuid, role: Role, exp: u64) -> Claims {
        Claims {
            sub,
            role,
            exp,
            iat: None,
            nbf: None,
            iss: None,
            aud: None,
            typ: None,
        }
    }
}

/// Claims of a session (connection) token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionClaims {
    pub sub: Uuid,
    pub sid: Uuid,
    pub exp: u64,
    pub typ: String,
}

const SESSION_TYP: &str = "session";

/// Why a token was refused. Each maps to one wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token was presented")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is invalid: {0}")]
    Invalid(String),
    #[error("the session token belongs to another session")]
    WrongSession,
    #[error("the session token belongs to another user")]
    WrongUser,
}

impl AuthError {
    /// Wire error code.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => codes::MISSING_TOKEN,
            AuthError::Expired => codes::TOKEN_EXPIRED,
            AuthError::Invalid(_) => codes::INVALID_TOKEN,
            AuthError::WrongSession => codes::WRONG_SESSION,
            AuthError::WrongUser => codes::WRONG_USER,
        }
    }

    /// 401 for who-are-you failures, 403 for a valid identity asking for the wrong
    /// thing: its code's row in the code table (`gs_wire::CODES`).
    pub fn http_status(&self) -> u16 {
        gs_wire::http_status(self.code())
    }
}

/// The one way an auth failure goes on the wire.
impl From<AuthError> for crate::protocol::WireError {
    fn from(e: AuthError) -> Self {
        crate::protocol::WireError::new(e.code(), e.to_string())
    }
}

/// The asymmetric algorithms accepted for access tokens.
pub const PUBLIC_KEY_ALGORITHMS: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];

/// A token naming an unknown `kid` makes the key files be checked again, but not more
/// often than this (a stream of forged `kid`s costs one `stat` per file per interval).
pub const UNKNOWN_KID_RECHECK: Duration = Duration::from_secs(1);

/// One public key: its algorithm and the verifying key.
#[derive(Clone)]
struct PublicKey {
    alg: Algorithm,
    key: DecodingKey,
}

/// What identifies a version of a key file: modification time and length (`None`
/// when the file cannot be read).
type Stamp = Option<(SystemTime, u64)>;

/// The loaded keys and the stamps of the files they came from.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, PublicKey>,
    stamps: Vec<Stamp>,
}

/// The public keys of external token issuers: PEM files (`auth.public_keys_pem`; each
/// file's `kid` is its file name up to the first dot, e.g. `issuer-2024.pub.pem` →
/// `issuer-2024`) and a JWKS file (`auth.jwks_file`; each key's own `kid`).
///
/// **Rotation without restart.** Before a token is checked, the files' modification
/// time and length are compared with those of the loaded set, at most every
/// `auth.keys_check_ms`, and at once (but at most every [`UNKNOWN_KID_RECHECK`]) when
/// a token names a `kid` that is not loaded. A changed set is re-read as a whole; if
/// it cannot be read or parsed (e.g. half written), the previous keys stay in use and
/// the next check tries again. Write key files by renaming a complete file into
/// place.
pub struct PublicKeys {
    pem: Vec<PathBuf>,
    jwks: Option<PathBuf>,
    check_every: Duration,
    set: RwLock<Arc<KeySet>>,
    last_check: Mutex<Instant>,
}

impl std::fmt::Debug for PublicKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKeys")
            .field("pem", &self.pem)
            .field("jwks", &self.jwks)
            .finish_non_exhaustive()
    }
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The `kid` of a PEM key file: its file name up to the first dot.
pub fn pem_kid(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.split('.').next().unwrap_or_default().to_string()
}

/// A public key from PEM text (RSA → RS256, EC P-256 → ES256).
fn pem_key(pem: &[u8]) -> Result<PublicKey, String> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok(PublicKey {
            alg: Algorithm::RS256,
            key,
        });
    }
    let key = DecodingKey::from_ec_pem(pem)
        .map_err(|e| format!("neither an RSA nor an EC public key in PEM: {e}"))?;
    // Only P-256 (ES256) is accepted: find the curve through the key's JWK form.
    match Jwk::from_decoding_key(&key, None).map(|j| j.algorithm) {
        Ok(AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => {
            Ok(PublicKey {
                alg: Algorithm::ES256,
                key,
            })
        }
        _ => Err("an EC key that is not on P-256 (only ES256 is accepted)".into()),
    }
}

/// A public key from one JWK: RSA (RS256) or EC P-256 (ES256), for signatures.
fn jwk_key(jwk: &Jwk) -> Result<PublicKey, String> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption) | Some(PublicKeyUse::Other(_))
    ) {
        return Err("not a signature key (`use`)".into());
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        _ => return Err("unsupported key type (RSA or EC P-256 only)".into()),
    };
    if let Some(declared) = jwk.common.key_algorithm {
        if declared != jsonwebtoken::jwk::KeyAlgorithm::from(alg) {
            return Err(format!("`alg` {declared} is not accepted (RS256 or ES256)"));
        }
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key: {e}"))?;
    Ok(PublicKey { alg, key })
}

impl PublicKeys {
    /// Loads the key files; an error names the file that could not be used.
    pub fn load(pem: &[String], jwks: &str, check_every: Duration) -> Result<PublicKeys, String> {
        let keys = PublicKeys {
            pem: pem.iter().map(PathBuf::from).collect(),
            jwks: (!jwks.is_empty()).then(|| PathBuf::from(jwks)),
            check_every,
            set: RwLock::new(Arc::new(KeySet::default())),
            last_check: Mutex::new(Instant::now()),
        };
        let set = keys.read_files()?;
        *keys.set.write().unwrap() = Arc::new(set);
        Ok(keys)
    }

    /// Whether any key source is configured.
    pub fn is_empty(&self) -> bool {
        self.pem.is_empty() && self.jwks.is_none()
    }

    /// The `kid`s loaded now (sorted).
    pub fn kids(&self) -> Vec<String> {
        let mut k: Vec<String> = self.set.read().unwrap().by_kid.keys().cloned().collect();
        k.sort();
        k
    }

    fn stamps(&self) -> Vec<Stamp> {
        self.pem
            .iter()
            .chain(self.jwks.iter())
            .map(|p| stamp(p))
            .collect()
    }

    /// Reads every key file into a new set.
    fn read_files(&self) -> Result<KeySet, String> {
        // Stamps first: a file changed while it is read is read again next time.
        let stamps = self.stamps();
        let mut by_kid = HashMap::new();
        for path in &self.pem {
            let text =
                std::fs::read(path).map_err(|e| format!("public key {}: {e}", path.display()))?;
            let key = pem_key(&text).map_err(|e| format!("public key {}: {e}", path.display()))?;
            by_kid.insert(pem_kid(path), key);
        }
        if let Some(path) = &self.jwks {
            #[derive(Deserialize)]
            struct RawSet {
                keys: Vec<serde_json::Value>,
            }
            let text = std::fs::read(path).map_err(|e| format!("JWKS {}: {e}", path.display()))?;
            let raw: RawSet = serde_json::from_slice(&text)
                .map_err(|e| format!("JWKS {}: not a JWK set: {e}", path.display()))?;
            for (i, v) in raw.keys.into_iter().enumerate() {
                // One unusable key (another algorithm, an encryption key) does not
                // make the others unusable.
                let used = serde_json::from_value::<Jwk>(v)
                    .map_err(|e| e.to_string())
                    .and_then(|jwk| {
                        let kid = jwk
                            .common
                            .key_id
                            .clone()
                            .filter(|k| !k.is_empty())
                            .ok_or_else(|| "no `kid`".to_string())?;
                        Ok((kid, jwk_key(&jwk)?))
                    });
                match used {
                    Ok((kid, key)) => {
                        by_kid.insert(kid, key);
                    }
                    Err(e) => tracing::warn!(
                        file = %path.display(),
                        key = i,
                        error = %e,
                        "JWKS key skipped"
                    ),
                }
            }
        }
        Ok(KeySet { by_kid, stamps })
    }

    /// Re-reads the files if they changed and the last check is at least `min_gap`
    /// old. Returns whether a new set was loaded.
    fn refresh(&self, min_gap: Duration) -> bool {
        {
            let mut last = self.last_check.lock().unwrap();
            if last.elapsed() < min_gap {
                return false;
            }
            *last = Instant::now();
        }
        let unchanged = self.stamps() == self.set.read().unwrap().stamps;
        if unchanged {
            return false;
        }
        match self.read_files() {
            Ok(set) => {
                let kids = {
                    let mut k: Vec<&String> = set.by_kid.keys().collect();
                    k.sort();
                    k.into_iter().cloned().collect::<Vec<_>>()
                };
                tracing::info!(?kids, "public keys reloaded");
                *self.set.write().unwrap() = Arc::new(set);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "public keys changed but cannot be read; keeping the previous ones");
                false
            }
        }
    }

    /// Forces a check of the files now (tests, and a router's start-up).
    pub fn reload_now(&self) -> bool {
        self.refresh(Duration::ZERO)
    }

    /// The key for a token with `kid` and `alg`. Without a `kid`, the only key of that
    /// algorithm (if there is exactly one).
    fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<PublicKey, AuthError> {
        self.refresh(self.check_every);
        let lookup = |set: &KeySet| -> Option<PublicKey> {
            match kid {
                Some(k) => set.by_kid.get(k).cloned(),
                None => {
                    let mut of_alg = set.by_kid.values().filter(|k| k.alg == alg);
                    match (of_alg.next(), of_alg.next()) {
                        (Some(k), None) => Some(k.clone()),
                        _ => None,
                    }
                }
            }
        };
        // (Each read guard is dropped before a refresh may take the write lock.)
        let current = Arc::clone(&self.set.read().unwrap());
        let mut found = lookup(&current);
        if found.is_none() && self.refresh(UNKNOWN_KID_RECHECK) {
            // Perhaps a rotation this router had not seen yet.
            let current = Arc::clone(&self.set.read().unwrap());
            found = lookup(&current);
        }
        let key = found.ok_or_else(|| match kid {
            Some(k) => AuthError::Invalid(format!("unknown key id {k:?}")),
            None => AuthError::Invalid("the token names no key id (`kid`)".into()),
        })?;
        if key.alg != alg {
            return Err(AuthError::Invalid(format!(
                "key {:?} is not a {alg:?} key",
                kid.unwrap_or("")
            )));
        }
        Ok(key)
    }
}

/// Mints and verifies tokens: HS256 with one secret (session tokens, development
/// access tokens), and RS256/ES256 access tokens with [`PublicKeys`].
#[derive(Clone)]
pub struct Authority {
    enc: EncodingKey,
    dec: DecodingKey,
    /// HS256 access tokens: exp, nbf, iss/aud when configured.
    validation: Validation,
    /// Session tokens: exp and nbf (no iss/aud: the routers mint them).
    session_validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    public: Option<Arc<PublicKeys>>,
    session_ttl_secs: u64,
    leeway_secs: u64,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn validation(alg: Algorithm, leeway: u64, iss: Option<&str>, aud: Option<&str>) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = leeway;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    match iss {
        Some(i) => {
            v.set_issuer(&[i]);
            required.push("iss");
        }
        None => v.iss = None,
    }
    match aud {
        Some(a) => {
            v.set_audience(&[a]);
            required.push("aud");
        }
        // Not configured: not checked (the library would refuse any token with `aud`).
        None => v.validate_aud = false,
    }
    v.set_required_spec_claims(&required);
    v
}

impl Authority {
    /// HS256 only, no issuer or audience checks.
    pub fn new(secret: &str, session_ttl_secs: u64, leeway_secs: u64) -> Self {
        Self {
            enc: EncodingKey::from_secret(secret.as_bytes()),
            dec: DecodingKey::from_secret(secret.as_bytes()),
            validation: validation(Algorithm::HS256, leeway_secs, None, None),
            session_validation: validation(Algorithm::HS256, leeway_secs, None, None),
            issuer: None,
            audience: None,
            public: None,
            session_ttl_secs,
            leeway_secs,
        }
    }

    /// Checks `iss` (and requires it) on access tokens; it is put in minted ones.
    pub fn with_issuer(mut self, issuer: &str) -> Self {
        self.issuer = (!issuer.is_empty()).then(|| issuer.to_string());
        self.rebuild();
        self
    }

    /// Checks `aud` (and requires it) on access tokens; it is put in minted ones.
    pub fn with_audience(mut self, audience: &str) -> Self {
        self.audience = (!audience.is_empty()).then(|| audience.to_string());
        self.rebuild();
        self
    }

    /// Accepts RS256/ES256 access tokens verified with these keys.
    pub fn with_public_keys(mut self, keys: PublicKeys) -> Self {
        self.public = (!keys.is_empty()).then(|| Arc::new(keys));
        self
    }

    fn rebuild(&mut self) {
        self.validation = validation(
            Algorithm::HS256,
            self.leeway_secs,
            self.issuer.as_deref(),
            self.audience.as_deref(),
        );
    }

    /// For minting only (the CLI, the test harness): the secret, the issuer and the
    /// audience; no public keys are read.
    pub fn from_config(cfg: &crate::config::AuthConfig) -> Self {
        Self::new(&cfg.jwt_secret, cfg.session_token_ttl_secs, cfg.leeway_secs)
            .with_issuer(&cfg.issuer)
            .with_audience(&cfg.audience)
    }

    /// For verifying (routers): [`Authority::from_config`] plus the public keys, read
    /// now; an unreadable key file is an error.
    pub fn load(cfg: &crate::config::AuthConfig) -> Result<Self, String> {
        let keys = PublicKeys::load(
            &cfg.public_keys_pem,
            &cfg.jwks_file,
            Duration::from_millis(cfg.keys_check_ms),
        )?;
        Ok(Self::from_config(cfg).with_public_keys(keys))
    }

    /// The public keys, if any are configured.
    pub fn public_keys(&self) -> Option<&PublicKeys> {
        self.public.as_deref()
    }

    /// Clock skew tolerated on `exp` and `nbf`.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// Mints an access token (the Auth Service's job in production; here for the CLI,
    /// the demo and tests).
    pub fn mint_access(&self, user: Uuid, role: Role, ttl_secs: u64) -> String {
        let now = now_secs();
        let mut claims = Claims::new(user, role, now + ttl_secs);
        claims.iat = Some(now);
        self.mint_claims(claims)
    }

    /// Mints an access token with an explicit expiry (tests of expired tokens).
    pub fn mint_access_with_exp(&self, user: Uuid, role: Role, exp: u64) -> String {
        self.mint_claims(Claims::new(user, role, exp))
    }

    /// Mints an access token with these claims, HS256; the configured issuer and
    /// audience are filled in where the claims have none.
    pub fn mint_claims(&self, mut claims: Claims) -> String {
        if claims.iss.is_none() {
            claims.iss = self.issuer.clone();
        }
        if claims.aud.is_none() {
            claims.aud = self.audience.clone().map(serde_json::Value::String);
        }
        self.sign(&claims)
    }

    pub fn mint_session(&self, user: Uuid, session: Uuid) -> String {
        self.sign(&SessionClaims {
            sub: user,
            sid: session,
            exp: now_secs() + self.session_ttl_secs,
            typ: SESSION_TYP.into(),
        })
    }

    fn sign<T: Serialize>(&self, claims: &T) -> String {
        encode(&Header::new(Algorithm::HS256), claims, &self.enc)
            .expect("HS256 signing of serialisable claims cannot fail")
    }

    /// Verifies an access token: HS256 with the secret, or RS256/ES256 with the
    /// public key its `kid` names.
    pub fn verify_access(&self, token: Option<&str>) -> Result<Claims, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let header = decode_header(token).map_err(map_jwt_error)?;
        let claims: Claims = match header.alg {
            Algorithm::HS256 => decode(token, &self.dec, &self.validation),
            alg if PUBLIC_KEY_ALGORITHMS.contains(&alg) => {
                let keys = self.public.as_ref().ok_or_else(|| {
                    AuthError::Invalid(format!("{alg:?} tokens are not accepted here"))
                })?;
                let key = keys.key_for(header.kid.as_deref(), alg)?;
                let v = validation(
                    alg,
                    self.leeway_secs,
                    self.issuer.as_deref(),
                    self.audience.as_deref(),
                );
                decode(token, &key.key, &v)
            }
            alg => {
                return Err(AuthError::Invalid(format!(
                    "algorithm {alg:?} is not accepted"
                )))
            }
        }
        .map_err(map_jwt_error)?
        .claims;
        if claims.typ.as_deref() == Some(SESSION_TYP) {
            return Err(AuthError::Invalid("not an access token".into()));
        }
        Ok(claims)
    }

    /// Verifies a session token for `user` on `session`.
    pub fn verify_session(
        &self,
        token: Option<&str>,
        user: Uuid,
        session: Uuid,
    ) -> Result<SessionClaims, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let claims: SessionClaims = decode(token, &self.dec, &self.session_validation)
            .map_err(map_jwt_error)?
            .claims;
        if claims.typ != SESSION_TYP {
            return Err(AuthError::Invalid("not a session token".into()));
        }
        if claims.sid != session {
            return Err(AuthError::WrongSession);
        }
        if claims.sub != user {
            return Err(AuthError::WrongUser);
        }
        Ok(claims)
    }
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => {
            AuthError::Invalid("the token is not valid yet (nbf)".into())
        }
        ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience (aud)".into()),
        ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer (iss)".into()),
        ErrorKind::MissingRequiredClaim(c) => {
            AuthError::Invalid(format!("the `{c}` claim is required"))
        }
        other => AuthError::Invalid(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authority {
        Authority::new("test-secret-0123456789abcdef", 3600, 0)
    }

    #[test]
    fn access_round_trip() {
        let a = auth();
        let u = Uuid::new_v4();
        let t = a.mint_access(u, Role::Dm, 60);
        let c = a.verify_access(Some(&t)).unwrap();
        assert_eq!((c.sub, c.role), (u, Role::Dm));
    }

    #[test]
    fn refusals_have_codes() {
        let a = auth();
        let u = Uuid::new_v4();
        assert_eq!(a.verify_access(None).unwrap_err().code(), "missing_token");
        let expired = a.mint_access_with_exp(u, Role::Player, now_secs() - 120);
        assert_eq!(
            a.verify_access(Some(&expired)).unwrap_err(),
            AuthError::Expired
        );
        let forged =
            Authority::new("another-secret-0123456789", 60, 0).mint_access(u, Role::Admin, 60);
        assert_eq!(
            a.verify_access(Some(&forged)).unwrap_err().code(),
            "invalid_token"
        );
        assert_eq!(
            a.verify_access(Some("not.a.jwt")).unwrap_err().code(),
            "invalid_token"
        );
    }

    /// The test-only keys of `tests/fixtures/auth` (see its README).
    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/auth")
            .join(name)
    }

    fn sign_with(alg: Algorithm, kid: Option<&str>, private_pem: &str, claims: &Claims) -> String {
        let pem = std::fs::read(fixture(private_pem)).unwrap();
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
            _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
        };
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, claims, &key).unwrap()
    }

    fn claims(exp_in: i64) -> Claims {
        Claims::new(
            Uuid::new_v4(),
            Role::Player,
            (now_secs() as i64 + exp_in) as u64,
        )
    }

    /// An authority reading a copy of `jwks` (and the EC PEM key); the copy can be
    /// rewritten by the test.
    fn with_keys(jwks: &str, dir: &Path) -> (Authority, std::path::PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("jwks.json");
        std::fs::copy(fixture(jwks), &file).unwrap();
        let keys = PublicKeys::load(
            &[fixture("ec-1.pub.pem").display().to_string()],
            &file.display().to_string(),
            Duration::from_secs(3600),
        )
        .unwrap();
        (auth().with_public_keys(keys), file)
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("gs-auth-{tag}-{}", Uuid::new_v4().simple()))
    }

    #[test]
    fn nbf_is_checked_when_present() {
        let a = auth();
        let mut c = claims(60);
        c.nbf = Some(now_secs() + 120);
        let early = a.mint_claims(c.clone());
        let err = a.verify_access(Some(&early)).unwrap_err();
        assert_eq!(err.code(), "invalid_token");
        assert!(err.to_string().contains("nbf"), "{err}");
        c.nbf = Some(now_secs() - 1);
        a.verify_access(Some(&a.mint_claims(c.clone()))).unwrap();
        // Within the leeway.
        let lenient = Authority::new("test-secret-0123456789abcdef", 3600, 30);
        c.nbf = Some(now_secs() + 10);
        lenient
            .verify_access(Some(&lenient.mint_claims(c)))
            .unwrap();
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let plain = auth();
        let strict = auth().with_issuer("https://auth.test").with_audience("gss");
        let mut c = claims(60);
        // Not configured: whatever the token says is ignored.
        c.aud = Some(serde_json::json!("someone-else"));
        c.iss = Some("whoever".into());
        plain.verify_access(Some(&plain.sign(&c))).unwrap();
        // Configured: wrong values are refused ...
        for (aud, iss, why) in [
            (
                Some(serde_json::json!("someone-else")),
                Some("https://auth.test"),
                "aud",
            ),
            (
                Some(serde_json::json!(["a", "b"])),
                Some("https://auth.test"),
                "aud",
            ),
            (None, Some("https://auth.test"), "aud"),
            (
                Some(serde_json::json!("gss")),
                Some("https://evil.test"),
                "iss",
            ),
            (Some(serde_json::json!("gss")), None, "iss"),
        ] {
            c.aud = aud.clone();
            c.iss = iss.map(str::to_string);
            let err = strict.verify_access(Some(&strict.sign(&c))).unwrap_err();
            assert_eq!(err.code(), "invalid_token", "{aud:?} {iss:?}");
            assert!(err.to_string().contains(why), "{err}");
        }
        // ... right ones accepted (one of several audiences is enough).
        c.iss = Some("https://auth.test".into());
        c.aud = Some(serde_json::json!(["other", "gss"]));
        strict.verify_access(Some(&strict.sign(&c))).unwrap();
        // Minted tokens carry the configured values.
        let t = strict.mint_access(Uuid::new_v4(), Role::Dm, 60);
        let got = strict.verify_access(Some(&t)).unwrap();
        assert_eq!(got.aud, Some(serde_json::json!("gss")));
        assert_eq!(got.iss.as_deref(), Some("https://auth.test"));
        // Session tokens are the routers' own: no iss/aud needed.
        let (u, s) = (Uuid::new_v4(), Uuid::new_v4());
        strict
            .verify_session(Some(&strict.mint_session(u, s)), u, s)
            .unwrap();
    }

    #[test]
    fn external_tokens_are_verified_with_the_key_their_kid_names() {
        let dir = temp_dir("kid");
        let (a, _) = with_keys("jwks-1.json", &dir);
        assert_eq!(
            a.public_keys().unwrap().kids(),
            vec!["ec-1".to_string(), "test-rsa-1".to_string()]
        );
        let c = claims(60);
        // RS256 from the JWKS file, ES256 from the PEM file.
        let rs = sign_with(Algorithm::RS256, Some("test-rsa-1"), "rsa-1.key.pem", &c);
        assert_eq!(a.verify_access(Some(&rs)).unwrap().sub, c.sub);
        let es = sign_with(Algorithm::ES256, Some("ec-1"), "ec-1.key.pem", &c);
        assert_eq!(a.verify_access(Some(&es)).unwrap().sub, c.sub);
        // Without a kid: the only key of its algorithm.
        let es = sign_with(Algorithm::ES256, None, "ec-1.key.pem", &c);
        a.verify_access(Some(&es)).unwrap();
        // Refused: another key under a known kid, an unknown kid, the kid of a key of
        // another algorithm, expired, and RS256 where no keys are configured.
        let cases = [
            sign_with(
                Algorithm::RS256,
                Some("test-rsa-1"),
                "rsa-other.key.pem",
                &c,
            ),
            sign_with(Algorithm::RS256, Some("test-rsa-2"), "rsa-2.key.pem", &c),
            sign_with(Algorithm::RS256, Some("ec-1"), "rsa-1.key.pem", &c),
            sign_with(Algorithm::ES256, Some("test-rsa-1"), "ec-1.key.pem", &c),
        ];
        for t in &cases {
            assert_eq!(
                a.verify_access(Some(t)).unwrap_err().code(),
                "invalid_token"
            );
        }
        let old = sign_with(
            Algorithm::RS256,
            Some("test-rsa-1"),
            "rsa-1.key.pem",
            &claims(-120),
        );
        assert_eq!(a.verify_access(Some(&old)).unwrap_err(), AuthError::Expired);
        assert_eq!(
            auth().verify_access(Some(&rs)).unwrap_err().code(),
            "invalid_token"
        );
        // Algorithm confusion: an HS256 token keyed with the public key's text.
        let public = std::fs::read(fixture("rsa-1.pub.pem")).unwrap();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("test-rsa-1".into());
        let confused = encode(&h, &c, &EncodingKey::from_secret(&public)).unwrap();
        assert_eq!(
            a.verify_access(Some(&confused)).unwrap_err().code(),
            "invalid_token"
        );
        // `alg: none`.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
            rs.split('.').nth(1).unwrap()
        );
        assert_eq!(
            a.verify_access(Some(&none)).unwrap_err().code(),
            "invalid_token"
        );
        // A session token is never accepted from a public key.
        let mut st = serde_json::to_value(&c).unwrap();
        st["typ"] = "session".into();
        let pem = std::fs::read(fixture("rsa-1.key.pem")).unwrap();
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("test-rsa-1".into());
        let forged = encode(&h, &st, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
        assert!(a
            .verify_session(Some(&forged), c.sub, Uuid::new_v4())
            .is_err());
        assert!(a.verify_access(Some(&forged)).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn rotated_key_files_are_picked_up() {
        let dir = temp_dir("rotate");
        let (a, file) = with_keys("jwks-1.json", &dir);
        let c = claims(60);
        let new = sign_with(Algorithm::RS256, Some("test-rsa-2"), "rsa-2.key.pem", &c);
        assert!(a.verify_access(Some(&new)).is_err());
        // A half-written file keeps the previous keys.
        std::fs::write(&file, b"{\"keys\": [").unwrap();
        assert!(!a.public_keys().unwrap().reload_now());
        let old = sign_with(Algorithm::RS256, Some("test-rsa-1"), "rsa-1.key.pem", &c);
        a.verify_access(Some(&old)).unwrap();
        // The rotated set, renamed into place.
        let tmp = dir.join("jwks.json.new");
        std::fs::copy(fixture("jwks-2.json"), &tmp).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        // The unknown kid makes the verifier look at the files again (the last check
        // being more than UNKNOWN_KID_RECHECK old).
        let keys = a.public_keys().unwrap();
        *keys.last_check.lock().unwrap() =
            Instant::now().checked_sub(UNKNOWN_KID_RECHECK * 2).unwrap();
        a.verify_access(Some(&new)).unwrap();
        assert!(!keys.reload_now(), "already loaded");
        a.verify_access(Some(&old)).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unusable_key_files_are_reported() {
        let err = PublicKeys::load(&["/nonexistent/k.pem".into()], "", Duration::from_secs(1))
            .unwrap_err();
        assert!(err.contains("/nonexistent/k.pem"), "{err}");
        let err = PublicKeys::load(
            &[],
            &fixture("rsa-1.pub.pem").display().to_string(),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.contains("not a JWK set"), "{err}");
        assert_eq!(pem_kid(Path::new("/k/issuer-2026.pub.pem")), "issuer-2026");
    }

    #[test]
    fn session_token_is_bound_to_user_and_session() {
        let a = auth();
        let (u, s) = (Uuid::new_v4(), Uuid::new_v4());
        let t = a.mint_session(u, s);
        a.verify_session(Some(&t), u, s).unwrap();
        assert_eq!(
            a.verify_session(Some(&t), u, Uuid::new_v4()).unwrap_err(),
            AuthError::WrongSession
        );
        assert_eq!(
            a.verify_session(Some(&t), Uuid::new_v4(), s).unwrap_err(),
            AuthError::WrongUser
        );
        // The two kinds are not interchangeable.
        assert!(a.verify_access(Some(&t)).is_err());
        let access = a.mint_access(u, Role::Player, 60);
        assert!(a.verify_session(Some(&access), u, s).is_err());
    }
}
