//! Authenticated identity: `authorization: Bearer <JWT>` verified with a
//! shared secret (HS256), a public key (RS256/ES256) or a JWKS file, with
//! issuer, audience, expiry and not-before checked; the user id is a claim.

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, JwkSet, PublicKeyUse},
};

use crate::{config::JwtSettings, domain::UserId};

enum Keys {
    One(DecodingKey, Vec<Algorithm>),
    Set(JwkSet),
}

/// Verifies bearer tokens; built once at start-up.
pub struct JwtVerifier {
    keys: Keys,
    issuer: String,
    audience: String,
    user_claim: String,
    leeway: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("user_claim", &self.user_claim)
            .finish_non_exhaustive()
    }
}

const RSA: &[Algorithm] = &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];

impl JwtVerifier {
    pub fn new(settings: &JwtSettings) -> Result<Self, String> {
        let keys = match (
            &settings.secret,
            &settings.public_key_pem,
            &settings.jwks_json,
        ) {
            (Some(secret), None, None) => {
                if secret.len() < 32 {
                    return Err("the JWT secret must be at least 32 bytes".into());
                }
                Keys::One(DecodingKey::from_secret(secret), vec![Algorithm::HS256])
            }
            (None, Some(pem), None) => match DecodingKey::from_rsa_pem(pem) {
                Ok(key) => Keys::One(key, RSA.to_vec()),
                Err(_) => DecodingKey::from_ec_pem(pem)
                    .map(|key| Keys::One(key, EC.to_vec()))
                    .map_err(|_| {
                        "the JWT public key is neither an RSA nor an EC public key (PEM)".to_owned()
                    })?,
            },
            (None, None, Some(json)) => Keys::Set(
                serde_json::from_slice(json)
                    .map_err(|e| format!("the JWKS file is not a JWK set: {e}"))?,
            ),
            _ => return Err(
                "--auth jwt needs exactly one of --jwt-secret-file, --jwt-public-key, --jwt-jwks"
                    .into(),
            ),
        };
        // Without both, a token the same identity provider minted for any
        // other service (another audience) would be accepted here.
        let (Some(issuer), Some(audience)) = (&settings.issuer, &settings.audience) else {
            return Err(
                "--auth jwt needs --jwt-issuer and --jwt-audience: without them, tokens issued \
                 for other services would be accepted"
                    .into(),
            );
        };
        Ok(Self {
            keys,
            issuer: issuer.clone(),
            audience: audience.clone(),
            user_claim: settings.user_claim.clone(),
            leeway: settings.leeway.as_secs(),
        })
    }

    /// The user a valid token names, or which check failed.
    pub fn verify(&self, token: &str) -> Result<UserId, String> {
        let header =
            decode_header(token).map_err(|_| "the bearer token is not a JWT".to_owned())?;
        let (key, algorithms) = match &self.keys {
            Keys::One(key, algorithms) => (key.clone(), algorithms.clone()),
            Keys::Set(set) => {
                let jwk = match &header.kid {
                    Some(kid) => set
                        .find(kid)
                        .ok_or_else(|| format!("no key {kid:?} in the JWKS"))?,
                    None if set.keys.len() == 1 => &set.keys[0],
                    None => {
                        return Err("the token names no key (kid) and the JWKS has several".into());
                    }
                };
                if jwk
                    .common
                    .public_key_use
                    .as_ref()
                    .is_some_and(|key_use| *key_use != PublicKeyUse::Signature)
                {
                    return Err("the JWKS key is not for signatures (its use is not sig)".into());
                }
                let algorithms = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => RSA.to_vec(),
                    AlgorithmParameters::EllipticCurve(_) => EC.to_vec(),
                    _ => return Err("the JWKS key is of a kind convo does not accept".into()),
                };
                // A key that names its algorithm verifies that one only.
                let algorithms = match jwk.common.key_algorithm {
                    Some(named) => {
                        let named = Algorithm::try_from(named)
                            .map_err(|_| "the JWKS key names an algorithm convo does not accept")?;
                        if !algorithms.contains(&named) {
                            return Err("the JWKS key's alg does not fit its key type".into());
                        }
                        vec![named]
                    }
                    None => algorithms,
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|_| "the JWKS key is not usable".to_owned())?;
                (key, algorithms)
            }
        };
        if !algorithms.contains(&header.alg) {
            return Err(format!(
                "the token's algorithm {:?} is not accepted for this key",
                header.alg
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = algorithms;
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        let claims = decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &validation)
            .map_err(|error| describe(error.kind()))?
            .claims;
        let user = claims
            .get(&self.user_claim)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| format!("the token has no string claim {:?}", self.user_claim))?;
        UserId::parse(user).map_err(|_| {
            format!(
                "the token's {:?} claim is not a valid user id",
                self.user_claim
            )
        })
    }
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired (exp)".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        ErrorKind::InvalidIssuer => "the token's issuer (iss) is not accepted".into(),
        ErrorKind::InvalidAudience => "the token's audience (aud) is not accepted".into(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
        ErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted".into(),
        _ => "the bearer token is malformed".into(),
    }
}
