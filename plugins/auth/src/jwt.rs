//! Authentication by a JWT bearer token (RFC 7519), signed with HS256 or RS256.

use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::header;

/// The longest bearer token accepted, in bytes.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Clock-skew allowances above this are more likely a typo than a real skew, and a huge one
/// would keep expired tokens valid.
const MAX_LEEWAY_SECONDS: u64 = 600;

/// RFC 7518 section 3.2: an HS256 key must be at least as long as the hash.
const MIN_HS256_SECRET_BYTES: usize = 32;

/// The `[jwt]` table.
///
/// Not `Debug`, so that secrets cannot end up in a log.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    algorithm: JwtAlgorithm,
    secret: Option<String>,
    public_key_pem: Option<String>,
    audience: Option<String>,
    issuer: Option<String>,
    #[serde(default)]
    leeway_seconds: u64,
    #[serde(default = "default_identity_claim")]
    identity_claim: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum JwtAlgorithm {
    HS256,
    RS256,
}

/// Checks tokens against the configured key and claims.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    identity_claim: String,
}

fn default_identity_claim() -> String {
    "sub".to_string()
}

// === impl JwtVerifier ===

impl JwtVerifier {
    /// Validates the `[jwt]` table, including that the key can verify signatures.
    pub fn new(settings: JwtSettings) -> Result<Self, String> {
        let (algorithm, key) = decoding_key(&settings)?;
        if settings.leeway_seconds > MAX_LEEWAY_SECONDS {
            return Err(format!(
                "jwt.leeway_seconds must be at most {MAX_LEEWAY_SECONDS}"
            ));
        }
        if settings.identity_claim.is_empty() {
            return Err("jwt.identity_claim must not be empty".to_string());
        }
        Ok(JwtVerifier {
            validation: validation(algorithm, &settings)?,
            key,
            identity_claim: settings.identity_claim,
        })
    }

    /// The identity a valid token names, or why the token was refused.
    pub fn verify(&self, token: &str) -> Result<String, &'static str> {
        // Decoding and checking a huge token burns the call's fuel; no real token is this big,
        // so refuse it before doing any work (a 401, not a policy failure).
        if token.len() > MAX_TOKEN_BYTES {
            return Err("the token is too large");
        }
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|err| describe(err.kind()))?
            .claims;
        let identity = match claims.get(&self.identity_claim) {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Number(number)) => number.to_string(),
            _ => return Err("the token has no usable identity claim"),
        };
        if !header::is_safe_value(identity.as_bytes()) {
            return Err("the token identity has control characters");
        }
        Ok(identity)
    }
}

/// The key for the configured algorithm, checked now so that a bad key fails the config
/// rather than every request.
fn decoding_key(settings: &JwtSettings) -> Result<(Algorithm, DecodingKey), String> {
    let (algorithm, key) = match (
        settings.algorithm,
        &settings.secret,
        &settings.public_key_pem,
    ) {
        (JwtAlgorithm::HS256, Some(secret), None) => (Algorithm::HS256, hs256_key(secret)?),
        (JwtAlgorithm::RS256, None, Some(pem)) => (Algorithm::RS256, rs256_key(pem)?),
        (JwtAlgorithm::HS256, _, _) => {
            return Err("jwt.algorithm HS256 needs jwt.secret and no jwt.public_key_pem".into());
        }
        (JwtAlgorithm::RS256, _, _) => {
            return Err("jwt.algorithm RS256 needs jwt.public_key_pem and no jwt.secret".into());
        }
    };
    let provider = CryptoProvider::try_get_default()
        .ok_or("the plugin was built without a JWT crypto provider")?;
    (provider.verifier_factory)(&algorithm, &key)
        .map_err(|err| format!("jwt key cannot verify {algorithm:?} signatures: {err}"))?;
    Ok((algorithm, key))
}

fn hs256_key(secret: &str) -> Result<DecodingKey, String> {
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(format!(
            "jwt.secret must be at least {MIN_HS256_SECRET_BYTES} bytes"
        ));
    }
    DecodingKey::from_secret(secret.as_bytes()).map_err(|err| format!("jwt.secret: {err}"))
}

fn rs256_key(pem: &str) -> Result<DecodingKey, String> {
    DecodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|err| format!("jwt.public_key_pem is not an RSA public key in PEM: {err}"))
}

/// What every token must satisfy besides its signature: `exp` always (a token that never
/// expires cannot be revoked), `aud` and `iss` when configured, `nbf` when present.
fn validation(algorithm: Algorithm, settings: &JwtSettings) -> Result<Validation, String> {
    let mut validation = Validation::new(algorithm);
    validation.leeway = settings.leeway_seconds;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(audience) = &settings.audience {
        non_empty(audience, "jwt.audience")?;
        validation.set_audience(&[audience]);
        required.push("aud");
    }
    if let Some(issuer) = &settings.issuer {
        non_empty(issuer, "jwt.issuer")?;
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    Ok(validation)
}

fn non_empty(value: &str, setting: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{setting} must not be empty"));
    }
    Ok(())
}

/// A description for the client. It goes into a quoted `WWW-Authenticate` parameter, so it
/// must stay free of quotes and backslashes, and it names no key material.
fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet",
        ErrorKind::InvalidAudience => "the token is not meant for this audience",
        ErrorKind::InvalidIssuer => "the token issuer is not trusted",
        ErrorKind::InvalidSignature => "the token signature is invalid",
        ErrorKind::InvalidAlgorithm => "the token algorithm is not accepted",
        ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim",
        ErrorKind::InvalidClaimFormat(_) => "the token has a malformed claim",
        _ => "the token is malformed",
    }
}
