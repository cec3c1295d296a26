//! Passwords out of URLs before they are shown: a database URL or a proxy
//! URL may carry one (`scheme://user:password@host/...`), and what is
//! logged or put in an error message must not.

/// `url` with the password of its userinfo replaced by `***` (the user
/// name stays, to say which account); unchanged without one.
pub fn password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(auth_end);
    match auth.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
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
    }
}
