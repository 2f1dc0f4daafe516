//! Secrets that must never reach a log by drift: a `Debug` or `Display` of a setting, an error
//! message, a span field. [`SecretString`] (from `secrecy`) holds keys; [`SecretUrl`] holds a
//! URL whose password is secret but whose host is worth showing. Both reveal their value only
//! through an explicit `expose`.

use std::fmt;
use std::str::FromStr;

pub use secrecy::{ExposeSecret, SecretString};

/// A connection URL (`amqp://user:password@host/vhost`, `mysql://…`). `Debug` and `Display`
/// show it with the password replaced by `***`; [`SecretUrl::expose`] gives the real one.
#[derive(Clone)]
pub struct SecretUrl {
    url: SecretString,
    shown: String,
}

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        let url: String = url.into();
        let shown = redact_url(&url);
        Self {
            url: SecretString::from(url),
            shown,
        }
    }

    /// The URL with its password, for the one call that connects.
    pub fn expose(&self) -> &str {
        self.url.expose_secret()
    }

    /// The URLs of a comma-separated list (`AMQP_URL` may be one: docs/configuration.md), in order,
    /// blanks dropped; a single URL gives itself.
    pub fn split_list(&self) -> Vec<SecretUrl> {
        split_urls(self.expose())
            .into_iter()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(SecretUrl::new)
            .collect()
    }

    /// The URL with its password replaced, for messages and logs.
    pub fn redacted(&self) -> &str {
        &self.shown
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        Self::new(url)
    }
}

impl FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.shown, f)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// The URLs of a comma-separated list: a comma separates two URLs only when what follows it
/// starts another `scheme://` or is blank (a comma inside a password is part of that password).
pub fn split_urls(list: &str) -> Vec<&str> {
    let starts_url = |rest: &str| {
        let rest = rest.trim_start();
        rest.find("://").is_some_and(|end| {
            end > 0
                && rest[..end]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
    };
    let mut parts = Vec::new();
    let mut start = 0;
    for (i, _) in list.match_indices(',') {
        let rest = &list[i + 1..];
        let blank = rest.trim_start().is_empty() || rest.trim_start().starts_with(',');
        if blank || starts_url(rest) {
            parts.push(&list[start..i]);
            start = i + 1;
        }
    }
    parts.push(&list[start..]);
    parts
}

/// `scheme://user:password@host/…` with the password replaced by `***`; a URL without one is
/// returned as it is. Each URL of a comma-separated list is redacted on its own.
pub fn redact_url(url: &str) -> String {
    let parts = split_urls(url);
    if parts.len() > 1 {
        return parts
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A comma inside a password neither splits the URL nor leaks the rest of the password.
    #[test]
    fn a_password_with_a_comma_is_redacted_whole() {
        let url = "mysql://root:pa,ss@db:3306/volume_daemon";
        assert_eq!(redact_url(url), "mysql://root:***@db:3306/volume_daemon");
        assert_eq!(SecretUrl::new(url).split_list().len(), 1);
        let list = "amqp://u:a,b@one/%2f, amqps://u:c@two/%2f";
        assert_eq!(
            redact_url(list),
            "amqp://u:***@one/%2f, amqps://u:***@two/%2f"
        );
        let parts = SecretUrl::new(list).split_list();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].expose(), "amqp://u:a,b@one/%2f");
        assert!(!format!("{:?}", SecretUrl::new(url)).contains("pa,ss"));
    }

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("mysql://root@db/x"), "mysql://root@db/x");
        assert_eq!(redact_url("amqp://host"), "amqp://host");
        assert_eq!(
            redact_url("amqp://a:one@h1:5672/%2f,amqp://h2,amqps://b:two@h3/v"),
            "amqp://a:***@h1:5672/%2f,amqp://h2,amqps://b:***@h3/v"
        );
    }

    #[test]
    fn a_list_splits_in_order_and_each_part_stays_secret() {
        let list = SecretUrl::new("amqp://a:one@h1/%2f, amqp://b:two@h2/%2f,");
        let parts = list.split_list();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].expose(), "amqp://b:two@h2/%2f");
        assert_eq!(parts[0].to_string(), "amqp://a:***@h1/%2f");
        assert!(!format!("{list:?}").contains("one") && !format!("{list}").contains("two"));
    }

    #[test]
    fn a_secret_url_shows_no_password_in_debug_or_display() {
        let url: SecretUrl = "mysql://app:hunter2@db:3306/vd"
            .parse()
            .expect("infallible");
        assert_eq!(url.expose(), "mysql://app:hunter2@db:3306/vd");
        for shown in [
            format!("{url:?}"),
            url.to_string(),
            format!("{:?}", Some(&url)),
        ] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("app:***@db:3306"), "{shown}");
        }
        let key = SecretString::from("s3cret");
        assert!(!format!("{key:?}").contains("s3cret"));
    }
}
