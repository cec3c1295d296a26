//! Passwords out of URLs before they are shown: a database URL or a proxy
//! URL may carry one (`scheme://user:password@host/...`, or libpq's
//! `?password=...`), and what is logged, put in an error message or
//! answered to a reader must not.

/// Query parameters whose value is a secret (libpq's names, and the usual
/// names of an HTTP source's token).
const SECRET_PARAMS: [&str; 7] = [
    "password",
    "sslpassword",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "secret",
];

/// `url` with the password of its userinfo and the values of its
/// password parameters replaced by `***` (the user name stays, to say
/// which account); unchanged without either.
///
/// The userinfo is hidden as far as either reading of it goes: a URL
/// parser's (RFC 3986: up to the last `@` before the path) and
/// tokio-postgres's (up to the first `@` anywhere, so that a password may
/// hold a `/` or a `?`).
pub fn password(url: &str) -> String {
    // Without a scheme (`user:pass@proxy:3128`, which ureq takes for an
    // http proxy, as `HTTP_PROXY` often holds), the same, with none shown.
    // A scheme is letters, digits, `+`, `-`, `.` (RFC 3986): what comes
    // before a `://` in a password (`alice:p://w@proxy`) is none.
    let split = url.split_once("://").filter(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    let Some((scheme, rest)) = split else {
        return password(&format!("x://{url}"))
            .strip_prefix("x://")
            .map(str::to_owned)
            .unwrap_or_default();
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..auth_end].rfind('@').or_else(|| rest.find('@'));
    let shown = match at.and_then(|at| rest[..at].find(':').map(|colon| (colon, at))) {
        Some((colon, at)) => format!("{scheme}://{}:***{}", &rest[..colon], &rest[at..]),
        None => url.to_owned(),
    };
    hide_params(&shown)
}

/// `url` with the values of its [`SECRET_PARAMS`] replaced by `***`.
///
/// A parameter's name is compared as a parser reads it (percent-decoded:
/// tokio-postgres takes `pass%77ord` for `password`), in any case, and its
/// value runs to the next `&`: tokio-postgres reads a `#` as part of a
/// value, so nothing after the `?` is taken for a fragment (an HTTP URL's
/// fragment after a secret is hidden with it).
fn hide_params(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_secret(k) => format!("{k}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

/// Whether the parameter named `name` (as written in the URL) holds a
/// secret.
fn is_secret(name: &str) -> bool {
    let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    SECRET_PARAMS.iter().any(|s| name.eq_ignore_ascii_case(s))
}

#[cfg(test)]
mod tests {
    use super::password;

    #[test]
    fn the_password_goes_and_the_rest_stays() {
        assert_eq!(
            password("http://alice:s3cret@proxy:3128"),
            "http://alice:***@proxy:3128"
        );
        assert_eq!(
            password("postgres://u:p@db:5432/x?sslmode=require"),
            "postgres://u:***@db:5432/x?sslmode=require"
        );
        assert_eq!(password("http://proxy:3128"), "http://proxy:3128");
        assert_eq!(password("http://alice@proxy"), "http://alice@proxy");
        assert_eq!(password("proxy:3128"), "proxy:3128");
        // From review: a proxy without a scheme (ureq's http), as
        // `HTTP_PROXY` often holds it.
        assert_eq!(password("alice:s3cret@proxy:3128"), "alice:***@proxy:3128");
        assert_eq!(password("proxy:3128?token=t"), "proxy:3128?token=***");
        assert_eq!(password("alice:p://w@proxy:3128"), "alice:***@proxy:3128");
    }

    /// The forms the first version let through: libpq's `password`
    /// parameter, a password with a `/`, `?` or `@` in it.
    #[test]
    fn passwords_in_parameters_and_with_delimiters_are_hidden_too() {
        assert_eq!(
            password("postgres://u@h/db?password=hunter2"),
            "postgres://u@h/db?password=***"
        );
        assert_eq!(
            password("postgres://u@h/db?sslmode=require&password=hunter2&sslpassword=k3y#f"),
            "postgres://u@h/db?sslmode=require&password=***&sslpassword=***"
        );
        assert_eq!(password("postgres://u:pa/ss@db/x"), "postgres://u:***@db/x");
        assert_eq!(password("postgres://u:pa?ss@db/x"), "postgres://u:***@db/x");
        assert_eq!(password("http://u:p@ss@host/"), "http://u:***@host/");
        assert_eq!(
            password("postgres://u@h/db?passwords=kept"),
            "postgres://u@h/db?passwords=kept"
        );
        assert_eq!(
            password("http://u:s3cret@source:8000/value?token=t0k&unit=c"),
            "http://u:***@source:8000/value?token=***&unit=c"
        );
    }

    /// From review: a name written percent-encoded or in capitals is still
    /// the parameter, and a `#` in a value is part of it (tokio-postgres
    /// reads it so), not a fragment to show.
    #[test]
    fn encoded_names_and_a_hash_in_a_value_do_not_show_the_secret() {
        assert_eq!(
            password("postgres://u@h/db?pass%77ord=s3cret&sslmode=require"),
            "postgres://u@h/db?pass%77ord=***&sslmode=require"
        );
        assert_eq!(
            password("postgres://u@h/db?password=ab#cd"),
            "postgres://u@h/db?password=***"
        );
        assert_eq!(
            password("http://source/v?Token=t0k&unit=c#top"),
            "http://source/v?Token=***&unit=c#top"
        );
    }
}
