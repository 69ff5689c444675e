//! Tokens: access tokens (JWT, HS256) and session connection tokens.
//!
//! * An **access token** proves who the user is: `sub` (user id), `role`
//!   (`player` | `dm` | `admin`) and `exp`. Routers check one on every request.
//! * A **session token** (`X-Session-Token`) is handed out by create and join. It is
//!   a JWT of its own type (`typ = "session"`) bound to one user and one session, so a
//!   token for session A cannot open session B and an access token cannot pass for a
//!   session token (or the reverse).
//!
//! Both are signed with `auth.jwt_secret`. Only routers verify tokens ("only the router
//! terminates client auth"); nodes trust the identity the router forwards.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
    /// Absent on access tokens; `"session"` on session tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
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
            AuthError::Missing => "missing_token",
            AuthError::Expired => "token_expired",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::WrongSession => "wrong_session",
            AuthError::WrongUser => "wrong_user",
        }
    }

    /// 401 for who-are-you failures, 403 for a valid identity asking for the wrong thing.
    pub fn http_status(&self) -> u16 {
        match self {
            AuthError::WrongSession | AuthError::WrongUser => 403,
            _ => 401,
        }
    }
}

/// Mints and verifies both kinds of token with one secret.
#[derive(Clone)]
pub struct Authority {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
    session_ttl_secs: u64,
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

impl Authority {
    pub fn new(secret: &str, session_ttl_secs: u64, leeway_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            enc: EncodingKey::from_secret(secret.as_bytes()),
            dec: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            session_ttl_secs,
        }
    }

    pub fn from_config(cfg: &crate::config::AuthConfig) -> Self {
        Self::new(&cfg.jwt_secret, cfg.session_token_ttl_secs, cfg.leeway_secs)
    }

    /// Mints an access token (the Auth Service's job in production; here for the CLI,
    /// the demo and tests).
    pub fn mint_access(&self, user: Uuid, role: Role, ttl_secs: u64) -> String {
        let now = now_secs();
        let claims = Claims {
            sub: user,
            role,
            exp: now + ttl_secs,
            iat: Some(now),
            typ: None,
        };
        self.sign(&claims)
    }

    /// Mints an access token with an explicit expiry (tests of expired tokens).
    pub fn mint_access_with_exp(&self, user: Uuid, role: Role, exp: u64) -> String {
        self.sign(&Claims {
            sub: user,
            role,
            exp,
            iat: None,
            typ: None,
        })
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

    /// Verifies an access token.
    pub fn verify_access(&self, token: Option<&str>) -> Result<Claims, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let claims: Claims = decode(token, &self.dec, &self.validation)
            .map_err(map_jwt_error)?
            .claims;
        if claims.typ.is_some() {
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
        let claims: SessionClaims = decode(token, &self.dec, &self.validation)
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
