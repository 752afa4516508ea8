//! Bearer-token authentication: JWT verified with a pinned algorithm.
//!
//! Claims: `sub`, `role` (user | runner | admin | auditor), `tier` (required for users),
//! `exp` (required), `iat`, optional `nbf`, and `iss`/`aud` matching the configuration.

use std::sync::Arc;

use apex_domain::{Actor, ActorRole, Tier, limits};
use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::state::AppState;

/// The claims Apex issues and accepts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Principal id.
    pub sub: String,
    /// Role.
    pub role: ActorRole,
    /// Customer tier; required for users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// Issued at.
    pub iat: u64,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
}

/// How tokens are verified (and, in development, signed).
pub enum KeyMaterial {
    /// HMAC-SHA256 with a shared secret.
    Hs256 {
        /// The secret, at least 32 bytes.
        secret: Vec<u8>,
    },
    /// RSA-SHA256; only the public key is needed to verify.
    Rs256 {
        /// PEM-encoded public key.
        public_key_pem: Vec<u8>,
    },
}

/// Verifies bearer tokens.
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
    algorithm: Algorithm,
    issuer: String,
    audience: String,
}

impl Authenticator {
    /// Builds an authenticator; fails on an unusable key.
    pub fn new(keys: KeyMaterial, issuer: &str, audience: &str) -> Result<Self, String> {
        let (algorithm, decoding, encoding) = match keys {
            KeyMaterial::Hs256 { secret } => {
                if secret.len() < 32 {
                    return Err("the HS256 secret must be at least 32 bytes".to_owned());
                }
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(&secret),
                    Some(EncodingKey::from_secret(&secret)),
                )
            }
            KeyMaterial::Rs256 { public_key_pem } => (
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(&public_key_pem)
                    .map_err(|e| format!("the RS256 public key is not a valid PEM RSA key: {e}"))?,
                None,
            ),
        };
        // `Validation::new` pins the one algorithm: a token whose header names another
        // (including `none`, or HS256 signed with the RSA public key) is refused.
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        Ok(Self {
            decoding,
            encoding,
            validation,
            algorithm,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
        })
    }

    /// Verifies a token and returns the principal.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                JwtErrorKind::ExpiredSignature => ApiError::TokenExpired,
                JwtErrorKind::ImmatureSignature => ApiError::InvalidToken("not valid yet (nbf)"),
                JwtErrorKind::InvalidSignature => ApiError::InvalidToken("bad signature"),
                JwtErrorKind::InvalidAlgorithm => ApiError::InvalidToken("algorithm not allowed"),
                JwtErrorKind::MissingRequiredClaim(_) => {
                    ApiError::InvalidToken("a required claim is missing")
                }
                JwtErrorKind::InvalidIssuer => ApiError::InvalidToken("wrong issuer"),
                JwtErrorKind::InvalidAudience => ApiError::InvalidToken("wrong audience"),
                JwtErrorKind::Json(_) | JwtErrorKind::InvalidClaimFormat(_) => {
                    ApiError::InvalidToken("claims are malformed (unknown role or tier?)")
                }
                _ => ApiError::InvalidToken("malformed token"),
            })?;
        let claims = data.claims;
        if limits::token("sub", &claims.sub, limits::PRINCIPAL_MAX).is_err() {
            return Err(ApiError::InvalidToken("sub is not a valid principal id"));
        }
        if claims.role == ActorRole::User && claims.tier.is_none() {
            return Err(ApiError::InvalidToken("a user token needs a tier claim"));
        }
        Ok(Principal {
            actor: Actor::new(claims.sub, claims.role),
            tier: claims.tier,
        })
    }

    /// Signs a token (development only: needs the HS256 secret).
    pub fn mint(
        &self,
        sub: &str,
        role: ActorRole,
        tier: Option<Tier>,
        ttl_seconds: u64,
    ) -> Result<String, String> {
        let Some(key) = &self.encoding else {
            return Err("tokens can only be minted with an HS256 secret".to_owned());
        };
        let now = now_seconds();
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            tier,
            exp: now + ttl_seconds,
            iat: now,
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key).map_err(|e| e.to_string())
    }
}

/// Seconds since the Unix epoch.
pub fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Who.
    pub actor: Actor,
    /// Tier (users only).
    pub tier: Option<Tier>,
}

impl Principal {
    /// Refuses a principal whose role is not in `roles`.
    pub fn require(&self, roles: &[ActorRole]) -> Result<(), ApiError> {
        if roles.contains(&self.actor.role) {
            Ok(())
        } else {
            Err(ApiError::RoleNotAllowed(self.actor.role.as_str()))
        }
    }
}

/// Reads the bearer token from the `Authorization` header.
pub fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::InvalidToken("Authorization header is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(ApiError::InvalidToken(
            "Authorization must be `Bearer <token>`",
        )),
    }
}

/// The principal of a request whose token a middleware (the rate limiter) has already
/// verified, kept in the request's extensions.
#[derive(Debug, Clone)]
pub(crate) struct Verified(pub(crate) Principal);

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(Verified(principal)) = parts.extensions.remove::<Verified>() {
            return Ok(principal);
        }
        let token = bearer(parts)?.ok_or(ApiError::MissingToken)?;
        state.auth.verify(token)
    }
}

/// Shared authenticator.
pub type SharedAuth = Arc<Authenticator>;
