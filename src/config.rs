//! Settings: `environments/<APEX_ENV>/apex.toml`, overridden by `APEX__SECTION__KEY` variables,
//! plus secrets read only from the environment.
//!
//! Anything missing or malformed stops start-up with an error naming the key.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// A value that must never be printed.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Errors that stop start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required environment variable is not set.
    #[error("environment variable {0} is not set")]
    MissingVar(&'static str),
    /// An environment variable has a bad value.
    #[error("environment variable {name} is invalid: {reason}")]
    InvalidVar {
        /// The variable.
        name: String,
        /// Why.
        reason: String,
    },
    /// The settings file cannot be read.
    #[error("cannot read settings file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The settings file is malformed or lacks a key.
    #[error("settings file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (names the key).
        message: String,
    },
}

/// Which environment's settings to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    /// Development machine.
    Dev,
    /// Production.
    Prod,
}

impl Environment {
    fn from_env() -> Result<Self, ConfigError> {
        match std::env::var("APEX_ENV").as_deref() {
            Ok("dev") => Ok(Self::Dev),
            Ok("prod") => Ok(Self::Prod),
            Ok(other) => Err(ConfigError::InvalidVar {
                name: "APEX_ENV".to_owned(),
                reason: format!("`{other}` is not one of dev, prod"),
            }),
            Err(_) => Err(ConfigError::MissingVar("APEX_ENV")),
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Self::Dev => "dev",
            Self::Prod => "prod",
        }
    }
}

/// All settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// HTTP server.
    pub http: HttpSettings,
    /// PostgreSQL.
    pub database: DatabaseSettings,
    /// RabbitMQ.
    pub amqp: AmqpSettings,
    /// Token verification.
    pub auth: AuthSettings,
    /// Logging.
    pub log: LogSettings,
    /// Per-principal command rate limits.
    pub rate_limit: RateLimitSettings,
    /// Optional OpenTelemetry trace export.
    pub otlp: OtlpSettings,
}

/// HTTP server settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Bind address.
    pub host: String,
    /// Port (0 picks a free one).
    pub port: u16,
    /// Largest request body accepted.
    pub body_limit_bytes: usize,
}

/// PostgreSQL settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User.
    pub user: String,
    /// Database name.
    pub name: String,
    /// Pool size.
    pub max_connections: u32,
    /// PostgreSQL ends any of Apex's sessions that stays idle inside a transaction for longer
    /// (`idle_in_transaction_session_timeout`): a transaction left open by mistake would hold
    /// its locks and hold back the relay's snapshot horizon, and with it every publication.
    pub idle_in_transaction_timeout_seconds: u32,
    /// Create the database at start-up when missing (development).
    pub create_if_missing: bool,
    /// Whether and how the connections to PostgreSQL use TLS.
    pub ssl_mode: DatabaseSslMode,
    /// PEM file of the certificate authorities that `verify-ca` and `verify-full` trust; empty
    /// for the public web roots built into Apex.
    pub ssl_root_cert: String,
    /// From `APEX_DATABASE_PASSWORD`.
    #[serde(skip)]
    pub password: Secret,
}

/// `database.ssl_mode`: libpq's `sslmode` values, with their meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatabaseSslMode {
    /// Plain TCP only.
    Disable,
    /// Plain TCP; TLS only if the server insists.
    Allow,
    /// TLS if the server offers it, plain TCP otherwise.
    Prefer,
    /// TLS or no connection; the server's certificate is not checked.
    Require,
    /// TLS with a certificate signed by a trusted authority.
    VerifyCa,
    /// `verify-ca`, and the certificate names `database.host`.
    VerifyFull,
}

impl DatabaseSslMode {
    fn sqlx(self) -> PgSslMode {
        match self {
            Self::Disable => PgSslMode::Disable,
            Self::Allow => PgSslMode::Allow,
            Self::Prefer => PgSslMode::Prefer,
            Self::Require => PgSslMode::Require,
            Self::VerifyCa => PgSslMode::VerifyCa,
            Self::VerifyFull => PgSslMode::VerifyFull,
        }
    }
}

impl DatabaseSettings {
    /// Options for the server's maintenance database (`postgres`). TLS follows `ssl_mode` and
    /// `ssl_root_cert` only: libpq's `PGSSLMODE` and `PGSSLROOTCERT` are not consulted.
    pub fn server_options(&self) -> PgConnectOptions {
        let mut options = PgConnectOptions::new()
            .host(&self.host)
            .port(self.port)
            .username(&self.user)
            .database("postgres")
            .ssl_mode(self.ssl_mode.sqlx());
        if !self.ssl_root_cert.is_empty() {
            options = options.ssl_root_cert(&self.ssl_root_cert);
        }
        if self.password.expose().is_empty() {
            options
        } else {
            options.password(self.password.expose())
        }
    }

    /// Options for the application database.
    pub fn options(&self) -> PgConnectOptions {
        self.server_options()
            .database(&self.name)
            .application_name("apex")
            .options([(
                "idle_in_transaction_session_timeout",
                format!("{}s", self.idle_in_transaction_timeout_seconds),
            )])
    }
}

/// RabbitMQ settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Virtual host.
    pub vhost: String,
    /// User.
    pub user: String,
    /// The topic exchange events are published to.
    pub exchange: String,
    /// The topic exchange of live chat updates.
    pub chat_exchange: String,
    /// From `APEX_AMQP_PASSWORD`.
    #[serde(skip)]
    pub password: Secret,
}

impl AmqpSettings {
    /// The connection URI, with the password from the environment.
    pub fn uri(&self) -> String {
        let vhost = if self.vhost == "/" {
            "%2f".to_owned()
        } else {
            self.vhost.clone()
        };
        format!(
            "amqp://{}:{}@{}:{}/{}",
            self.user,
            self.password.expose(),
            self.host,
            self.port,
            vhost
        )
    }

    /// Broker settings for the relay and the projectors.
    pub fn config(&self) -> apex_projections::amqp::AmqpConfig {
        apex_projections::amqp::AmqpConfig {
            uri: self.uri(),
            exchange: self.exchange.clone(),
            chat_exchange: self.chat_exchange.clone(),
        }
    }
}

/// Signing algorithm of accepted tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// Shared secret (`APEX_JWT_SECRET`).
    HS256,
    /// RSA public key (`APEX_JWT_PUBLIC_KEY`, PEM).
    RS256,
}

/// Token settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// The one accepted algorithm.
    pub algorithm: JwtAlgorithm,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// The HS256 secret or the RS256 public key, from the environment.
    #[serde(skip)]
    pub key: Secret,
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directive (overridable with `RUST_LOG`).
    pub filter: String,
}

/// Body encoding of OTLP over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    /// `application/x-protobuf`, the OTLP/HTTP default.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// `application/json`.
    #[serde(rename = "http/json")]
    HttpJson,
}

/// OpenTelemetry trace export over OTLP/HTTP (see docs/operations/observability.md). Off unless
/// `enabled`; when on, the spans of `serve`, `relay`, `project` and `all` are exported in batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpSettings {
    /// Export spans.
    pub enabled: bool,
    /// The collector's full traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: String,
    /// Body encoding.
    pub protocol: OtlpProtocol,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// How long one export request may take.
    pub timeout_ms: u64,
}

impl OtlpSettings {
    fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        let scheme_ok = ["http://", "https://"]
            .iter()
            .any(|p| self.endpoint.starts_with(p) && self.endpoint.len() > p.len());
        if !scheme_ok {
            return Err(format!(
                "otlp.endpoint must be an http:// or https:// URL, got {:?}",
                self.endpoint
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err("otlp.service_name must not be empty".to_owned());
        }
        if self.timeout_ms == 0 {
            return Err("otlp.timeout_ms must be positive".to_owned());
        }
        Ok(())
    }
}

/// Per-principal token buckets on the command routes, kept in each API replica's memory
/// (see docs/operations/reliability.md). Every value must be positive.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Sustained commands per second of one user, admin or auditor (`sub`).
    pub commands_per_second: u32,
    /// Commands one user, admin or auditor may send at once.
    pub burst: u32,
    /// Sustained commands per second of one runner principal (the agent runtime).
    pub runner_commands_per_second: u32,
    /// Commands one runner principal may send at once.
    pub runner_burst: u32,
}

impl RateLimitSettings {
    /// The limits the API enforces.
    pub fn limits(&self) -> apex_api::rate_limit::RateLimits {
        apex_api::rate_limit::RateLimits {
            commands_per_second: self.commands_per_second,
            burst: self.burst,
            runner_commands_per_second: self.runner_commands_per_second,
            runner_burst: self.runner_burst,
        }
    }

    fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("commands_per_second", self.commands_per_second),
            ("burst", self.burst),
            (
                "runner_commands_per_second",
                self.runner_commands_per_second,
            ),
            ("runner_burst", self.runner_burst),
        ] {
            if value == 0 {
                return Err(format!("rate_limit.{key} must be positive"));
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    http: HttpSettings,
    database: DatabaseSettings,
    amqp: AmqpSettings,
    auth: AuthSettings,
    log: LogSettings,
    rate_limit: RateLimitSettings,
    otlp: OtlpSettings,
}

impl Settings {
    /// Loads the settings of `APEX_ENV` from `APEX_CONFIG_DIR` (default `environments`).
    pub fn load() -> Result<Self, ConfigError> {
        let env = Environment::from_env()?;
        let root = std::env::var("APEX_CONFIG_DIR").unwrap_or_else(|_| "environments".to_owned());
        let path = Path::new(&root).join(env.dir()).join("apex.toml");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::from_toml(&text, &path, std::env::vars())
    }

    /// Parses settings text, applying `APEX__SECTION__KEY` overrides and secrets from `vars`.
    pub fn from_toml(
        text: &str,
        path: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        for (name, value) in &vars {
            if let Some(rest) = name.strip_prefix("APEX__") {
                apply_override(&mut table, name, rest, value)?;
            }
        }
        let file: FileSettings = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        let var = |name: &'static str| {
            vars.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| Secret::new(v.clone()))
                .ok_or(ConfigError::MissingVar(name))
        };
        let mut settings = Settings {
            http: file.http,
            database: file.database,
            amqp: file.amqp,
            auth: file.auth,
            log: file.log,
            rate_limit: file.rate_limit,
            otlp: file.otlp,
        };
        settings.database.password = var("APEX_DATABASE_PASSWORD")?;
        settings.amqp.password = var("APEX_AMQP_PASSWORD")?;
        settings.auth.key = match settings.auth.algorithm {
            JwtAlgorithm::HS256 => {
                let secret = var("APEX_JWT_SECRET")?;
                if secret.expose().len() < 32 {
                    return Err(ConfigError::InvalidVar {
                        name: "APEX_JWT_SECRET".to_owned(),
                        reason: "must be at least 32 bytes".to_owned(),
                    });
                }
                secret
            }
            JwtAlgorithm::RS256 => {
                let key = var("APEX_JWT_PUBLIC_KEY")?;
                if !key.expose().contains("-----BEGIN") {
                    return Err(ConfigError::InvalidVar {
                        name: "APEX_JWT_PUBLIC_KEY".to_owned(),
                        reason: "must be a PEM public key".to_owned(),
                    });
                }
                key
            }
        };
        if settings.http.body_limit_bytes == 0 {
            return Err(parse_err(
                "http.body_limit_bytes must be positive".to_owned(),
            ));
        }
        if settings.database.max_connections == 0 {
            return Err(parse_err(
                "database.max_connections must be positive".to_owned(),
            ));
        }
        if settings.database.idle_in_transaction_timeout_seconds == 0 {
            return Err(parse_err(
                "database.idle_in_transaction_timeout_seconds must be positive".to_owned(),
            ));
        }
        if !settings.database.ssl_root_cert.is_empty()
            && !Path::new(&settings.database.ssl_root_cert).is_file()
        {
            return Err(parse_err(format!(
                "database.ssl_root_cert: no such file {:?}",
                settings.database.ssl_root_cert
            )));
        }
        settings.rate_limit.validate().map_err(parse_err)?;
        settings.otlp.validate().map_err(parse_err)?;
        Ok(settings)
    }
}

/// Sets `section.key` from `APEX__SECTION__KEY`, keeping the type of the value it replaces.
fn apply_override(
    table: &mut toml::Table,
    name: &str,
    rest: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidVar {
        name: name.to_owned(),
        reason,
    };
    let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
    let [section, key] = path.as_slice() else {
        return Err(invalid("expected APEX__<SECTION>__<KEY>".to_owned()));
    };
    let Some(toml::Value::Table(section_table)) = table.get_mut(section.as_str()) else {
        return Err(invalid(format!("there is no settings section `{section}`")));
    };
    let Some(current) = section_table.get(key.as_str()) else {
        return Err(invalid(format!("there is no setting `{section}.{key}`")));
    };
    let parsed = match current {
        toml::Value::Integer(_) => value
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|e| invalid(e.to_string()))?,
        toml::Value::Boolean(_) => value
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|e| invalid(e.to_string()))?,
        _ => toml::Value::String(value.to_owned()),
    };
    section_table.insert(key.clone(), parsed);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DEV: &str = include_str!("../environments/dev/apex.toml");
    const PROD: &str = include_str!("../environments/prod/apex.toml");

    fn vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v = vec![
            ("APEX_DATABASE_PASSWORD".to_owned(), String::new()),
            ("APEX_AMQP_PASSWORD".to_owned(), "guest".to_owned()),
            ("APEX_JWT_SECRET".to_owned(), "x".repeat(40)),
        ];
        v.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        v
    }

    /// The error of loading the dev settings with one override.
    fn dev_error(name: &str, value: &str) -> ConfigError {
        Settings::from_toml(DEV, Path::new("dev"), vars(&[(name, value)])).unwrap_err()
    }

    fn keys(text: &str) -> Vec<String> {
        let table: toml::Table = text.parse().unwrap();
        let mut keys = vec![];
        for (section, value) in table {
            for key in value.as_table().unwrap().keys() {
                keys.push(format!("{section}.{key}"));
            }
        }
        keys.sort();
        keys
    }

    #[test]
    fn dev_and_prod_templates_have_the_same_keys() {
        assert_eq!(keys(DEV), keys(PROD));
    }

    #[test]
    fn dev_settings_load_with_dev_secrets() {
        let s = Settings::from_toml(DEV, Path::new("dev"), vars(&[])).unwrap();
        assert_eq!(s.http.port, 8080);
        assert_eq!(s.auth.algorithm, JwtAlgorithm::HS256);
    }

    #[test]
    fn a_missing_secret_names_the_variable() {
        let err = Settings::from_toml(DEV, Path::new("dev"), vec![]).unwrap_err();
        assert!(err.to_string().contains("APEX_DATABASE_PASSWORD"), "{err}");
    }

    #[test]
    fn a_missing_key_names_it() {
        let text = DEV.replace("port = 8080\n", "");
        let err = Settings::from_toml(&text, Path::new("dev"), vars(&[])).unwrap_err();
        assert!(err.to_string().contains("port"), "{err}");
    }

    #[test]
    fn overrides_keep_types_and_reject_garbage() {
        let s = Settings::from_toml(DEV, Path::new("dev"), vars(&[("APEX__HTTP__PORT", "9000")]))
            .unwrap();
        assert_eq!(s.http.port, 9000);
        let err = dev_error("APEX__HTTP__PORT", "x");
        assert!(err.to_string().contains("APEX__HTTP__PORT"), "{err}");
        let err = dev_error("APEX__HTTP__NOPE", "1");
        assert!(err.to_string().contains("http.nope"), "{err}");
    }

    #[test]
    fn the_database_tls_mode_comes_from_the_settings() {
        let s = Settings::from_toml(DEV, Path::new("dev"), vars(&[])).unwrap();
        assert_eq!(s.database.ssl_mode, DatabaseSslMode::Prefer);
        assert!(matches!(
            s.database.options().get_ssl_mode(),
            PgSslMode::Prefer
        ));
        let s = Settings::from_toml(
            DEV,
            Path::new("dev"),
            vars(&[("APEX__DATABASE__SSL_MODE", "verify-full")]),
        )
        .unwrap();
        assert!(matches!(
            s.database.server_options().get_ssl_mode(),
            PgSslMode::VerifyFull
        ));
        let pem = vars(&[("APEX_JWT_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----")]);
        let s = Settings::from_toml(PROD, Path::new("prod"), pem).unwrap();
        assert_eq!(s.database.ssl_mode, DatabaseSslMode::VerifyFull);
    }

    #[test]
    fn a_wrong_tls_mode_or_a_missing_root_certificate_names_its_key() {
        let err = dev_error("APEX__DATABASE__SSL_MODE", "sometimes");
        assert!(err.to_string().contains("ssl_mode"), "{err}");
        let err = dev_error("APEX__DATABASE__SSL_ROOT_CERT", "/nonexistent/ca.pem");
        assert!(
            err.to_string()
                .contains("database.ssl_root_cert: no such file \"/nonexistent/ca.pem\""),
            "{err}"
        );
    }

    #[test]
    fn rate_limits_load_and_must_be_positive() {
        let s = Settings::from_toml(
            DEV,
            Path::new("dev"),
            vars(&[("APEX__RATE_LIMIT__BURST", "7")]),
        )
        .unwrap();
        assert_eq!(s.rate_limit.burst, 7);
        assert!(s.rate_limit.runner_commands_per_second > s.rate_limit.commands_per_second);
        let err = dev_error("APEX__RATE_LIMIT__RUNNER_BURST", "0");
        assert!(err.to_string().contains("rate_limit.runner_burst"), "{err}");
        let text = DEV.replace("commands_per_second = 10\n", "");
        let err = Settings::from_toml(&text, Path::new("dev"), vars(&[])).unwrap_err();
        assert!(err.to_string().contains("commands_per_second"), "{err}");
    }

    #[test]
    fn otlp_export_is_off_by_default_and_checked_when_switched_on() {
        let s = Settings::from_toml(DEV, Path::new("dev"), vars(&[])).unwrap();
        assert!(!s.otlp.enabled);
        let s = Settings::from_toml(
            DEV,
            Path::new("dev"),
            vars(&[
                ("APEX__OTLP__ENABLED", "true"),
                ("APEX__OTLP__PROTOCOL", "http/json"),
            ]),
        )
        .unwrap();
        assert!(s.otlp.enabled);
        assert_eq!(s.otlp.protocol, OtlpProtocol::HttpJson);
        let err = Settings::from_toml(
            DEV,
            Path::new("dev"),
            vars(&[
                ("APEX__OTLP__ENABLED", "true"),
                ("APEX__OTLP__ENDPOINT", "collector:4318"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("otlp.endpoint"), "{err}");
        let err = dev_error("APEX__OTLP__PROTOCOL", "grpc");
        assert!(err.to_string().contains("protocol"), "{err}");
    }

    #[test]
    fn the_idle_in_transaction_timeout_reaches_the_connections_and_must_be_positive() {
        let s = Settings::from_toml(
            DEV,
            Path::new("dev"),
            vars(&[("APEX__DATABASE__IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", "7")]),
        )
        .unwrap();
        let options = s.database.options();
        assert_eq!(
            options.get_options(),
            Some("-c idle_in_transaction_session_timeout=7s")
        );
        let err = dev_error("APEX__DATABASE__IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", "0");
        assert!(
            err.to_string()
                .contains("database.idle_in_transaction_timeout_seconds"),
            "{err}"
        );
    }

    #[test]
    fn prod_needs_a_pem_public_key() {
        let err = Settings::from_toml(PROD, Path::new("prod"), vars(&[])).unwrap_err();
        assert!(err.to_string().contains("APEX_JWT_PUBLIC_KEY"), "{err}");
    }

    #[test]
    fn a_short_hs256_secret_is_refused() {
        let mut v = vars(&[]);
        v.retain(|(k, _)| k != "APEX_JWT_SECRET");
        v.push(("APEX_JWT_SECRET".to_owned(), "short".to_owned()));
        let err = Settings::from_toml(DEV, Path::new("dev"), v).unwrap_err();
        assert!(err.to_string().contains("APEX_JWT_SECRET"), "{err}");
    }
}
