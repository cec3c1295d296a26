//! The development certificates (`certs/`, built into the binary) stay on
//! loopback: their keys are public. A server elsewhere without `--cert`
//! refuses to start, and `client`, `get` and the bench refuse a server
//! elsewhere without `--ca`, each naming the flag that is missing.

mod common;

use std::process::Output;

use common::free_udp_port;

/// A file of the repository's `certs/`.
fn certs(path: &str) -> String {
    format!("{}/../certs/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> Output {
    common::run_to_end(args)
}

#[test]
fn a_server_off_loopback_without_its_own_certificate_refuses_to_start() {
    let ca = certs("ca.pem");
    for listen in [
        format!("0.0.0.0:{}", free_udp_port()),
        format!("[::]:{}", free_udp_port()),
    ] {
        // With mutual TLS: the public key would let anyone pose as the
        // server and forge session tickets, which carry identities.
        let out = run(&["server", "--listen", &listen, "--client-ca", &ca]);
        assert!(!out.status.success(), "{listen}: refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("development certificate") && err.contains("--cert FILE --key FILE"),
            "{listen}: the reason and the way out are named: {err}"
        );
    }
    // The same files named on purpose are taken, with a warning (said on
    // any address; shown here on loopback: a test listens nowhere else,
    // and netns.rs runs such a server off loopback in its own namespace).
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let srv = common::Logged::spawn(
        "server",
        &[
            "server",
            "--listen",
            &listen,
            "--client-ca",
            &ca,
            "--cert",
            &certs("localhost.pem"),
            "--key",
            &certs("localhost.key"),
        ],
    );
    let warning = srv.wait_for("is the development key");
    assert!(warning.contains("--secret-file"), "{warning}");
    srv.wait_for("listening on");
    srv.kill();
}

#[test]
fn client_and_get_refuse_a_server_off_loopback_without_a_ca() {
    // Nothing is sent to these (TEST-NET-1, a reserved name): the refusal
    // comes before any packet.
    for server in [
        "192.0.2.1:4433",
        "collector.example:4433",
        "[2001:db8::1]:4433",
    ] {
        let out = run(&[
            "client",
            "--server",
            server,
            "--source",
            "http://127.0.0.1:9/",
        ]);
        assert!(!out.status.success(), "client to {server}: refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not on loopback") && err.contains("--ca FILE"),
            "client to {server}: {err}"
        );
    }
    // get by the same rule as the client: a name other than `localhost`
    // is not loopback, whatever it resolves to (the refusal comes before
    // any lookup: this name resolves to nothing).
    for url in [
        "https://192.0.2.1:4433/latest",
        "https://collector.example:4433/latest",
    ] {
        let out = run(&["get", url]);
        assert!(!out.status.success(), "get {url}: refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not on loopback") && err.contains("--ca FILE"),
            "get {url}: {err}"
        );
    }
}
